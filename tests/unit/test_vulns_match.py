"""Matching the clean lab image's running code against CVEs from the real Debian changelogs.

The expectations come from the newest .debs' changelogs, read here with python-debian directly: every
CVE named in an entry newer than the running version (and up to the newest) must be reported.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from debian.changelog import Changelog
from debian.debian_support import Version

from nephoscope.analysis.merge import BinaryView, ProcessView, ScanView
from nephoscope.analysis.vulnerable import INSTALLED, RUNNING, Installed, vulnerable_findings
from nephoscope.core.paths import cache_root
from nephoscope.knowledge.debian import archive
from nephoscope.knowledge.feeds import CVE_RE, HarvestReport, harvest
from nephoscope.knowledge.vulns import VulnIndex, VulnRecord
from nephoscope.lab.build import Image

ROOT = Path(__file__).resolve().parents[2]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_vulns", ROOT / "bench" / "vulns.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _bench()


def expected_cves(package: str, running: str) -> set[str]:
    """Return CVEs the newest changelog of `package` lists as fixed after `running`."""
    newest = archive.available_versions(package)[0]
    root = archive.unpack(archive.download(package, newest, cache_root() / "debs"), cache_root() / "unpacked") / "root"
    text = gzip.decompress((root / "usr/share/doc" / package / "changelog.Debian.gz").read_bytes()).decode()
    return {cve for block in Changelog(text) if Version(running) < block.version <= Version(newest)
            for cve in CVE_RE.findall("\n".join(block.changes()))}


@pytest.fixture(scope="module")
def knowledge() -> HarvestReport:
    return harvest(["nginx", "libssl3", "openssl"])


@pytest.fixture(scope="module")
def lab(clean_image: Image) -> tuple[ScanView, dict[str, Installed]]:
    return bench.lab_view(clean_image), bench.lab_installed(clean_image)


def _by_package(findings: list) -> dict[tuple[str, str], dict]:
    return {(f.kind, f.evidence[0]["package"]): f.evidence[0] for f in findings}


def test_running_old_versions_are_vulnerable(clean_image: Image, knowledge: HarvestReport,
                                              lab: tuple[ScanView, dict[str, Installed]]) -> None:
    view, installed = lab
    findings = vulnerable_findings(view, installed, VulnIndex(knowledge.records), "clean",
                                   sources=knowledge.binaries)
    got = _by_package(findings)
    versions = clean_image.meta["packages"]
    nginx_pids = {p.pid for p in view.processes.values() if p.exe == "/usr/sbin/nginx"}
    ssl_pids = {p.pid for p in view.processes.values()
                if any(b["package"] == "libssl3" for b in p.binaries)}
    assert len(nginx_pids) == 3 and ssl_pids == nginx_pids  # nginx links libssl.so.3; nothing else running does
    for package, pids in (("nginx", nginx_pids), ("libssl3", ssl_pids)):
        want = expected_cves(package, versions[package])
        assert want, f"the newest {package} changelog names no CVE after {versions[package]}"
        ev = got[(RUNNING, package)]
        assert {c["cve"] for c in ev["cves"]} == want
        assert {p["pid"] for p in ev["processes"]} == pids
        assert ev["versions"] == [versions[package]] and ev["methods"] == ["arch"] and ev["verdict"] == "verified"
        assert ev["fixed_version"] == archive.available_versions(package)[0]
    # the openssl command-line tool is installed from the same source but not running
    assert {c["cve"] for c in got[(INSTALLED, "openssl")]["cves"]} == expected_cves("libssl3", versions["libssl3"])
    kinds = [f.kind for f in findings]
    assert kinds == sorted(kinds, key=lambda k: k != RUNNING)  # running ranks first


def test_newest_versions_have_none_of_them(clean_image: Image, knowledge: HarvestReport,
                                           lab: tuple[ScanView, dict[str, Installed]]) -> None:
    view, installed = lab
    newest = {n: archive.available_versions(n)[0] for n in ("nginx", "libssl3", "openssl")}
    for bv in view.binaries.values():
        if bv.package in newest:
            bv.versions = [newest[bv.package]]
    for name, version in newest.items():
        installed[name].version = version
    findings = vulnerable_findings(view, installed, VulnIndex(knowledge.records), "clean",
                                   sources=knowledge.binaries)
    assert [f for f in findings if f.evidence[0]["package"] in newest] == []


def _tiny_view(versions: list[str]) -> ScanView:
    proc = ProcessView(7, "nginx", "/usr/sbin/nginx", seen_by={"arch": "verified"})
    bv = BinaryView("/usr/sbin/nginx", "nginx", versions, {"arch"}, {7})
    return ScanView({7: proc}, {"k": bv}, [], [], ["arch"])


def test_ambiguous_page_versions_narrowed_by_dpkg() -> None:
    index = VulnIndex([VulnRecord("nginx", "CVE-2026-1", "1.0-3"), VulnRecord("nginx", "CVE-2026-2", "1.0-2")])
    view = _tiny_view(["1.0-1", "1.0-2"])
    ev = vulnerable_findings(view, {}, index, "vm")[0].evidence[0]
    assert ev["versions"] == ["1.0-1", "1.0-2"] and ev["uncertain_cves"] == ["CVE-2026-2"]
    ev = vulnerable_findings(view, {"nginx": Installed("nginx", "1.0-2", "nginx")}, index, "vm")[0].evidence[0]
    assert ev["versions"] == ["1.0-2"] and [c["cve"] for c in ev["cves"]] == ["CVE-2026-1"]


def test_paths_from_inspect_use_the_owner_and_dpkg_version() -> None:
    index = VulnIndex([VulnRecord("openssl", "CVE-2026-9", "3.0.20-1~deb12u1")])
    view = ScanView({9: ProcessView(9, "curl", "/usr/bin/curl", seen_by={"inspect": "verified"})}, {}, [], [],
                    ["inspect"])
    installed = {"libssl3": Installed("libssl3", "3.0.17-1~deb12u2", "openssl")}
    owner = {"/usr/lib/x86_64-linux-gnu/libssl.so.3": "libssl3"}.get
    found = vulnerable_findings(view, installed, index, "vm", paths={9: {"/usr/lib/x86_64-linux-gnu/libssl.so.3"}},
                                owner=owner)
    assert [f.kind for f in found] == [RUNNING]
    ev = found[0].evidence[0]
    assert ev["processes"] == [{"pid": 9, "comm": "curl", "exe": "/usr/bin/curl"}] and ev["verdict"] == "reported"
    assert vulnerable_findings(view, installed, index, "vm")[0].kind == INSTALLED  # without the path: installed


def test_unfixed_and_introduced() -> None:
    index = VulnIndex([VulnRecord("a", "CVE-2026-5", None), VulnRecord("a", "CVE-2026-6", "2.0", introduced="1.5")])
    assert [x.cve for x in index.affecting("a", "1.0")] == ["CVE-2026-5"]
    assert [x.cve for x in index.affecting("a", "1.6")] == ["CVE-2026-5", "CVE-2026-6"]
    f = vulnerable_findings(_tiny_view(["1.0"]), {"a": Installed("a", "1.0", "a")}, index, "vm")
    assert f[0].kind == INSTALLED and f[0].evidence[0]["fixed_version"] is None and "no fixed version" in f[0].title
