"""Defect 5: an unrecognised image names an option that exists (`--symbols FILE`), on every kernel command."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from nephoscope.cli.main import app

KERNEL_COMMANDS = [["ps"], ["maps", "1"], ["files", "1"], ["modules"], ["kernel"], ["isf"]]


@pytest.mark.parametrize("command", KERNEL_COMMANDS, ids=lambda c: c[0])
def test_every_kernel_command_takes_symbols_and_no_cache(command: list[str]) -> None:
    result = CliRunner().invoke(app, [command[0], "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--symbols" in result.output and "--no-cache" in result.output


def test_a_kernel_without_kallsyms_suggests_the_option_that_exists(tmp_path: Path) -> None:
    image = tmp_path / "linux.raw"  # a banner, but no symbol table anywhere
    image.write_bytes(b"Linux version 6.1.0-test (x@y) (gcc) #1 SMP PREEMPT_DYNAMIC\n\0".ljust(4 << 20, b"\0"))
    result = CliRunner().invoke(app, ["ps", str(image), "--no-cache"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())  # rich wraps long error lines
    assert "--symbols FILE" in text and "Supply a vmlinux or System.map instead" not in text
    not_linux = tmp_path / "zero.raw"
    not_linux.write_bytes(bytes(1 << 20))
    result = CliRunner().invoke(app, ["kernel", str(not_linux), "--no-cache"])
    assert result.exit_code == 1 and "stage banner failed" in " ".join(result.output.split())  # the first cause


def test_a_bad_symbols_file_is_a_clean_error(tmp_path: Path) -> None:
    image = tmp_path / "linux.raw"
    image.write_bytes(bytes(1 << 20))
    bad = tmp_path / "k.json"
    bad.write_text('{"no": "user_types"}')
    result = CliRunner().invoke(app, ["ps", str(image), "--symbols", str(bad)])
    assert result.exit_code == 1 and "user_types" in " ".join(result.output.split())
