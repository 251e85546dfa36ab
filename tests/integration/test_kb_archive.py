"""`kb add-archive` against the real archive (no VM): selection, parallel ingest, resume, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from nephoscope.cli.main import app
from nephoscope.knowledge.binaries import CodePageDB
from nephoscope.knowledge.debian import archive
from nephoscope.knowledge.sync import archive_selection


def _invoke(args: list[str], kb: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*args, "--kb", str(kb)], catch_exceptions=False)
    return result.exit_code, result.output


def test_add_archive_ingests_every_version_and_a_rerun_skips_them(tmp_path: Path) -> None:
    kb = tmp_path / "kb.sqlite"
    names = tmp_path / "names.txt"
    names.write_text("# owner's list\npv\ntree  # a comment\n")
    code, out = _invoke(["kb", "add-archive", "--from-file", str(names), "--dry-run", "--json"], kb)
    assert code == 0, out
    wanted = {(r["package"], r["version"]) for r in json.loads(out)}
    assert wanted == {(n, v) for n in ("pv", "tree") for v in archive.available_versions(n)}
    code, out = _invoke(["kb", "add-archive", "--from-file", str(names), "--jobs", "2", "--json"], kb)
    assert code == 0, out
    report = json.loads(out)
    assert report["errors"] == [] and report["pages_added"] > 0
    db = CodePageDB.open(kb)
    assert all(db.has_package(n, v) for n, v in wanted)
    assert {p for (_, _, p, _) in db.find_files("/usr/bin/pv")} == {"pv"}
    code, out = _invoke(["kb", "add-archive", "pv", "tree", "--json"], kb)
    assert code == 0 and json.loads(out)["pages_added"] == 0  # resumable: nothing downloaded again


def test_add_archive_names_what_is_wrong(tmp_path: Path) -> None:
    code, out = _invoke(["kb", "add-archive", "no-such-package-xyz"], tmp_path / "kb.sqlite")
    assert code == 1 and "apt knows no package 'no-such-package-xyz'" in out
    code, out = _invoke(["kb", "add-archive"], tmp_path / "kb.sqlite")
    assert code == 1 and "nothing to add" in out
    code, out = _invoke(["kb", "add-archive", "--priority", "urgent"], tmp_path / "kb.sqlite")
    assert code == 1 and "unknown priority" in out


def test_priority_selection_takes_the_more_important_priorities() -> None:
    required = {n for n, _ in archive_selection("required", newest=True)}
    important = {n for n, _ in archive_selection("important", newest=True)}
    assert {"coreutils", "bash", "dpkg"} <= required < important
    assert {n for n, _ in archive_selection("required", "shells", newest=True)} <= required
    assert "bash" in {n for n, _ in archive_selection("required", "shells", newest=True)}
