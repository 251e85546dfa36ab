"""`scan --fail-on` on the dump of the tampered lab guest: YARA and CVE findings fail the scan, single and --all.

The dump is the shared one, else one made from a booted guest; what it shows is compared with the guest's
manifest: the injected code in the `code-injection` process matches the shipped YARA rule (severity
critical), and the nginx the manifest runs is vulnerable once the knowledge says so. The scan's own view
has neither finding, so a gate over the view alone (before) passed both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nephoscope.cli.main import app
from nephoscope.hypervisor import discover as d
from nephoscope.hypervisor.target import VmTarget
from nephoscope.knowledge.vulns import VulnDB, VulnRecord

pytestmark = pytest.mark.guest  # boots the tampered guest when the shared dump is not here
SHARED = Path(os.environ.get("NEPHOSCOPE_DUMPS", "/work/dumps")) / "tampered-6.1.elf"


@pytest.fixture(scope="module")
def tampered(request: pytest.FixtureRequest) -> tuple[Path, dict]:
    """Return the tampered guest's dump and its manifest (the shared dump, else dumped from a booted guest)."""
    if SHARED.is_file() and SHARED.with_name("tampered-6.1.manifest.json").is_file():
        return SHARED, json.loads(SHARED.with_name("tampered-6.1.manifest.json").read_text())
    request.getfixturevalue("default_kb")
    guest = request.getfixturevalue("tampered_guest")
    return request.getfixturevalue("tampered_dump"), guest.manifest()


def _vulns(path: Path, records: list[VulnRecord]) -> Path:
    db = VulnDB.open(path)
    db.replace("changelog", records)
    return path


def _said(got: object) -> str:
    return " ".join(got.stderr.split())  # type: ignore[attr-defined]


def test_real_dump_yara_and_cve_findings_fail_the_scan(tampered: tuple[Path, dict], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    dump, manifest = tampered
    nginx = manifest["packages"]["nginx"]
    monkeypatch.setenv("NEPHOSCOPE_VULNS", str(_vulns(tmp_path / "v.sqlite", [
        VulnRecord("nginx", "CVE-2026-7777", nginx + "+fix1")])))  # the running version is below the fix
    got = CliRunner().invoke(app, ["scan", str(dump), "-m", "arch,inspect", "--no-store", "--json",
                                   "--fail-on", "high"])
    assert got.exit_code == 1, got.output
    doc = json.loads(got.stdout)
    injected = next(t["pid"] for t in manifest["techniques"] if t["id"] == "code-injection")
    view = [(f["severity"], f["kind"]) for f in doc["findings"]]
    assert ("critical", "malicious-code") not in view and not any(k == "running-vulnerable" for _s, k in view)
    gate = doc["fail_on"]["findings"]
    yara = [f for f in gate if f["kind"] == "malicious-code" and f["severity"] == "critical"]
    assert len(yara) == 1 and f"(pid {injected})" in yara[0]["title"]
    assert "YARA rule nephoscope_injected_stub" in yara[0]["title"]
    vulnerable = [f for f in gate if f["kind"] == "running-vulnerable"]
    assert [f["title"].split(" is executing")[0] for f in vulnerable] == [f"nginx {nginx}"]
    assert vulnerable[0]["severity"] == "high" and not doc["fail_on"]["unchecked"]
    assert all(f["severity"] in ("critical", "high") for f in gate)
    assert gate[0]["severity"] == "critical"  # most severe first


def test_real_dump_in_all_mode(tampered: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dump, manifest = tampered
    monkeypatch.setenv("NEPHOSCOPE_VULNS", str(_vulns(tmp_path / "v.sqlite", [])))
    vms = [d.HostVm("web-1", "qemu", VmTarget("web-1", ram_path=dump, live=False), pid=11),
           d.HostVm("off", "libvirt", VmTarget("off", domain="u-3", live=False), uuid="u-3", state="shutoff")]
    monkeypatch.setattr(d, "discover", lambda uri=None, proc_root=None: d.Discovery(vms, {}))
    got = CliRunner().invoke(app, ["scan", "--all", "-m", "arch,inspect", "--no-store", "--fail-on", "critical"])
    assert got.exit_code == 1, got.output
    injected = next(t["pid"] for t in manifest["techniques"] if t["id"] == "code-injection")
    said = _said(got)
    assert "web-1: 1 finding(s) at or above critical (exit status 1):" in said
    assert "critical malicious-code: executable code in no known binary" in said and f"(pid {injected})" in said
    assert "web-1: not checked for --fail-on: vulnerabilities" in said  # the knowledge here is empty
