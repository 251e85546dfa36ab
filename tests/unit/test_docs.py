"""Every command of the CLI is documented: a newcomer finds it in the README or docs/."""

from __future__ import annotations

from pathlib import Path

import typer.main

from nephoscope.cli.main import app

ROOT = Path(__file__).resolve().parents[2]


def _commands() -> list[str]:
    group = typer.main.get_command(app)
    names = []
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        sub = getattr(cmd, "commands", None)
        names += [f"{name} {s}" for s in sub] if sub else [name]
    return names


def test_every_command_is_documented() -> None:
    docs = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    missing = [c for c in _commands() if c != "version" and f"nephoscope {c}" not in docs]
    assert not missing, f"undocumented commands: {missing}"
