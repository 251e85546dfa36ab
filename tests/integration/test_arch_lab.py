"""The arch scan against the lab's ground truth: every executing binary and version, and every planted trick.

Arch knows no pids: address spaces are matched to manifest processes by content (the main binary's
package, distinctive regions). Scans pause the guest for a consistent view (the scan itself needs no pause).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.arch import ArchReport, Image, SpaceReport, UnknownRegion, scan_target
from nephoscope.knowledge.binaries import CodePageDB
from nephoscope.knowledge.debian import archive
from nephoscope.knowledge.ingest import IngestReport, ingest_deb
from nephoscope.lab.build import Image as LabImage
from nephoscope.lab.build import build_image, cache_root
from nephoscope.lab.profile import load_profile
from nephoscope.lab.runner import Guest
from nephoscope.memory.physical import RawMemory

pytestmark = pytest.mark.guest
EXTRA_VERSIONS = ("nginx", "libssl3")  # the KB also holds their newest versions: the scan must pick the running one


@pytest.fixture(scope="module")
def arch_kb(clean_image: LabImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("arch-kb") / "kb.sqlite"
    db = CodePageDB.open(path)
    wanted: set[tuple[str, str]] = set()
    for image in (clean_image, build_image(load_profile("tampered"))):
        wanted |= set(image.meta["packages"].items())
        kernel = image.meta["kernel"]
        if kernel.get("package"):
            wanted.add((kernel["package"], kernel["version"]))
    wanted |= {(name, archive.available_versions(name)[0]) for name in EXTRA_VERSIONS}
    report = IngestReport()
    for name, version in sorted(wanted):
        report.merge(ingest_deb(db, archive.download(name, version, cache_root() / "debs")))
    assert report.errors == []
    db.close()
    return path


def _main_package(sp: SpaceReport) -> str:
    main = sp.main
    if isinstance(main, Image):
        return sorted(main.versions)[0][0]
    return "unknown" if isinstance(main, UnknownRegion) else "-"


def _scan(guest: Guest, kb: Path) -> ArchReport:
    started = time.monotonic()
    target = VmTarget(guest.name, ram_path=guest.ram_path, qmp_socket=guest.qmp_socket, live=True)
    report = scan_target(target, kb, pause=True)
    print(f"arch scan of {guest.name}: {time.monotonic() - started:.2f}s, {len(report.spaces)} spaces, "
          f"{report.stats.pages_hashed} pages hashed")
    assert report.problem == "" and report.missing_vcpu_roots == []
    return report


def _page_text(guest: Guest, gpas: list[int]) -> bytes:
    phys = RawMemory(guest.ram_path)
    try:
        return b"".join(phys.read(g, 4096) for g in gpas)
    finally:
        phys.close()


def test_clean_guest_every_binary_identified_with_its_version(clean_guest: Guest, arch_kb: Path) -> None:
    manifest = clean_guest.manifest()
    installed = manifest["packages"]
    report = _scan(clean_guest, arch_kb)
    spaces = [sp for sp in report.spaces if sp.exec_pages]
    for sp in spaces:
        assert sp.unknown == [], (hex(sp.cr3), [(hex(u.gva_start), u.head[:16]) for u in sp.unknown])
        assert sp.modified == []
        assert sp.vdso is not None and sp.vdso.name in ("vdso", "vdso (unverified)")
        for im in sp.images:
            assert any(installed.get(p) == v for p, v in im.versions), (im.path, im.versions)
            for package in EXTRA_VERSIONS:  # the KB has two versions; only the installed one matches
                if any(p == package for p, _ in im.versions):
                    assert im.versions == {(package, installed[package])}
    expected = Counter(p["package"] for p in manifest["processes"])
    found = Counter(_main_package(sp) for sp in spaces)
    for package, count in expected.items():
        assert found[package] >= count, (package, found, expected)
    assert set(found) <= set(installed), found
    assert report.kernel and report.kernel.pages > 0
    obs = report.to_observations()
    # kernel code is verified when the KB holds the kernel package's code (docs/kernel.md), else unverifiable
    verification = report.kernel.verification
    want = "verified" if verification is not None and verification.verified else "unverifiable"
    assert {o.verdict for o in obs if o.kind == "kernel-code"} == {want}
    assert not [o for o in obs if o.kind in ("modified-kernel-image", "unknown-kernel-code")]


def test_tampered_guest_tricks_are_found(tampered_guest: Guest, arch_kb: Path) -> None:
    manifest = tampered_guest.manifest()
    procs = manifest["processes"]
    report = _scan(tampered_guest, arch_kb)
    spaces = [sp for sp in report.spaces if sp.exec_pages]
    found = Counter(_main_package(sp) for sp in spaces)
    # masquerade (comm "sshd") and the hidden python run python3.11; deleted-file and memfd run busybox-static
    for package in ("python3.11-minimal", "busybox-static"):
        assert found[package] >= sum(p["package"] == package for p in procs), (package, found)
    techniques = {p["technique"] for p in procs}
    assert {"masquerade", "deleted-binary", "fileless-memfd"} <= techniques

    injected = [(sp, u) for sp in spaces for u in sp.unknown
                if b"NEPHOSCOPE-INJECTED-CODE" in _page_text(tampered_guest, u.gpas)]
    assert len(injected) == 1
    sp, region = injected[0]
    # region.writable is the PTE's write bit now: a fork after the injection makes the rwx page copy-on-write
    victim = next(t for t in manifest["techniques"] if t["id"] == "code-injection")
    victim_package = next(p["package"] for p in procs if p["pid"] == victim["pid"])
    assert _main_package(sp) == victim_package

    trojans = [(sp, im) for sp in spaces for im in sp.modified]
    assert len(trojans) == sum(p["binary"] == "/usr/local/bin/bash" for p in procs) == 1
    _, bash = trojans[0]
    assert bash.path.endswith("/bash") and ("bash", manifest["packages"]["bash"]) in bash.versions
    assert b"NPH-TROJAN" in _page_text(tampered_guest, [m.gpa for m in bash.modified])

    backdoors = [sp for sp in spaces if _main_package(sp) == "unknown"]
    assert len(backdoors) == sum(p["technique"] == "unpackaged-binary" for p in procs) == 1
    # the only unknown code anywhere: the injected page, and the backdoor with its preloaded libhide.so
    unexplained = [(hex(sp.cr3), hex(u.gva_start)) for sp in spaces for u in sp.unknown
                   if sp is not backdoors[0] and u is not region]
    assert unexplained == []
    kinds = Counter(o.kind for o in report.to_observations())
    assert kinds["modified-binary"] == 1 and kinds["unknown-code"] == 1 + len(backdoors[0].unknown)


def test_qemu_elf_dump_reads_and_scans_like_live_ram(clean_guest: Guest, arch_kb: Path, tmp_path: Path) -> None:
    from nephoscope.hypervisor.qmp import Qmp
    from nephoscope.introspect.arch import scan
    from nephoscope.memory.physical import ElfCoreMemory, open_memory

    dump = tmp_path / "guest.elf"
    db = CodePageDB.open(arch_kb)
    live = RawMemory(clean_guest.ram_path)
    with Qmp(clean_guest.qmp_socket, timeout=120) as qmp:
        qmp.command("stop")
        try:
            qmp.command("dump-guest-memory", paging=False, protocol=f"file:{dump}")
            live_report = scan(live, db)
            core = open_memory(dump)
            assert isinstance(core, ElfCoreMemory)
            ram_end = live.ranges[0][1]
            for start, end in core.ranges:  # every RAM range of QEMU's dump holds the shared file's bytes
                if end > ram_end:  # the dump also holds ROM (the BIOS below 4 GiB), which is not RAM
                    continue
                for gpa in (start, (start + end) // 2 & ~0xFFF, end - 4096):
                    assert core.read(gpa, 4096) == live.read(gpa, 4096), hex(gpa)
        finally:
            qmp.command("cont")
    dump_report = scan(core, db)
    in_ram = sum(min(e, live.ranges[0][1]) - s for s, e in core.ranges if s < live.ranges[0][1])
    assert in_ram >= clean_guest.mem_mib * 2**20 - 2**20
    summary = lambda r: {(sp.cr3, tuple(im.path for im in sp.images)) for sp in r.spaces}  # noqa: E731
    assert summary(dump_report) == summary(live_report) and dump_report.spaces
    core.close()
    live.close()
    db.close()
