"""`nephoscope scan` exit codes through the real CLI process: what a CI job sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
SCRIPT = Path(sys.executable).with_name("nephoscope")  # the installed console script of this venv
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "nephoscope.cli.main"]


def nephoscope(*args: str, db: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh process on this tree's sources, with its own scan store."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "NEPHOSCOPE_DB": str(db)}
    return subprocess.run([*COMMAND, *args], env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def test_nothing_verifiable_exits_3_and_is_stored_flagged(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    got = nephoscope("scan", "/etc/passwd", "--fail-on", "low", db=db)
    assert got.returncode == 3, got.stderr
    assert "nothing could be verified" in got.stderr
    scans = json.loads(nephoscope("history", "--json", db=db).stdout)
    assert [s["summary"]["status"] for s in scans] == ["unverifiable"]
    as_json = nephoscope("scan", "/etc/passwd", "--json", "--no-store", db=db)
    assert as_json.returncode == 3 and json.loads(as_json.stdout)["status"] == "unverifiable"
    assert len(json.loads(nephoscope("history", "--json", db=db).stdout)) == 1  # --no-store stored nothing
    told = nephoscope("report", "passwd", "--format", "md", db=db)  # the customer is told, not given an all-clear
    assert told.returncode == 0 and "Nothing could be verified in this scan" in told.stdout
    diff = nephoscope("diff", "passwd", db=db)  # a flagged scan is no "everything gone" state to diff against
    assert diff.returncode != 0 and "that obtained something" in diff.stderr


@pytest.mark.parametrize(("args", "code"), [(["--fail-on", "severe"], 2), (["--methods", "bogus"], 2)])
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], code: int) -> None:
    got = nephoscope("scan", "/etc/passwd", *args, db=tmp_path / "s.sqlite")
    assert got.returncode == code, got.stderr
    assert not (tmp_path / "s.sqlite").exists() or "unverifiable" not in nephoscope(
        "history", "--json", db=tmp_path / "s.sqlite").stdout


def test_a_scan_that_cannot_run_exits_4(tmp_path: Path) -> None:
    got = nephoscope("scan", "no-such-vm-anywhere", db=tmp_path / "s.sqlite")
    assert got.returncode == 4 and "neither a running lab guest" in got.stderr


def test_exit_codes_are_documented() -> None:
    docs = (SRC.parent / "docs" / "methods.md").read_text()
    help_text = subprocess.run([*COMMAND, "scan", "--help"], capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "200"},
                               check=True).stdout
    for code in range(5):
        assert f"| {code} |" in docs, code
        assert f"{code} " in help_text
    assert "--fail-on" in docs and "--fail-on" in help_text
