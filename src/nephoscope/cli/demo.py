"""`nephoscope demo`: the main job on embedded defaults (what `make demo` runs)."""

from __future__ import annotations

import typer
from rich.text import Text

from nephoscope.cli.render import console, emit_json, fail, progress
from nephoscope.cli.views import render_report, render_scan
from nephoscope.core.errors import NephoscopeError
from nephoscope.service.demo import run_demo


def demo(
    name: str = typer.Option("demo", "--name", help="lab guest to use (booted if not running)"),
    profile: str = typer.Option("tampered", "--profile", "-p", help="lab profile to boot"),
    json_out: bool = typer.Option(False, "--json", help="print the scan as JSON"),
) -> None:
    """Build and boot a lab guest if needed, prepare the knowledge base, run every method, print the report."""
    try:
        with progress("demo", quiet=json_out) as log:
            result = run_demo(name, profile, log)
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json(result.to_dict())
        return
    render_scan(result)
    from nephoscope.service.report import report_from_result

    console.rule("customer report")
    render_report(report_from_result(result))
    console.print(Text(f"The guest keeps running: `nephoscope lab console {name}`, `nephoscope scan {name}`, "
                       f"`nephoscope lab down {name}`."))
