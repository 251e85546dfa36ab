"""`nephoscope report`: the customer report of one VM (terminal, Markdown, HTML, JSON; CycloneDX SBOM, OpenVEX)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from nephoscope.cli.render import console, fail
from nephoscope.cli.views import render_report
from nephoscope.core.errors import NephoscopeError
from nephoscope.service.report import latest_report
from nephoscope.service.report_render import RENDERERS

EXPORTS = ("cyclonedx", "openvex")


def report(vm: str = typer.Argument(..., help="VM name as stored by `nephoscope scan`"),
           fmt: str = typer.Option(None, "--format", "-f",
                                   help="md, html or json (default: tables on a terminal, else md); cyclonedx "
                                   "(SBOM of the software seen running) or openvex (VEX over the stored scans)"),
           output: Path = typer.Option(None, "--output", "-o", help="write to this file instead of stdout")) -> None:
    """Write the report for a VM's owner from its latest scan: vulnerable, malicious, unverifiable."""
    if fmt in EXPORTS:
        _export(vm, fmt, output)
        return
    if fmt is not None and fmt not in RENDERERS:
        fail(NephoscopeError(f"unknown format {fmt!r}; use one of {', '.join([*RENDERERS, *EXPORTS])}"))
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


def _export(vm: str, fmt: str, output: Path | None) -> None:
    import json

    from nephoscope.service.sbom import export

    try:
        text = json.dumps(export(vm, fmt), indent=1) + "\n"
    except NephoscopeError as exc:
        fail(exc)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
