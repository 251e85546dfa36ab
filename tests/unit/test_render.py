"""Plain-output tables are byte for byte what rich prints; rich is not imported for them."""

from __future__ import annotations

import io
import json
import os
import random
import string
import subprocess
import sys

import pytest
from rich.console import Console
from rich.table import Table
from rich.text import Text

from nephoscope.cli import render
from nephoscope.cli.render import plain_table


def _rich(title: str, columns: list[str], rows: list[list[str]], width: int) -> str:
    out = Console(file=io.StringIO(), highlight=False, width=width)
    t = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in rows:
        t.add_row(*(Text(v) for v in row))
    out.print(t)
    return out.file.getvalue()  # type: ignore[attr-defined]


def _cell(rng: random.Random) -> str:
    def word() -> str:
        return "".join(rng.choice(string.ascii_letters + string.digits + "/._-=")
                       for _ in range(rng.choice([0, 1, 2, 3, 5, 8, 13, 30, 90])))
    text = rng.choice([" ", "  ", "   "]).join(word() for _ in range(rng.choice([0, 1, 1, 2, 3, 6])))
    return (" " if rng.random() < 0.1 else "") + text + ("  " if rng.random() < 0.1 else "")


@pytest.mark.parametrize("seed", range(4))
def test_random_tables_match_rich(seed: int) -> None:
    rng = random.Random(seed)
    compared = 0
    for _ in range(300):
        columns = [rng.choice(["pid", "comm", "exe", "cmdline", "a", "long column name", "x y"])
                   for _ in range(rng.randint(1, 8))]
        rows = [[_cell(rng) for _ in columns] for _ in range(rng.randint(0, 12))]
        title = rng.choice(["", "t", "dump.elf: processes (60)", "a much longer title " * rng.randint(1, 8)])
        width = rng.choice([20, 30, 40, 60, 80, 100, 120, 200])
        ours = plain_table(title, columns, rows, width)
        if ours is not None:
            compared += 1
            assert ours == _rich(title, columns, rows, width), (title, columns, rows, width)
    assert compared > 250  # only very narrow layouts are left to rich


def test_what_it_cannot_vouch_for_goes_to_rich() -> None:
    assert plain_table("t", ["pid"], [["ünïcode"]], 80) is None
    assert plain_table("[bold]t", ["pid"], [["1"]], 80) is None  # rich would read markup
    assert plain_table("t", [":smile:"], [["1"]], 80) is None  # ... or an emoji code
    assert plain_table("t", ["a", "b", "c", "d"], [["x" * 50] * 4], 12) is None  # columns under 3 cells
    assert plain_table("t", [], [], 80) is None


def test_table_to_a_pipe_prints_what_rich_would_and_imports_no_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [[1, None, "init\x1b[31m", "/sbin/init splash"], [22, 1, "kthreadd", ""]]
    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buffer)
    render.table("vm: processes (2)", ["pid", "ppid", "comm", "cmdline"], rows)
    expected = _rich("vm: processes (2)", ["pid", "ppid", "comm", "cmdline"],
                     [["1", "", "init\\x1b[31m", "/sbin/init splash"], ["22", "1", "kthreadd", ""]], 60)
    assert buffer.getvalue() == expected
    code = ("import sys, io\nsys.stdout = io.StringIO()\nfrom nephoscope.cli.render import table\n"
            "table('t', ['a'], [['1']])\nout = sys.stdout.getvalue()\nsys.stdout = sys.__stdout__\n"
            "print(any(m.startswith('rich') for m in sys.modules), repr(out))")
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    imported_rich, out = run.stdout.split(" ", 1)
    assert imported_rich == "False" and "┏━━━┓" in out


def test_json_is_plain() -> None:
    buffer = io.StringIO()
    sys_stdout, sys.stdout = sys.stdout, buffer
    try:
        render.emit_json({"a": [1, 2]})
    finally:
        sys.stdout = sys_stdout
    assert json.loads(buffer.getvalue()) == {"a": [1, 2]}


def test_plain_lines_to_a_pipe_are_what_rich_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    cases: list[tuple[object, dict[str, object]]] = [
        ("task list: 60 entries, complete", {}), (Text("pid 7 (x) is in one view", style="red"), {}),
        ("", {}), ("x" * 40, {}), ("x" * 41, {}), ("a " * 30, {"style": "yellow"}), ("[yellow]markup[/yellow]", {}),
        (":smile: emoji", {}), (Text("ünïcode"), {}), ("vm1: method: reason", {"highlight": False})]
    for obj, options in cases:
        ours, theirs = io.StringIO(), Console(file=io.StringIO(), highlight=False, width=40)
        monkeypatch.setattr(sys, "stdout", ours)
        render.console.print(obj, **options)
        monkeypatch.setattr(sys, "stdout", sys.__stdout__)
        theirs.print(obj, **options)  # type: ignore[arg-type]
        assert ours.getvalue() == theirs.file.getvalue(), obj  # type: ignore[attr-defined]
