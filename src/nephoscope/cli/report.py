"""`nephoscope report`: the customer report of one VM (for the terminal, or Markdown, HTML or JSON)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from nephoscope.cli.render import console, fail
from nephoscope.cli.views import render_report
from nephoscope.core.errors import NephoscopeError
from nephoscope.service.report import latest_report
from nephoscope.service.report_render import RENDERERS


def report(vm: str = typer.Argument(..., help="VM name as stored by `nephoscope scan`"),
           fmt: str = typer.Option(None, "--format", "-f",
                                   help="md, html or json (default: tables on a terminal, else md)"),
           output: Path = typer.Option(None, "--output", "-o", help="write to this file instead of stdout")) -> None:
    """Write the report for a VM's owner from its latest scan: vulnerable, malicious, unverifiable."""
    if fmt is not None and fmt not in RENDERERS:
        fail(NephoscopeError(f"unknown format {fmt!r}; use one of {', '.join(RENDERERS)}"))
    try:
        rep = latest_report(vm)
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
