"""Vulnerable and malicious code on real lab guests: CVEs of the old nginx/libssl3, YARA over guest RAM."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from debian.changelog import Changelog
from debian.debian_support import Version

from nephoscope.analysis.vulnerable import INSTALLED, RUNNING, installed_from, mapped_paths, vulnerable_findings
from nephoscope.core.paths import cache_root
from nephoscope.knowledge.debian import archive
from nephoscope.knowledge.feeds import CVE_RE, HarvestReport, harvest
from nephoscope.knowledge.vulns import VulnDB, VulnIndex
from nephoscope.knowledge.yara_rules import PAGE, RuleSet, load_hashes, page_digest, scan_physical
from nephoscope.lab import runner
from nephoscope.lab.build import Image
from nephoscope.lab.trojan import find_patch_offset, patch_text_padding
from nephoscope.memory.physical import open_memory
from nephoscope.service.methods import available_methods
from nephoscope.service.report import build_report
from nephoscope.service.report_render import render_html
from nephoscope.service.scan import ScanResult, run_scan
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest
PACKAGES = ("nginx", "libssl3")


def _root(package: str, version: str) -> Path:
    return archive.unpack(archive.download(package, version, cache_root() / "debs"), cache_root() / "unpacked") / "root"


def expected_cves(package: str, running: str) -> set[str]:
    """Return CVEs the newest changelog of `package` lists as fixed after `running` (python-debian directly)."""
    newest = archive.available_versions(package)[0]
    text = gzip.decompress((_root(package, newest) / "usr/share/doc" / package / "changelog.Debian.gz")
                           .read_bytes()).decode()
    return {c for b in Changelog(text) if Version(running) < b.version <= Version(newest)
            for c in CVE_RE.findall("\n".join(b.changes()))}


@pytest.fixture(scope="module")
def knowledge() -> HarvestReport:
    return harvest([*PACKAGES, "openssl"])


@pytest.fixture(scope="module")
def agent_scan(clean_guest: runner.Guest) -> ScanResult:
    return run_scan(resolve_target(clean_guest.name), ["agent"])


def _nginx_pids(guest: runner.Guest) -> set[int]:
    return {p["pid"] for p in guest.manifest()["processes"] if p["exe"] == "/usr/sbin/nginx"}


def test_agent_packages_are_installed_vulnerable(clean_guest: runner.Guest, knowledge: HarvestReport,
                                                 agent_scan: ScanResult) -> None:
    versions = clean_guest.manifest()["packages"]
    installed = installed_from(agent_scan.observations)
    assert {n: installed[n].version for n in PACKAGES} == {n: versions[n] for n in PACKAGES}
    found = {f.evidence[0]["package"]: f for f in vulnerable_findings(
        agent_scan.view, installed, VulnIndex(knowledge.records), clean_guest.name, sources=knowledge.binaries)}
    for name in PACKAGES:
        assert found[name].kind == INSTALLED  # the agent alone cannot say what executes
        assert {c["cve"] for c in found[name].evidence[0]["cves"]} == expected_cves(name, versions[name])


def test_agent_mappings_make_them_running(clean_guest: runner.Guest, clean_image: Image, knowledge: HarvestReport,
                                          agent_scan: ScanResult) -> None:
    owner = lambda path: (clean_image.owner_of(path) or (None,))[0]  # noqa: E731
    findings = vulnerable_findings(agent_scan.view, installed_from(agent_scan.observations),
                                   VulnIndex(knowledge.records), clean_guest.name, sources=knowledge.binaries,
                                   paths=mapped_paths(agent_scan.observations), owner=owner)
    found = {f.evidence[0]["package"]: f for f in findings}
    nginx = _nginx_pids(clean_guest)
    assert len(nginx) >= 2
    maps = mapped_paths(agent_scan.observations)
    ssl = {pid for pid, paths in maps.items() if any(owner(p) == "libssl3" for p in paths)}
    for name in PACKAGES:
        ev = found[name].evidence[0]
        assert found[name].kind == RUNNING and ev["verdict"] == "reported"
    assert {p["pid"] for p in found["nginx"].evidence[0]["processes"]} == nginx
    # nginx links libssl.so.3; python's hashlib may dlopen libcrypto.so.3 (also libssl3's): both count
    assert {p["pid"] for p in found["libssl3"].evidence[0]["processes"]} == ssl >= nginx
    for pid in ssl - nginx:
        assert any(p.endswith(("/libcrypto.so.3", "/libssl.so.3")) for p in maps[pid])


def test_arch_running_vulnerable(clean_guest: runner.Guest, knowledge: HarvestReport, default_kb: None) -> None:
    if "arch" not in available_methods():
        pytest.skip("the arch method is not available in this tree yet")
    methods = [m for m in ("arch", "inspect", "agent") if m in available_methods()]
    result = run_scan(resolve_target(clean_guest.name), methods)
    findings = vulnerable_findings(result.view, installed_from(result.observations), VulnIndex(knowledge.records),
                                   clean_guest.name, sources=knowledge.binaries, observations=result.observations)
    running = {f.evidence[0]["package"]: f.evidence[0] for f in findings
               if f.kind == RUNNING and "arch" in f.evidence[0]["methods"]}
    if not running:
        pytest.skip("arch identified no packaged code (is the code-page DB built? `nephoscope kb add-lab`)")
    versions = clean_guest.manifest()["packages"]
    for name in PACKAGES:
        assert {c["cve"] for c in running[name]["cves"]} == expected_cves(name, versions[name])
    if "inspect" in methods:
        nginx = _nginx_pids(clean_guest)
        assert {p["pid"] for p in running["nginx"]["processes"]} == nginx
        # arch sees code that is present in a process's page tables: a forked nginx worker that has not run
        # libssl code since the fork has no libssl pages mapped yet, so only a subset of the mappers shows
        mappers = {pid for pid, paths in mapped_paths(result.observations).items()
                   if any(p.endswith(("/libssl.so.3", "/libcrypto.so.3")) for p in paths)}
        ssl_pids = {p["pid"] for p in running["libssl3"]["processes"]}
        assert ssl_pids and ssl_pids <= mappers and min(nginx) in ssl_pids


def test_report_for_the_owner(clean_guest: runner.Guest, knowledge: HarvestReport, agent_scan: ScanResult,
                              tmp_path: Path) -> None:
    db = VulnDB.open(tmp_path / "v.sqlite")
    db.replace("changelog", knowledge.records, knowledge.binaries)
    target = agent_scan.vm
    rep = build_report(target.name, agent_scan.view, agent_scan.observations, vulns=db,
                       host_strings=tuple(str(p) for p in (target.ram_path, target.qga_socket, target.qmp_socket)))
    page = render_html(rep)
    assert {v.package for v in rep.vulnerable} >= set(PACKAGES)
    assert expected_cves("nginx", clean_guest.manifest()["packages"]["nginx"]) <= {
        c["cve"] for v in rep.vulnerable for c in v.cves}
    for host in (str(target.ram_path), str(target.qga_socket), "/run/nephoscope", "/dev/shm"):
        assert host not in page


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return RuleSet()


def test_rules_silent_on_clean_guest_ram(clean_guest: runner.Guest, rules: RuleSet) -> None:
    with open_memory(clean_guest.ram_path) as phys:
        assert scan_physical(rules, phys.iter_segments()) == []


def test_rules_hit_exactly_the_tampering(tampered_guest: runner.Guest, rules: RuleSet) -> None:
    bash = (_root("bash", archive.available_versions("bash")[-1]) / "bin" / "bash").read_bytes()
    trojan = patch_text_padding(bash)
    patch = find_patch_offset(bash)[0]
    trojan_page = trojan[patch - patch % PAGE: patch - patch % PAGE + PAGE]
    known_bad = load_hashes()
    injected_pages = 0
    with open_memory(tampered_guest.ram_path) as phys:
        hits = scan_physical(rules, phys.iter_segments())
        assert {h.rule for _, h in hits} == {"nephoscope_injected_stub", "nephoscope_injected_marker",
                                              "nephoscope_trojan_padding"}
        for gpa, hit in hits:
            page = phys.read(gpa - gpa % PAGE, PAGE)
            if hit.rule == "nephoscope_trojan_padding":
                assert page == trojan_page and gpa % PAGE == (patch - 1) % PAGE
            elif page_digest(page) in known_bad:  # the victim's injected page: payload at its start
                injected_pages += 1
                assert gpa % PAGE in (0, 0x10)
            else:  # the injector program's own copy of the payload (counter never incremented)
                start = gpa - (0 if hit.rule == "nephoscope_injected_stub" else 0x10)
                assert phys.read(start + 0x28, 8) == bytes(8)
    assert injected_pages >= 1


def test_report_names_the_tampering(tampered_guest: runner.Guest, tmp_path: Path) -> None:
    if "arch" not in available_methods():
        pytest.skip("the arch method is not available in this tree yet")
    result = run_scan(resolve_target(tampered_guest.name), ["arch"])
    rep = build_report(tampered_guest.name, result.view, result.observations, vulns=VulnDB.open(tmp_path / "v.db"),
                       ram_path=tampered_guest.ram_path, host_strings=(str(tampered_guest.ram_path),))
    rules = {d.get("rule") for c in rep.code if c.kind == "malicious-code" for d in c.details}
    assert {"nephoscope_injected_stub", "nephoscope_trojan_padding"} <= rules
    assert "/dev/shm" not in render_html(rep)
