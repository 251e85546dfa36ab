"""The `nephoscope vulns` and `report` commands, in-process, and that docs/vulns.md documents them."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from nephoscope.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_import_stats_check(tmp_path: Path) -> None:
    db = str(tmp_path / "v.sqlite")
    feed = tmp_path / "t.json"
    feed.write_text(json.dumps({"nginx": {"CVE-2026-1": {"releases": {"bookworm": {
        "status": "resolved", "fixed_version": "1.22.1-9+deb12u10", "urgency": "high"}}}}}))
    assert runner.invoke(app, ["vulns", "import-debian-tracker", str(feed), "--db", db, "--json"]).exit_code == 0
    out = runner.invoke(app, ["vulns", "check", "nginx", "1.22.1-9+deb12u9", "--db", db, "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["cves"][0]["fixed"] == "1.22.1-9+deb12u10"
    out = runner.invoke(app, ["vulns", "check", "nginx", "1.22.1-9+deb12u10", "--db", db, "--json"])
    assert json.loads(out.stdout)["cves"] == []
    assert json.loads(runner.invoke(app, ["vulns", "stats", "--db", db, "--json"]).stdout)["records"] == 1
    feed.write_text("[1, 2]")
    bad = runner.invoke(app, ["vulns", "import-osv", str(feed), "--db", db])
    assert bad.exit_code == 1 and "malformed feed" in bad.output


def test_commands_documented() -> None:
    doc = (ROOT / "docs" / "vulns.md").read_text()
    for cmd in ("vulns update", "vulns import-debian-tracker", "vulns import-osv", "vulns stats", "vulns check",
                "nephoscope report"):
        assert cmd in doc, cmd
