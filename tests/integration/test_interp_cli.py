"""`nephoscope scripts` on memory dumps of the clean guest (6.1 shared or made; 6.12 when shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nephoscope.cli.main import app

pytestmark = pytest.mark.guest


STDLIB = ("libpython3.11-stdlib", "libpython3.11-minimal")


def _run(dump: Path, db: Path, *ingest: str) -> dict:
    args = ["scripts", str(dump), "--json", "--db", str(db)]
    for spec in ingest:
        args += ["--ingest", spec]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def _check(dump: Path, tmp_path: Path) -> None:
    data = _run(dump, tmp_path / "kb.sqlite")
    (server,) = [p for p in data["processes"] if p["entry"] == "/usr/lib/python3.11/http/server.py"]
    assert server["verdict"] == "verified" and server["kind"] == "python"
    frames = [f["function"] for f in server["threads"][0]["frames"]]
    assert frames[:2] == ["_PollLikeSelector.select", "BaseServer.serve_forever"]
    # an empty script DB: packaged files are unverifiable, never unknown
    assert not data["findings"]
    assert all(f["status"] == "unverifiable" for f in server["files"] if f["path"].startswith("/usr/"))
    # with the interpreter's own packages hashed, the stdlib modules it runs are identified from the page cache
    version = server["runtime"].rsplit(" ", 1)[-1].rstrip(")")
    data = _run(dump, tmp_path / "kb.sqlite", *(f"{p}={version}" for p in STDLIB))
    (server,) = [p for p in data["processes"] if p["entry"] == "/usr/lib/python3.11/http/server.py"]
    known = [f for f in server["files"] if f["status"] == "known"]
    assert len(known) >= len(server["files"]) - 2, [f for f in server["files"] if f["status"] != "known"]
    assert {f["known"][0]["package"] for f in known} == set(STDLIB)
    assert not data["findings"]


def test_scripts_on_the_61_dump(clean_dump: Path, tmp_path: Path) -> None:
    _check(clean_dump, tmp_path)


def test_scripts_on_the_612_dump(tmp_path: Path) -> None:
    dump = Path("/work/dumps/clean-6.12.elf")
    if not dump.exists():
        pytest.skip("no shared 6.12 dump")
    _check(dump, tmp_path)
