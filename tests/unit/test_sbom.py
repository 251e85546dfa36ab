"""CycloneDX 1.5 SBOM and OpenVEX 0.2.0 exports, validated against the published schemas (tests/data/schemas)."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest

from nephoscope.analysis.merge import merge
from nephoscope.core.errors import NephoscopeError
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.knowledge.vulns import VulnDB, VulnRecord
from nephoscope.service.sbom import export, purl
from nephoscope.store.sqlite import Store
from schemas import validate_cyclonedx, validate_openvex

OWNER = {"/usr/lib/x86_64-linux-gnu/libssl.so.3": "libssl3", "/usr/sbin/nginx": "nginx", "/usr/bin/bash": "bash"}.get


def _obs(vm: str, t: float, *, bash_runs: bool = False, methods: tuple[str, ...] = ("inspect", "agent")
         ) -> list[Observation]:
    def o(method: str, kind: str, key: str, data: dict, verdict: Verdict = Verdict.REPORTED) -> Observation:
        return Observation(kind, key, data, Provenance(method, vm, t), verdict, "")

    seer = methods[0]
    out = [o(seer, "process", "pid:10", {"pid": 10, "ppid": 1, "comm": "nginx", "exe": "/usr/sbin/nginx",
                                         "cmdline": ["nginx"]}, Verdict.VERIFIED),
           o(seer, "mapping", "pid:10:1", {"pid": 10, "path": "/usr/lib/x86_64-linux-gnu/libssl.so.3"},
             Verdict.VERIFIED)]
    if bash_runs:
        out.append(o(seer, "process", "pid:20", {"pid": 20, "ppid": 1, "comm": "bash", "exe": "/usr/bin/bash",
                                                 "cmdline": ["bash"]}, Verdict.VERIFIED))
    for name, version, source, arch in (("nginx", "1:1.0-1+deb12u1", "nginx", "amd64"),
                                        ("libssl3", "3.0-1", "openssl", "amd64"), ("bash", "5.0-1", "bash", "amd64"),
                                        ("tzdata", "2024a-1", "tzdata", "all")):
        out.append(o("agent", "package", f"package:{name}",
                     {"name": name, "version": version, "source": source, "arch": arch}))
    return out


def _save(store: Store, vm: str, obs: list[Observation], started: float, methods: tuple[str, ...]) -> None:
    view = merge(obs, list(methods), vm)
    store.save_scan(vm, list(methods), obs, view.findings, {"status": "ok"}, started=started)


@pytest.fixture()
def vulns(tmp_path: Path) -> VulnDB:
    db = VulnDB.open(tmp_path / "v.sqlite")
    db.replace("changelog", [VulnRecord("nginx", "CVE-2026-1111", "1:1.0-2"),
                             VulnRecord("bash", "CVE-2026-2222", "5.0-2"),
                             VulnRecord("tzdata", "CVE-2026-4444", None)])
    db.replace("debian-tracker", [VulnRecord("openssl", "CVE-2026-3333", "3.0-5")])
    return db


def test_purl() -> None:
    assert purl("nginx", "1.22.1-9+deb12u3") == "pkg:deb/debian/nginx@1.22.1-9%2Bdeb12u3?arch=amd64"
    assert purl("libc6", "1:2.36-9", "all") == "pkg:deb/debian/libc6@1%3A2.36-9?arch=all"


def test_cyclonedx_lists_what_runs_with_evidence(tmp_path: Path, vulns: VulnDB) -> None:
    store = Store(tmp_path / "s.sqlite")
    _save(store, "vm-a", _obs("vm-a", 100.0), 100.0, ("inspect", "agent"))
    doc = export("vm-a", "cyclonedx", store=store, vulns=vulns, owner=OWNER)
    validate_cyclonedx(doc)
    by_name = {c["name"]: c for c in doc["components"]}
    assert set(by_name) == {"nginx", "libssl3"}  # bash and tzdata are installed, not running: not in the SBOM
    nginx = by_name["nginx"]
    assert nginx["purl"] == "pkg:deb/debian/nginx@1%3A1.0-1%2Bdeb12u1?arch=amd64" and nginx["type"] == "application"
    assert nginx["evidence"]["occurrences"] == [{"location": "/usr/sbin/nginx"}]
    techniques = {m["technique"] for m in nginx["evidence"]["identity"]["methods"]}
    assert techniques == {"dynamic-analysis"}  # inspect saw the path; the version is dpkg's word
    assert by_name["libssl3"]["type"] == "library"
    with pytest.raises(jsonschema.ValidationError):  # the schema is really checked
        validate_cyclonedx({**doc, "components": [{**nginx, "type": "daemon"}]})


def test_openvex_affected_not_affected_window(tmp_path: Path, vulns: VulnDB) -> None:
    store = Store(tmp_path / "s.sqlite")
    _save(store, "vm-a", _obs("vm-a", 100.0), 100.0, ("inspect", "agent"))
    _save(store, "vm-a", _obs("vm-a", 200.0), 200.0, ("inspect", "agent"))
    doc = export("vm-a", "openvex", store=store, vulns=vulns, owner=OWNER)
    validate_openvex(doc)
    status = {(s["vulnerability"]["name"], s["products"][0]["@id"]): s for s in doc["statements"]}
    nginx = status[("CVE-2026-1111", purl("nginx", "1:1.0-1+deb12u1"))]
    assert nginx["status"] == "affected" and "1:1.0-2" in nginx["action_statement"]
    assert status[("CVE-2026-3333", purl("libssl3", "3.0-1"))]["status"] == "affected"
    bash = status[("CVE-2026-2222", purl("bash", "5.0-1"))]
    assert bash["status"] == "not_affected" and bash["justification"] == "vulnerable_code_not_in_execute_path"
    assert "2 scan(s) from 1970-01-01T00:01:40Z to 1970-01-01T00:03:20Z" in bash["status_notes"]
    assert status[("CVE-2026-4444", purl("tzdata", "2024a-1", "all"))]["status"] == "not_affected"
    with pytest.raises(jsonschema.ValidationError):  # not_affected without a justification is refused
        validate_openvex({**doc, "statements": [{k: v for k, v in bash.items() if k != "justification"}]})


def test_openvex_code_that_ran_earlier_is_affected(tmp_path: Path, vulns: VulnDB) -> None:
    store = Store(tmp_path / "s.sqlite")
    _save(store, "vm-a", _obs("vm-a", 100.0, bash_runs=True), 100.0, ("inspect", "agent"))
    _save(store, "vm-a", _obs("vm-a", 200.0), 200.0, ("inspect", "agent"))
    doc = export("vm-a", "openvex", store=store, vulns=vulns, owner=OWNER)
    validate_openvex(doc)
    bash = next(s for s in doc["statements"] if s["vulnerability"]["name"] == "CVE-2026-2222")
    assert bash["status"] == "affected" and "1970-01-01T00:01:40Z" in bash["status_notes"]


def test_openvex_agent_only_window_claims_nothing(tmp_path: Path, vulns: VulnDB) -> None:
    store = Store(tmp_path / "s.sqlite")
    _save(store, "vm-a", _obs("vm-a", 100.0, methods=("agent",)), 100.0, ("agent",))
    doc = export("vm-a", "openvex", store=store, vulns=vulns, owner=OWNER)
    validate_openvex(doc)
    bash = next(s for s in doc["statements"] if s["vulnerability"]["name"] == "CVE-2026-2222")
    assert bash["status"] == "under_investigation"
    assert not any(s["status"] == "not_affected" for s in doc["statements"])


def test_exports_need_a_scan(tmp_path: Path, vulns: VulnDB) -> None:
    with pytest.raises(NephoscopeError, match="no stored scan"):
        export("nope", "openvex", store=Store(tmp_path / "s.sqlite"), vulns=vulns, owner=OWNER)
