"""`nephoscope report`: the customer report of one VM (terminal, Markdown, HTML, JSON; CycloneDX SBOM, OpenVEX).

`--sbom FILE` and `--vex FILE` write the SBOM and the VEX document alongside the report. Every document is
built before any file is written, and each file is replaced atomically (a temporary file in the same
directory, then rename), so a failed run leaves no half-written file and never the report without the
exports it was asked for.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import typer

from nephoscope.cli.render import console, fail
from nephoscope.cli.views import render_report
from nephoscope.core.errors import NephoscopeError
from nephoscope.service.report import latest_report
from nephoscope.service.report_render import RENDERERS

EXPORTS = ("cyclonedx", "openvex")
STDOUT = "-"
WHAT = {"cyclonedx": "SBOM", "openvex": "VEX document"}


def report(vm: str = typer.Argument(..., help="VM name as stored by `nephoscope scan`"),
           fmt: str = typer.Option(None, "--format", "-f",
                                   help="md, html or json (default: tables on a terminal, else md); cyclonedx "
                                   "(SBOM of the software seen running) or openvex (VEX over the stored scans)"),
           output: Path = typer.Option(None, "--output", "-o", help="write to this file instead of stdout (- is "
                                       "stdout)"),
           sbom: Path = typer.Option(None, "--sbom", metavar="FILE", help="also write the CycloneDX 1.5 SBOM of "
                                     "the software seen running to FILE (- is stdout when the report goes to -o)"),
           vex: Path = typer.Option(None, "--vex", metavar="FILE", help="also write the OpenVEX 0.2.0 document "
                                    "over the stored scans to FILE (- is stdout when the report goes to -o)")
           ) -> None:
    """Write the report for a VM's owner from its latest scan: vulnerable, malicious, unverifiable."""
    if fmt is not None and fmt not in RENDERERS and fmt not in EXPORTS:
        fail(NephoscopeError(f"unknown format {fmt!r}; use one of {', '.join([*RENDERERS, *EXPORTS])}"))
    main_out = None if output is None or str(output) == STDOUT else output
    extra = [(f, p) for f, p in (("cyclonedx", sbom), ("openvex", vex)) if p is not None]
    _check_destinations(main_out, extra)
    wanted = [f for f, _p in extra] + ([fmt] if fmt in EXPORTS else [])
    try:
        docs = _exports(vm, wanted) if wanted else {}
        rep = None if fmt in EXPORTS else latest_report(vm)
    except NephoscopeError as exc:
        fail(exc)
    files = [(WHAT[f], p, _json(docs[f])) for f, p in extra]
    if rep is not None and fmt is None and main_out is None and console.is_terminal:
        _write_all(files)  # the exports first: the tables stay the last thing on the terminal
        render_report(rep, console)
        return
    text = _json(docs[fmt]) if fmt in EXPORTS else RENDERERS[fmt or "md"](rep)
    _write_all([("report" if fmt not in EXPORTS else WHAT[fmt], main_out or Path(STDOUT), text), *files])


def _exports(vm: str, fmts: list[str]) -> dict[str, dict[str, object]]:
    from nephoscope.service.sbom import exports

    return exports(vm, fmts)


def _json(doc: object) -> str:
    return json.dumps(doc, indent=1) + "\n"


def _check_destinations(main_out: Path | None, extra: list[tuple[str, Path]]) -> None:
    """Refuse two documents on stdout or in one file, and files that cannot be written, before any work."""
    to_stdout = [f"--{'sbom' if f == 'cyclonedx' else 'vex'}" for f, p in extra if str(p) == STDOUT]
    if len(to_stdout) + (main_out is None) > 1:
        raise typer.BadParameter("only one document can go to stdout; write the report with -o FILE (or give the "
                                 "other document a file)", param_hint=" and ".join(to_stdout))
    paths = [p for p in [main_out, *(p for _f, p in extra)] if p is not None and str(p) != STDOUT]
    seen: set[Path] = set()
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise typer.BadParameter(f"{p} is named twice; give each document its own file",
                                     param_hint="--output/--sbom/--vex")
        seen.add(key)
        problem = _unwritable(p)
        if problem:
            fail(NephoscopeError(f"cannot write {p}: {problem}"))


def _unwritable(path: Path) -> str | None:
    """Return why `path` cannot be written (as a new or replaced file), or None when it can."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        return "it is a directory; name a file"
    if not parent.is_dir():
        return f"directory {parent} does not exist; create it or choose another path"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable (a new file is written there, then renamed over {path.name})"
    return None


def _write_all(files: list[tuple[str, Path, str]]) -> None:
    """Write each (what, path, text), `-` to stdout, all or none: every file is staged before any is replaced.

    Exit 1 with a clear error when a file cannot be written; then no file was changed."""
    staged: list[tuple[str, str]] = []
    try:
        for what, path, text in files:
            if str(path) != STDOUT:
                try:
                    staged.append((stage(path, text), str(path)))
                except OSError as exc:
                    fail(NephoscopeError(f"cannot write the {what} to {path}: {exc.strerror or exc}"))
        for tmp, path in staged:
            os.replace(tmp, path)
        staged = []
    finally:
        for tmp, _path in staged:
            Path(tmp).unlink(missing_ok=True)
    for _what, path, text in files:
        if str(path) == STDOUT:
            sys.stdout.write(text)
            sys.stdout.flush()


def stage(path: Path, text: str) -> str:
    """Write `text` (UTF-8) to a new temporary file next to `path` (fsync'd, `path`'s mode); return its name.

    `os.replace(name, path)` then replaces `path` atomically."""
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = path.stat().st_mode & 0o7777  # a replaced file keeps its mode
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically: a temporary file in its directory, fsync, rename."""
    os.replace(stage(path, text), path)
