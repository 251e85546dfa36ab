"""`scan --fail-on` counts every finding the user is told of: the scan's, CVEs of running code, YARA matches.

The real dump cases are in tests/integration/test_scan_gate_dump.py; `--all --notify` in test_scan_all_notify.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nephoscope.analysis.malware import rule_severity
from nephoscope.analysis.merge import merge
from nephoscope.cli import scan as scan_cli
from nephoscope.cli.main import app
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.hypervisor.target import VmTarget
from nephoscope.knowledge.vulns import VulnDB, VulnRecord
from nephoscope.service.gate import at_or_above, gate_result
from nephoscope.service.scan import ScanResult


def _vulns(path: Path, records: list[VulnRecord]) -> Path:
    db = VulnDB.open(path)
    db.replace("changelog", records)
    return path


def _said(got: object) -> str:
    return " ".join(got.stderr.split())  # type: ignore[attr-defined]


def _synthetic(vm: str, nginx: str = "1.0-1") -> ScanResult:
    """Return a scan in which the agent saw nginx `nginx` running (an agent-only view: no code finding)."""
    def o(kind: str, key: str, data: dict) -> Observation:
        return Observation(kind, key, data, Provenance("agent", vm, 1.0), Verdict.REPORTED, "")

    obs = [o("process", "pid:10", {"pid": 10, "ppid": 1, "comm": "nginx", "exe": "/usr/sbin/nginx",
                                   "cmdline": ["nginx"]}),
           o("mapping", "pid:10:1", {"pid": 10, "path": "/usr/sbin/nginx"}),
           o("package", "package:nginx", {"name": "nginx", "version": nginx, "source": "nginx"}),
           o("package", "package:bash", {"name": "bash", "version": "5.0-1", "source": "bash"})]
    return ScanResult(VmTarget(vm, live=False), merge(obs, ["agent"], vm), obs)


@pytest.fixture()
def knowledge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A vulnerability DB where nginx 1.0-1 and bash 5.0-1 have CVEs; the owner of /usr/sbin/nginx is nginx."""
    path = _vulns(tmp_path / "v.sqlite", [VulnRecord("nginx", "CVE-2026-1111", "1.0-2"),
                                          VulnRecord("bash", "CVE-2026-2222", "5.0-2")])
    monkeypatch.setenv("NEPHOSCOPE_VULNS", str(path))
    monkeypatch.setenv("NEPHOSCOPE_DB", str(tmp_path / "s.sqlite"))
    monkeypatch.setattr("nephoscope.service.report.kb_owner", lambda: {"/usr/sbin/nginx": "nginx"}.get)
    return path


def test_the_scale_cves_running_high_installed_medium(knowledge: Path) -> None:
    result = _synthetic("vm-a")
    assert result.findings_at_or_above("low") == []  # the scan's own view has nothing: the old gate passed
    report, gate = gate_result(result, "high")
    assert "findings" not in report.to_dict()  # the raw findings never reach the customer's report
    assert [(f.severity, f.kind) for f in gate.findings] == [("high", "running-vulnerable")]
    assert "CVE-2026-1111" in json.dumps(gate.findings[0].evidence) and not gate.unchecked
    _report, medium = gate_result(result, "medium")
    assert [(f.severity, f.kind) for f in medium.findings] == [("high", "running-vulnerable"),
                                                               ("medium", "installed-vulnerable")]
    assert not gate_result(result, "critical")[1].failed
    fixed = gate_result(_synthetic("vm-a", nginx="1.0-2"), "high")[1]  # the fixed version runs: no CVE
    assert not fixed.failed


def test_rule_severity_meta_and_default() -> None:
    assert rule_severity({"severity": " Critical "}) == "critical"
    assert rule_severity({"severity": "low"}) == "low"
    assert rule_severity({}) == "high" and rule_severity({"severity": "severe"}) == "high"
    assert at_or_above([], "low") == []


def test_single_vm_exit_message_names_the_cve_findings(knowledge: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan_cli, "scan_vm", lambda spec, *a, **k: _synthetic(spec))
    got = CliRunner().invoke(app, ["scan", "vm-a", "--fail-on", "high", "--no-store"])
    assert got.exit_code == 1, got.output
    said = _said(got)
    assert "vm-a: 1 finding(s) at or above high (exit status 1):" in said
    assert "high running-vulnerable: nginx 1.0-1 is executing" in said and "installed-vulnerable" not in said
    as_json = CliRunner().invoke(app, ["scan", "vm-a", "--fail-on", "medium", "--no-store", "--json"])
    assert as_json.exit_code == 1
    gate = json.loads(as_json.stdout)["fail_on"]
    assert [f["kind"] for f in gate["findings"]] == ["running-vulnerable", "installed-vulnerable"]
    assert gate["failed"] and gate["error"] is None
    assert CliRunner().invoke(app, ["scan", "vm-a", "--fail-on", "critical", "--no-store"]).exit_code == 0


def test_what_was_not_checked_is_said(tmp_path: Path, knowledge: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEPHOSCOPE_VULNS", str(_vulns(tmp_path / "empty.sqlite", [])))
    monkeypatch.setattr(scan_cli, "scan_vm", lambda spec, *a, **k: _synthetic(spec))
    got = CliRunner().invoke(app, ["scan", "vm-a", "--fail-on", "low", "--no-store"])
    assert got.exit_code == 0, got.output  # nothing found, but not silently: the CVE check could not run
    assert "vm-a: not checked for --fail-on: vulnerabilities (knowledge: the vulnerability knowledge is empty" \
        in _said(got)


def test_a_gate_that_cannot_be_evaluated_is_no_pass(knowledge: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nephoscope.core.errors import KnowledgeError

    def broken(*_a: object, **_k: object) -> VulnDB:
        raise KnowledgeError("vulnerability DB is corrupt")

    monkeypatch.setattr(scan_cli, "scan_vm", lambda spec, *a, **k: _synthetic(spec))
    monkeypatch.setattr(VulnDB, "open", broken)
    got = CliRunner().invoke(app, ["scan", "vm-a", "--fail-on", "high", "--no-store"])
    assert got.exit_code == 4 and "--fail-on could not be checked" in _said(got) and "corrupt" in _said(got)
