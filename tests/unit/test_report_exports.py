"""`nephoscope report VM --sbom FILE --vex FILE`: the SBOM and VEX written alongside the report, all or nothing.

The documents are validated against the published schemas (tests/data/schemas) and compared with what the
stored scans' own observations say runs and is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_sbom import OWNER, _obs, _save
from typer.testing import CliRunner

from nephoscope.cli.main import app
from nephoscope.core.payloads import Package, Process
from nephoscope.knowledge.vulns import VulnDB, VulnRecord
from nephoscope.service import sbom as sbom_service
from nephoscope.service.sbom import purl
from nephoscope.store.sqlite import Store
from schemas import validate_cyclonedx, validate_openvex


@pytest.fixture()
def stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """Two stored inspect+agent scans of vm-a (bash ran only in the first), a vulnerability DB, the owner map."""
    db = VulnDB.open(tmp_path / "v.sqlite")
    db.replace("changelog", [VulnRecord("nginx", "CVE-2026-1111", "1:1.0-2"),
                             VulnRecord("bash", "CVE-2026-2222", "5.0-2")])
    db.replace("debian-tracker", [VulnRecord("openssl", "CVE-2026-3333", "3.0-5")])
    monkeypatch.setenv("NEPHOSCOPE_DB", str(tmp_path / "s.sqlite"))
    monkeypatch.setenv("NEPHOSCOPE_VULNS", str(tmp_path / "v.sqlite"))
    monkeypatch.setattr(sbom_service, "kb_owner", lambda: OWNER)  # the code-page DB's path -> package
    monkeypatch.setattr("nephoscope.service.report.kb_owner", lambda: OWNER)
    store = Store(tmp_path / "s.sqlite")
    _save(store, "vm-a", _obs("vm-a", 100.0, bash_runs=True), 100.0, ("inspect", "agent"))
    _save(store, "vm-a", _obs("vm-a", 200.0), 200.0, ("inspect", "agent"))
    return store


def _invoke(*args: str) -> object:
    return CliRunner().invoke(app, ["report", *args])


def _said(got: object) -> str:
    """Return what the command printed, with rich's line wrapping undone."""
    return " ".join(got.output.split())  # type: ignore[attr-defined]


def _truth(store: Store) -> tuple[dict[str, str], set[str]]:
    """Return installed package -> version and the executables running, from the latest stored scan itself."""
    rec = store.scans("vm-a", limit=1)[0]
    obs = store.load_observations(rec.id, "vm-a")
    installed = {o.payload.name: o.payload.version for o in obs if isinstance(o.payload, Package)}
    running = {o.payload.exe for o in obs if isinstance(o.payload, Process)}
    return installed, running


def test_report_sbom_and_vex_written_alongside(stored: Store, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    got = _invoke("vm-a", "-f", "md", "-o", str(out / "r.md"), "--sbom", str(out / "s.cdx.json"),
                  "--vex", str(out / "v.vex.json"))
    assert got.exit_code == 0, got.output
    assert sorted(p.name for p in out.iterdir()) == ["r.md", "s.cdx.json", "v.vex.json"]  # no temporary left
    assert (out / "r.md").read_text().startswith("# Security report for vm-a")
    installed, running = _truth(stored)
    bom = json.loads((out / "s.cdx.json").read_text())
    validate_cyclonedx(bom)
    by_name = {c["name"]: c for c in bom["components"]}
    # the latest scan runs /usr/sbin/nginx (which maps libssl.so.3); bash ran only in the first scan
    assert running == {"/usr/sbin/nginx"} and set(by_name) == {"nginx", "libssl3"}
    assert {n: c["version"] for n, c in by_name.items()} == {n: installed[n] for n in by_name}
    assert by_name["nginx"]["purl"] == purl("nginx", installed["nginx"])
    assert bom["metadata"]["properties"][0] == {"name": "nephoscope:scan",
                                                "value": str(stored.scans("vm-a", limit=1)[0].id)}
    vex = json.loads((out / "v.vex.json").read_text())
    validate_openvex(vex)
    status = {(s["vulnerability"]["name"], s["products"][0]["@id"]): s["status"] for s in vex["statements"]}
    assert status == {("CVE-2026-1111", purl("nginx", installed["nginx"])): "affected",
                      ("CVE-2026-3333", purl("libssl3", installed["libssl3"])): "affected",
                      ("CVE-2026-2222", purl("bash", installed["bash"])): "affected"}  # ran in the window


def test_same_documents_as_the_format_exports(stored: Store, tmp_path: Path) -> None:
    assert _invoke("vm-a", "-f", "cyclonedx", "-o", str(tmp_path / "a.json")).exit_code == 0
    got = _invoke("vm-a", "-f", "json", "-o", str(tmp_path / "r.json"), "--sbom", str(tmp_path / "b.json"))
    assert got.exit_code == 0, got.output
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert {**a, "serialNumber": ""} == {**b, "serialNumber": ""}
    assert json.loads((tmp_path / "r.json").read_text())["vm"] == "vm-a"


def test_dash_is_stdout_when_the_report_goes_to_a_file(stored: Store, tmp_path: Path) -> None:
    got = _invoke("vm-a", "-f", "json", "-o", str(tmp_path / "r.json"), "--vex", "-")
    assert got.exit_code == 0, got.output
    validate_openvex(json.loads(got.stdout))
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["running_vulnerable"] == 2
    both = _invoke("vm-a", "-f", "cyclonedx", "-o", str(tmp_path / "s.json"), "--vex", "-")
    assert both.exit_code == 0
    validate_openvex(json.loads(both.stdout))
    validate_cyclonedx(json.loads((tmp_path / "s.json").read_text()))


@pytest.mark.parametrize("args", [["--sbom", "-"], ["-o", "-", "--vex", "-"], ["-o", "r", "--sbom", "-", "--vex", "-"],
                                  ["-o", "x.md", "--sbom", "x.md"]])
def test_two_documents_in_one_place_are_refused(stored: Store, tmp_path: Path, args: list[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    got = _invoke("vm-a", "-f", "md", *args)
    assert got.exit_code == 2, got.output
    assert not (tmp_path / "x.md").exists() and not (tmp_path / "r").exists()


def test_unwritable_paths_fail_clearly_and_write_nothing(stored: Store, tmp_path: Path) -> None:
    report = tmp_path / "r.md"
    report.write_text("old report\n")
    (tmp_path / "plain").write_text("a file, not a directory")
    for bad, why in ((tmp_path / "missing" / "s.json", "does not exist"),
                     (tmp_path / "plain" / "s.json", "does not exist"),
                     (tmp_path, "is a directory")):
        got = _invoke("vm-a", "-f", "md", "-o", str(report), "--sbom", str(bad))
        assert got.exit_code == 1 and why in _said(got), got.output
        assert report.read_text() == "old report\n"
    # /proc accepts no new file even for root: the failure comes at write time, after the report was staged
    got = _invoke("vm-a", "-f", "md", "-o", str(report), "--vex", "/proc/nephoscope-vex.json")
    assert got.exit_code == 1 and "cannot write the VEX document to /proc/nephoscope-vex.json" in _said(got)
    assert report.read_text() == "old report\n" and sorted(p.name for p in tmp_path.iterdir() if
                                                           p.name.startswith(".")) == []


def test_a_document_that_cannot_be_built_leaves_the_old_files(stored: Store, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    VulnDB.open(tmp_path / "empty.sqlite")
    monkeypatch.setenv("NEPHOSCOPE_VULNS", str(tmp_path / "empty.sqlite"))  # no CVE: no VEX statement
    report = tmp_path / "r.md"
    report.write_text("old report\n")
    report.chmod(0o640)
    got = _invoke("vm-a", "-f", "md", "-o", str(report), "--sbom", str(tmp_path / "s.json"),
                  "--vex", str(tmp_path / "v.json"))
    assert got.exit_code == 1 and "needs at least one statement" in _said(got)
    assert report.read_text() == "old report\n" and not (tmp_path / "s.json").exists()
    got = _invoke("vm-a", "-f", "md", "-o", str(report), "--sbom", str(tmp_path / "s.json"))
    assert got.exit_code == 0, got.output
    assert report.read_text().startswith("# Security report") and report.stat().st_mode & 0o777 == 0o640
    validate_cyclonedx(json.loads((tmp_path / "s.json").read_text()))


def test_exports_need_a_stored_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEPHOSCOPE_DB", str(tmp_path / "s.sqlite"))
    got = _invoke("nope", "-o", str(tmp_path / "r.md"), "--sbom", str(tmp_path / "s.json"))
    assert got.exit_code == 1 and "no stored scan" in _said(got)
    assert not (tmp_path / "r.md").exists()


def test_options_are_documented() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "sbom.md").read_text()
    for option in ("--sbom", "--vex", "atomic", "stdout"):
        assert option in docs, option
