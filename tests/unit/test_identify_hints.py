"""What identify tells a user to run exists (issue 10, defect 6: it named `nephoscope kb ingest`)."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from nephoscope.cli.main import app
from nephoscope.introspect.identify import open_kb

runner = CliRunner()


def test_empty_kb_message_names_commands_that_exist(tmp_path: Path) -> None:
    db, why = open_kb(tmp_path / "empty.sqlite")
    assert db is None and "empty" in why
    commands = re.findall(r"`nephoscope ([a-z-]+(?: [a-z-]+)*)", why)
    assert commands, why
    for command in commands:
        result = runner.invoke(app, [*command.split(), "--help"])
        assert result.exit_code == 0, (command, result.output)
