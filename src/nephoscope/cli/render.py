"""Shared rendering helpers: rich tables for people, JSON for programs, progress for long work.

rich is imported on first use: a command that prints JSON, or a table to a pipe, does not need it.
A table written to a pipe or file is laid out here with rich's own algorithm (column measurement,
collapse, word wrap with fold, the HEAVY_HEAD box) — byte for byte what rich prints there, which a
test checks on random tables — because rich spends ~25 ms on 60 rows and ~20 ms on its import.
Terminals, non-ASCII text and anything unusual still go through rich.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from nephoscope.core.errors import NephoscopeError
from nephoscope.core.text import escape_guest


class _LazyConsole:
    """A rich Console made on first use; a lone plain line to a pipe is written without it."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Any = None

    def print(self, *objects: Any, **options: Any) -> None:
        """Print like rich's Console.print (a plain line to a pipe: the same bytes, without importing rich)."""
        stream = sys.stderr if self._options.get("stderr") else sys.stdout
        if len(objects) == 1 and set(options) <= {"style", "highlight"} and _plain_stream(self, stream):
            line = _plain_line(objects[0])
            if line is not None and len(line) <= _console_width():
                stream.write(line + "\n")
                return
        self._get().print(*objects, **options)

    def _get(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)


console: Any = _LazyConsole(stderr=False, highlight=False)
err_console: Any = _LazyConsole(stderr=True, highlight=False)


def emit_json(data: Any) -> None:
    """Print `data` as JSON on stdout."""
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a table; every cell is treated as untrusted text (no markup, control chars escaped)."""
    cells = [[escape_guest("" if v is None else str(v)) for v in row] for row in rows]
    if _plain_stdout():
        text = plain_table(title, list(columns), cells, _console_width())
        if text is not None:
            sys.stdout.write(text)
            return
    from rich.table import Table
    from rich.text import Text

    t = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in cells:
        t.add_row(*(Text(v) for v in row))
    console.print(t)


@contextlib.contextmanager
def progress(what: str, quiet: bool = False) -> Iterator[Any]:
    """Show a spinner with the latest progress message on stderr; yield the message callback."""
    from rich.text import Text

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
    from rich.text import Text

    err_console.print(Text(f"error: {exc}"), style="bold red")
    raise SystemExit(1)


# --- rich's table layout for plain output ---------------------------------------------------------

_PRINTABLE = re.compile(r"[ -~]*")
_MARKUP = re.compile(r"\[|:\S*?:")  # rich reads titles and headers as markup and emoji codes
_WORD = re.compile(r"\s*\S+\s*")
_TRAILING = re.compile(r"\s+$")


def _plain_stdout() -> bool:
    """Return whether rich would print to stdout without styles (not a terminal), as rich decides it."""
    return _plain_stream(console, sys.stdout)


def _plain_stream(lazy: _LazyConsole, stream: Any) -> bool:
    """Return whether `lazy`'s rich console would write to `stream` without styles (not a terminal)."""
    if lazy._console is not None and lazy._console._file is not None:
        return False  # someone pointed the console elsewhere: let rich do it
    env = os.environ
    if env.get("TTY_COMPATIBLE") == "1" or env.get("FORCE_COLOR") is not None or "JPY_PARENT_PID" in env:
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return isatty is not None and not isatty()
    except ValueError:
        return False


def _plain_line(obj: Any) -> str | None:
    """Return the text rich prints for a str (no markup or emoji codes) or a rich Text, if plain ASCII."""
    if isinstance(obj, str):
        text = obj
        if _MARKUP.search(text):
            return None
    elif type(obj).__module__ == "rich.text" and type(obj).__name__ == "Text" and obj.end == "\n":
        text = obj.plain
    else:
        return None
    return text if _PRINTABLE.fullmatch(text) else None


def _console_width() -> int:
    """Return the width rich uses: a terminal on stdin/stdout/stderr, else 80; COLUMNS wins."""
    width = None
    for fd in (0, 1, 2):
        try:
            width = os.get_terminal_size(fd).columns
        except (AttributeError, ValueError, OSError):
            continue
        break
    columns = os.environ.get("COLUMNS")
    if columns is not None and columns.isdigit():
        width = int(columns)
    return width or 80


def _normalize(lo: int, hi: int) -> tuple[int, int]:
    lo = min(max(0, lo), hi)
    return max(0, lo), max(0, max(lo, hi))


def _measure_cell(text: str, max_width: int) -> tuple[int, int]:
    """rich's Measurement.get of Padding(Text(text), (0, 1)) at `max_width`."""
    if max_width < 1:
        return 0, 0
    if max_width - 2 < 1:
        lo, hi = max_width, max_width
    else:
        longest = len(text)
        words = text.split()
        lo, hi = _normalize(max((len(w) for w in words), default=longest), longest)
        lo, hi = min(lo, max_width), min(hi, max_width)
        if hi < 1:
            lo, hi = 0, 0
        else:
            lo, hi = _normalize(lo, hi)
        lo, hi = min(lo + 2, max_width), min(hi + 2, max_width)
    lo, hi = _normalize(lo, hi)
    lo, hi = min(lo, max_width), min(hi, max_width)
    return (0, 0) if hi < 1 else _normalize(lo, hi)


def _measure_column(cells: list[str], max_width: int) -> tuple[int, int]:
    if max_width < 1:
        return 0, 0
    measured = [_measure_cell(c, max_width) for c in cells]
    return min(max(m[0] for m in measured), max_width), min(max(m[1] for m in measured), max_width)


def _ratio_reduce(total: int, ratios: list[int], maximums: list[int], values: list[int]) -> list[int]:
    ratios = [r if m else 0 for r, m in zip(ratios, maximums, strict=True)]
    total_ratio = sum(ratios)
    if not total_ratio:
        return values[:]
    remaining, out = total, []
    for ratio, maximum, value in zip(ratios, maximums, values, strict=True):
        if ratio and total_ratio > 0:
            distributed = min(maximum, round(ratio * remaining / total_ratio))
            out.append(value - distributed)
            remaining -= distributed
            total_ratio -= ratio
        else:
            out.append(value)
    return out


def _collapse(widths: list[int], max_width: int) -> list[int]:
    total = sum(widths)
    excess = total - max_width
    while total and excess > 0:
        widest = max(widths)
        second = max((w for w in widths if w != widest), default=0)
        ratios = [1 if w == widest else 0 for w in widths]
        if not any(ratios) or not widest - second:
            break
        widths = _ratio_reduce(excess, ratios, [min(excess, widest - second)] * len(widths), widths)
        total = sum(widths)
        excess = total - max_width
    return widths


def _column_widths(columns: list[list[str]], max_width: int) -> list[int]:
    widths = [_measure_column(c, max_width)[1] or 1 for c in columns]
    if sum(widths) > max_width:
        widths = _collapse(widths, max_width)
        if sum(widths) > max_width:
            widths = _ratio_reduce(sum(widths) - max_width, [1] * len(widths), widths, widths)
        widths = [_measure_column(c, w)[1] or 0 for c, w in zip(columns, widths, strict=True)]
    return widths


def _divide(text: str, width: int) -> list[str]:
    """rich's divide_line (fold) + Text.divide + rstrip_end + truncate for one line of ASCII text."""
    breaks: list[int] = []
    offset = 0
    for match in _WORD.finditer(text):
        start, word = match.start(), match.group(0)
        length = len(word.rstrip())
        if width - offset >= length:
            offset += len(word)
        elif length > width:
            folded = [word[i:i + width] for i in range(0, len(word), width)]
            for i, piece in enumerate(folded):
                if start:
                    breaks.append(start)
                if i == len(folded) - 1:
                    offset = len(piece)
                else:
                    start += len(piece)
        elif offset and start:
            breaks.append(start)
            offset = len(word)
    bounds = [0, *breaks, len(text)]
    lines = []
    for a, b in itertools.pairwise(bounds):
        line = text[a:b]
        if len(line) > width:
            trailing = _TRAILING.search(line)
            if trailing is not None:
                line = line[:len(line) - min(len(trailing.group(0)), len(line) - width)]
        lines.append(line[:width])
    return lines


def _cell_lines(text: str, width: int) -> list[str]:
    inner = width - 2
    return [f" {line.ljust(inner)} " for line in _divide(text, inner)]


def _centered(text: str, width: int) -> list[str]:
    out = []
    for line in _divide(text, width):
        line = line.rstrip()[:width]
        left = (width - len(line)) // 2
        out.append((" " * left + line).ljust(width)[:width])
    return out


def plain_table(title: str, columns: list[str], cells: list[list[str]], width: int) -> str | None:
    """Return the table exactly as rich prints it without styles at console `width`, or None if unsure."""
    if not columns or any(len(row) != len(columns) for row in cells):
        return None
    texts = [title, *columns, *(c for row in cells for c in row)]
    if not all(_PRINTABLE.fullmatch(t) for t in texts) or any(_MARKUP.search(t) for t in (title, *columns)):
        return None
    by_column = [[columns[i], *(row[i] for row in cells)] for i in range(len(columns))]
    widths = _column_widths(by_column, width - (len(columns) + 1))
    if any(w < 3 for w in widths):
        return None
    table_width = sum(widths) + len(columns) + 1
    out = _centered(title, table_width) if title else []
    out.append("┏" + "┳".join("━" * w for w in widths) + "┓")
    for index, row in enumerate([columns, *cells]):
        rendered = [_cell_lines(text, w) for text, w in zip(row, widths, strict=True)]
        height = max(len(r) for r in rendered)
        edge = "┃" if index == 0 else "│"
        # rich aligns header cells to the bottom of their row, the others to the top
        rendered = [[" " * w] * (height - len(r)) + r if index == 0 else r + [" " * w] * (height - len(r))
                    for r, w in zip(rendered, widths, strict=True)]
        for line in range(height):
            out.append(edge + edge.join(r[line] for r in rendered) + edge)
        if index == 0:
            out.append("┡" + "╇".join("━" * w for w in widths) + "┩")
    out.append("└" + "┴".join("─" * w for w in widths) + "┘")
    return "\n".join(out) + "\n"
