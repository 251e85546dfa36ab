"""Shared rendering helpers: rich tables for people, JSON for programs, progress for long work."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from nephoscope.core.errors import NephoscopeError
from nephoscope.core.text import escape_guest

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def emit_json(data: Any) -> None:
    """Print `data` as JSON on stdout."""
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a table; every cell is treated as untrusted text (no markup, control chars escaped)."""
    t = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in rows:
        t.add_row(*(Text(escape_guest("" if v is None else str(v))) for v in row))
    console.print(t)


@contextlib.contextmanager
def progress(what: str, quiet: bool = False) -> Iterator[Any]:
    """Show a spinner with the latest progress message on stderr; yield the message callback."""
    if quiet or not err_console.is_terminal:
        def log(msg: str) -> None:
            if not quiet:
                err_console.print(Text(f"[{what}] {msg}"), style="dim")
        yield log
        return
    with err_console.status(what) as status:
        yield lambda msg: status.update(Text(f"{what}: {msg}"))


def fail(exc: NephoscopeError) -> None:
    """Print an error for people and exit with status 1."""
    err_console.print(Text(f"error: {exc}"), style="bold red")
    raise SystemExit(1)
