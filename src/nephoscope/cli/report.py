"""`nephoscope report`: the customer report of one VM (for the terminal, or Markdown, HTML or JSON)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from nephoscope.cli.render import console, fail
from nephoscope.cli.views import render_report
from nephoscope.core.errors import NephoscopeError
from nephoscope.service.report import report_from_store
from nephoscope.service.report_render import RENDERERS
from nephoscope.store.sqlite import Store


def report(vm: str = typer.Argument(..., help="VM name as stored by `nephoscope scan`"),
           fmt: str = typer.Option(None, "--format", "-f",
                                   help="md, html or json (default: tables on a terminal, else md)"),
           output: Path = typer.Option(None, "--output", "-o", help="write to this file instead of stdout")) -> None:
    """Write the report for a VM's owner from its latest scan: vulnerable, malicious, unverifiable."""
    if fmt is not None and fmt not in RENDERERS:
        fail(NephoscopeError(f"unknown format {fmt!r}; use one of {', '.join(RENDERERS)}"))
    try:
        from nephoscope.lab import runner

        guest = runner.load_guest(vm)
        ram = guest.ram_path if guest is not None and guest.alive() else None
        rep = report_from_store(vm, Store(), ram_path=ram)
    except NephoscopeError as exc:
        fail(exc)
    if fmt is None and output is None and console.is_terminal:
        render_report(rep, console)
        return
    text = RENDERERS[fmt or "md"](rep)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
