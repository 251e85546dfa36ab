"""The top-level CLI starts without importing command modules, and its static help matches the commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from nephoscope.cli.main import COMMANDS, app, load_command

HEAVY = ["numpy", "yara", "matplotlib", "elftools", "qemu.qmp", "debian", "rich", "sqlite3",
         "nephoscope.cli.inspect", "nephoscope.cli.arch", "nephoscope.os.linux.model", "nephoscope.lab.runner"]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, env=dict(os.environ))
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_static_help_matches_every_command() -> None:
    for name, (_module, _attr, one_line) in COMMANDS.items():
        command = load_command(name)
        real = (command.help or "").strip().splitlines()[0]
        assert real == one_line, f"{name}: static help {one_line!r} differs from the command's {real!r}"


def test_help_lists_every_command_without_importing_them() -> None:
    code = ("import sys\nfrom nephoscope.cli.main import app\nsys.argv = ['nephoscope', '--help']\n"
            "try:\n    app()\nexcept SystemExit:\n    pass")
    loaded = _modules_after(code)
    assert not [m for m in HEAVY if m in loaded], "--help imported heavy modules"
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in [*COMMANDS, "version"]:
        assert f"  {name} " in result.output


def test_import_of_the_cli_is_light() -> None:
    loaded = _modules_after("import nephoscope.cli.main")
    assert not [m for m in HEAVY if m in loaded]


def test_a_command_runs_through_the_lazy_group() -> None:
    result = CliRunner().invoke(app, ["version"])
    assert result.exit_code == 0 and result.output.strip()
    result = CliRunner().invoke(app, ["lab", "profiles", "--json"])
    assert result.exit_code == 0 and "clean" in result.output
    result = CliRunner().invoke(app, ["pss"])
    assert result.exit_code != 0 and "'ps'" in result.output


# argv samples per plain command: the fast path must pass exactly what typer passes
FAST_SAMPLES: dict[str, list[list[str]]] = {
    "ps": [["vm1"], ["/x/dump.elf", "--json", "--threads"], ["--json", "vm1", "--symbols", "k.json.xz"],
           ["vm1", "--symbols=k.json", "--no-cache"]],
    "maps": [["vm1", "12"], ["vm1", "+7", "--json"], ["vm1", "0012", "--symbols", "v"]],
    "files": [["vm1", "1", "--no-cache"]],
    "modules": [["vm1"], ["vm1", "--json", "--no-cache", "--symbols", "/boot/vmlinuz"]],
    "kernel": [["vm1", "--json"]],
    "isf": [["vm1"], ["vm1", "-o", "out/k.json"], ["vm1", "--out=k.json.xz", "--no-cache"]],
    "report": [["vm1"], ["vm1", "-f", "html", "-o", "r.html"], ["vm1", "--format", "json"]],
    "demo": [[], ["--name", "d2", "-p", "clean", "--json"]],
    "scan": [["vm1"], ["vm1", "-m", "inspect,arch", "--json", "--no-store", "--rollback", "--symbols", "k.json"]],
    "evaluate": [[], ["--no-slowdown", "--keep", "-o", "e", "--profiles", "clean"], ["--slowdown"]],
    "history": [[], ["vm1"], ["vm1", "--json"]],
    "diff": [["vm1"], ["vm1", "--old", "3", "--new", "5", "--json"]],
}
TYPER_ONLY = {"arch": ["vm1", "--cr3", "0x1000"], "watch": ["vm1", "-d", "1.5"]}  # list / float parameters
NOT_FAST = [["ps"], ["ps", "vm1", "--help"], ["ps", "vm1", "--nope"], ["ps", "vm1", "--symbols"],
            ["maps", "vm1", "x12"], ["maps", "vm1", "1_000"], ["ps", "vm1", "extra"], ["lab", "list"],
            ["ps", "vm1", "--json=1"], ["isf", "vm1", "-o", ""]]


def _typer_kwargs(name: str, argv: list[str]) -> dict[str, object]:
    """Return the keyword arguments typer itself passes to command `name` for `argv`."""
    import functools
    import importlib
    import typing

    import typer

    module, attr, _help = COMMANDS[name]
    fn = getattr(importlib.import_module(module), attr)
    seen: dict[str, object] = {}

    @functools.wraps(fn)
    def recorder(**kwargs: object) -> None:
        seen.update(kwargs)

    recorder.__annotations__ = typing.get_type_hints(fn)
    single = typer.Typer(add_completion=False)
    single.command(name)(recorder)
    result = CliRunner().invoke(single, argv)
    assert result.exit_code == 0, result.output
    return seen


def test_the_fast_path_passes_what_typer_passes() -> None:
    from nephoscope.cli.main import fast_args

    for name, samples in FAST_SAMPLES.items():
        for argv in samples:
            fast = fast_args(name, argv)
            assert fast is not None, (name, argv)
            assert fast[1] == _typer_kwargs(name, argv), (name, argv)
            assert all(type(v) is type(t) for v, t in zip(fast[1].values(), _typer_kwargs(name, argv).values(),
                                                            strict=True)), (name, argv)
    for name, argv in TYPER_ONLY.items():
        assert fast_args(name, argv) is None
    for argv in NOT_FAST:
        assert fast_args(argv[0], argv[1:]) is None, argv


def test_usage_errors_still_come_from_typer() -> None:
    result = CliRunner().invoke(app, ["maps", "vm1", "x12"])
    assert result.exit_code == 2 and "Error" in result.output
    result = CliRunner().invoke(app, ["ps"])
    assert result.exit_code == 2 and "Missing argument" in result.output


def test_the_fast_path_exits_like_typer(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    from nephoscope.cli import main

    def interrupted(**_kwargs: object) -> None:
        raise KeyboardInterrupt

    def exits(**_kwargs: object) -> None:
        raise typer.Exit(3)

    for fn, code in ((interrupted, 130), (exits, 3), (lambda **_k: None, 0)):
        with pytest.raises(SystemExit) as stopped:
            main._run(fn, {})
        assert stopped.value.code == code
