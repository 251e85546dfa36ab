"""`scan --all --notify`: each scanned VM's tenant is notified right after its scan; one VM's error stops no other.

Notices are received by a real SMTP server (aiosmtpd) and a webhook receiver (tests/receivers.py); the
scans are agent-only views of a vulnerable nginx (no guest needed), stored for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nephoscope.analysis.merge import merge
from nephoscope.cli.main import app
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.hypervisor import discover as d
from nephoscope.hypervisor.target import VmTarget
from nephoscope.knowledge.vulns import VulnDB, VulnRecord
from nephoscope.response.notices import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from nephoscope.service import notices as notices_service
from nephoscope.service import scan as scan_service
from receivers import Hook, Mailbox, smtp_server, webhook_receiver

SECRET = "acme-tenant-secret-0123"


def _tenants(box: Mailbox, hook: Hook) -> str:
    """acme owns vm-a and vm-b; `clash` also claims vm-a (a configuration error for vm-a only); vm-c is nobody's."""
    return f"""
[smtp]
host = "127.0.0.1"
port = {box.port}
sender = "nephoscope@provider.example"

[tenants.acme]
vms = ["vm-a", "vm-b"]
emails = ["secops@acme.example"]
webhook = "{hook.url}"
secret = "{SECRET}"

[tenants.clash]
vms = ["vm-a*"]
emails = ["soc@clash.example"]
"""


def _result(vm: VmTarget) -> scan_service.ScanResult:
    def o(kind: str, key: str, data: dict) -> Observation:
        return Observation(kind, key, data, Provenance("agent", vm.name, 1.0), Verdict.REPORTED, "")

    obs = [o("process", "pid:10", {"pid": 10, "ppid": 1, "comm": "nginx", "exe": "/usr/sbin/nginx",
                                   "cmdline": ["nginx"]}),
           o("mapping", "pid:10:1", {"pid": 10, "path": "/usr/sbin/nginx"}),
           o("package", "package:nginx", {"name": "nginx", "version": "1.0-1", "source": "nginx"})]
    return scan_service.ScanResult(vm, merge(obs, ["agent"], vm.name), obs)


@pytest.fixture()
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Four host VMs (one shut off), each scan faked as an agent view; return the events in order."""
    db = VulnDB.open(tmp_path / "v.sqlite")
    db.replace("changelog", [VulnRecord("nginx", "CVE-2026-1111", "1.0-2")])
    monkeypatch.setenv("NEPHOSCOPE_VULNS", str(tmp_path / "v.sqlite"))
    monkeypatch.setenv("NEPHOSCOPE_DB", str(tmp_path / "s.sqlite"))
    monkeypatch.setenv("NEPHOSCOPE_TENANTS", str(tmp_path / "tenants.toml"))
    monkeypatch.setattr("nephoscope.service.report.kb_owner", lambda: {"/usr/sbin/nginx": "nginx"}.get)
    vms = [d.HostVm(n, "qemu", VmTarget(n, live=False), pid=10 + i) for i, n in enumerate(("vm-a", "vm-b", "vm-c"))]
    vms.append(d.HostVm("off", "libvirt", VmTarget("off", domain="u-3", live=False), uuid="u-3", state="shutoff"))
    monkeypatch.setattr(d, "discover", lambda uri=None, proc_root=None: d.Discovery(vms, {}))
    events: list[tuple[str, str]] = []
    real_notify = notices_service.notify_report

    def run_scan(vm: VmTarget, *_a: object, store: object = None, **_k: object) -> scan_service.ScanResult:
        events.append(("scan", vm.name))
        result = _result(vm)
        if store is not None:
            scan_service.save_result(result, store, 1.0)  # type: ignore[arg-type]
        return result

    def notify_report(report: object, *args: object, **kwargs: object) -> object:
        events.append(("notice", report.vm))  # type: ignore[attr-defined]
        return real_notify(report, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(scan_service, "run_scan", run_scan)
    monkeypatch.setattr(notices_service, "notify_report", notify_report)
    return events


def test_each_vm_notified_after_its_scan_errors_isolated(host: list[tuple[str, str]], tmp_path: Path) -> None:
    with smtp_server() as box, webhook_receiver() as hook:
        (tmp_path / "tenants.toml").write_text(_tenants(box, hook))
        got = CliRunner().invoke(app, ["scan", "--all", "--notify", "--json", "--fail-on", "high"])
        assert got.exit_code == 1, got.output  # the running vulnerable nginx; a notice error changes nothing
        assert host == [("scan", "vm-a"), ("notice", "vm-a"), ("scan", "vm-b"), ("notice", "vm-b"),
                        ("scan", "vm-c"), ("notice", "vm-c")]  # each notice before the next VM's scan
        by_vm = {v["vm"]: v for v in json.loads(got.stdout)["vms"]}
        assert "matches tenants acme, clash" in by_vm["vm-a"]["notice"]["error"]
        sent = by_vm["vm-b"]["notice"]
        assert sent["error"] is None and sent["tenant"] == "acme"
        assert [(x["channel"], x["status"], x["event"]) for x in sent["deliveries"]] == [
            ("email", "sent", "problem"), ("webhook", "sent", "problem")]
        assert by_vm["vm-c"]["notice"]["reason"] == "no tenant owns this VM (tenants file)"
        assert "notice" not in by_vm["off"] and by_vm["off"]["status"] == "error"
        assert [f["kind"] for f in by_vm["vm-b"]["fail_on"]["findings"]] == ["running-vulnerable"]
        # what the receivers got: one mail to acme, one webhook signed with acme's secret, both about vm-b only
        assert box.recipients == [["secops@acme.example"]] and "vm-b" in box.messages[0]["Subject"]
        assert len(hook.requests) == 1
        headers, body = hook.requests[0]
        assert verify_signature(SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
        doc = json.loads(body)
        assert doc["vm"] == "vm-b" and [p["kind"] for p in doc["problems"]] == ["running-vulnerable"]
        again = CliRunner().invoke(app, ["scan", "--all", "--notify", "--json"])
        assert again.exit_code == 0, again.output
        by_vm = {v["vm"]: v for v in json.loads(again.stdout)["vms"]}
        assert by_vm["vm-b"]["notice"]["reason"] == "unchanged since the last notice"
        assert by_vm["vm-b"]["notice"]["deliveries"] == [] and len(hook.requests) == 1
        assert "fail_on" not in by_vm["vm-b"]


def test_table_has_a_notice_column(host: list[tuple[str, str]], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # one table row a line
    got = CliRunner().invoke(app, ["scan", "--all", "--notify"])  # no tenants file: notices not configured
    assert got.exit_code == 0, got.output
    header = next(line for line in got.stdout.splitlines() if " vm " in line and " exit" in line)
    assert "notice" in header
    assert got.stdout.count("no tenants file") == 3, got.stdout  # vm-a, vm-b, vm-c; not the shut-off one


def test_a_broken_tenants_file_is_reported_per_vm_and_the_sweep_goes_on(host: list[tuple[str, str]],
                                                                          tmp_path: Path) -> None:
    (tmp_path / "tenants.toml").write_text("[tenants.x\n")
    got = CliRunner().invoke(app, ["scan", "--all", "--notify", "--json"])
    assert got.exit_code == 0, got.output
    vms = json.loads(got.stdout)["vms"]
    assert [v["vm"] for v in vms if v.get("notice", {}).get("error", "").startswith("tenants file:")] == [
        "vm-a", "vm-b", "vm-c"]
    assert [e for e in host if e[0] == "scan"] == [("scan", "vm-a"), ("scan", "vm-b"), ("scan", "vm-c")]


def test_notify_is_documented_for_all() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "notices.md").read_text()
    assert "scan --all --notify" in docs and "is not wired" not in docs
