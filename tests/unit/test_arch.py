"""The arch scan on synthetic guests: roots (PTI too), identification, versions, trojans, injection, vdso."""

from __future__ import annotations

import hashlib
import os
import time

from test_paging_synth import Synth

from nephoscope.core.records import Verdict
from nephoscope.introspect.arch import VDSO_PATH, scan
from nephoscope.knowledge.binaries import PageHit, PageInfo
from nephoscope.knowledge.pagehash import page_digest
from nephoscope.memory.paging import NX
from nephoscope.memory.physical import BufferMemory
from nephoscope.memory.roots import VcpuState, parse_registers, scan_roots

KTEXT = 0xFFFF_FFFF_8100_0000
PAGE = 4096


def _page(tag: str) -> bytes:
    return hashlib.sha256(tag.encode()).digest() * 128


class FakeDB:
    """A code-page DB holding whole files (list of exec pages at vaddr 0x1000, 0x2000, ...)."""

    def __init__(self) -> None:
        self.files: dict[int, tuple[str, str, str, list[bytes]]] = {}

    def add(self, path: str, package: str, version: str, pages: list[bytes]) -> None:
        self.files[len(self.files) + 1] = (path, package, version, pages)

    def _infos(self, file_id: int) -> list[PageInfo]:
        pages = self.files[file_id][3]
        return [PageInfo((i + 1) * PAGE, (i + 1) * PAGE, page_digest(p)) for i, p in enumerate(pages)]

    def lookup_digests(self, digests: list[bytes]) -> list[list[PageHit]]:
        index: dict[bytes, list[PageHit]] = {}
        for fid, (path, pkg, ver, _) in self.files.items():
            for info in self._infos(fid):
                index.setdefault(info.digest, []).append(
                    PageHit(fid, info.file_offset, info.vaddr, path, pkg, ver, "amd64", pkg, None, "00"))
        return [index.get(d, []) for d in digests]

    def file_pages(self, file_id: int) -> list[PageInfo]:
        return self._infos(file_id)


BIN = [_page(f"bin-{i}") for i in range(4)]
LIB = [_page(f"lib-{i}") for i in range(3)]
VDSO = b"\x7fELF\x02\x01\x01" + bytes(100) + b"linux-vdso.so.1\0"


class Guest:
    """A synthetic guest: one kernel half shared by every process table, user mappings per process."""

    def __init__(self) -> None:
        self.s = Synth(32 << 20)
        s = self.s
        self.kernel = s.alloc(2, align=2 * PAGE)
        for i, gva in enumerate((KTEXT, 0xFFFF_8880_0000_0000, 0xFFFF_C900_0000_0000, 0xFFFF_EA00_0000_0000)):
            s.map(self.kernel, gva, 0x100000 + i * PAGE, user=False, nx=gva != KTEXT)
        self.data = 0x200000  # bump allocator for data pages in the lower half

    def put(self, content: bytes) -> int:
        gpa, self.data = self.data, self.data + PAGE
        self.s.write(gpa, content.ljust(PAGE, b"\0"))
        return gpa

    def process(self, pti: bool = False) -> int:
        root = self.s.alloc(2, align=2 * PAGE)
        for i in range(256, 512):
            self.s.set_entry(root, i, self.s.entry(self.kernel, i))
        return root

    def map(self, root: int, gva: int, content: bytes, **kw: bool) -> int:
        gpa = self.put(content)
        self.s.map(root, gva, gpa, **kw)
        return gpa

    def map_image(self, root: int, base: int, pages: list[bytes]) -> None:
        for i, p in enumerate(pages):
            self.map(root, base + (i + 1) * PAGE, p, writable=False)

    def stack_and_vdso(self, root: int) -> None:
        self.map(root, 0x7FFD_0000_0000, b"stack", nx=True)
        self.map(root, 0x7FFD_0001_0000, VDSO, writable=False)

    def make_pti_twin(self, root: int) -> None:
        """Turn `root` into a PTI kernel PGD: NX on its user entries, user twin at root + 4 KiB."""
        twin = root + PAGE
        for i in range(256):
            e = self.s.entry(root, i)
            if e & 1:
                self.s.set_entry(twin, i, e)
                self.s.set_entry(root, i, e | NX)
        trampoline = self.s.alloc()  # the user PGD's own copy of the entry text mapping
        self.s.set_entry(trampoline, 510, self.s.entry(self.s.entry(self.kernel, 511) & ~0xFFF, 510))
        self.s.set_entry(twin, 511, trampoline | 0x67)


def _guest() -> tuple[Guest, FakeDB, dict[str, int]]:
    g, db = Guest(), FakeDB()
    db.add("/usr/bin/prog", "prog", "1.0", BIN)
    db.add("/usr/bin/prog", "prog", "1.0+b1", BIN)  # a rebuild with identical code
    db.add("/usr/lib/libx.so", "libx", "2.0", LIB)
    db.add("/usr/lib/libx.so", "libx", "1.9", [LIB[0], _page("old"), LIB[2]])
    roots = {}
    roots["clean"] = a = g.process()
    g.map_image(a, 0x5555_0000_0000, BIN)
    g.map_image(a, 0x7F00_0000_0000, LIB)
    g.stack_and_vdso(a)
    roots["trojan"] = b = g.process()
    g.map_image(b, 0x5555_0000_0000, [BIN[0], b"NPH-TROJAN" + BIN[1][10:], BIN[2], BIN[3]])
    g.stack_and_vdso(b)
    roots["injected"] = c = g.process()
    g.map_image(c, 0x40_0000 - PAGE, BIN)
    g.map(c, 0x7F11_0000_0000, b"\x90\x90NEPHOSCOPE-INJECTED-CODE", writable=True)
    g.map(c, 0x7F12_0000_0000, _page("unpackaged-0"), writable=False)
    g.map(c, 0x7F12_0000_1000, _page("unpackaged-1"), writable=False)
    g.stack_and_vdso(c)
    roots["pti"] = d = g.process()
    g.map_image(d, 0x5555_0000_0000, BIN)
    g.make_pti_twin(d)
    return g, db, roots


def test_roots_found_with_pti_twin_and_kernel_only_root() -> None:
    g, _, roots = _guest()
    found = scan_roots(g.s.phys())
    by_gpa = {r.gpa: r for r in found.roots}
    assert set(roots.values()) <= set(by_gpa)
    assert by_gpa[roots["pti"]].user_gpa == roots["pti"] + PAGE
    assert by_gpa[roots["clean"]].user_gpa == roots["clean"]
    assert by_gpa[g.kernel].user_entries == 0
    assert g.kernel not in {r.gpa for r in found.process_roots}
    assert roots["pti"] + PAGE not in by_gpa  # a twin is not a root of its own


def test_scan_identifies_versions_trojans_injection_and_vdso() -> None:
    g, db, roots = _guest()
    report = scan(g.s.phys(), db, vcpus=[VcpuState(0, roots["clean"] | 0x5, 0, 0, 0, 0)], vm="synth")
    spaces = {sp.cr3: sp for sp in report.spaces}
    assert set(spaces) == set(roots.values())
    clean = spaces[roots["clean"]]
    assert clean.vcpus == [0]
    assert [(im.path, im.versions, im.pages) for im in clean.images] == [
        ("/usr/bin/prog", {("prog", "1.0"), ("prog", "1.0+b1")}, 4),
        ("/usr/lib/libx.so", {("libx", "2.0")}, 3)]
    assert clean.unknown == [] and not clean.modified
    assert clean.vdso and clean.vdso.name == "vdso (unverified)" and clean.vdso.gva_start == 0x7FFD_0001_0000
    assert clean.main is clean.images[0]

    trojan = spaces[roots["trojan"]]
    [image] = trojan.modified
    assert image.path == "/usr/bin/prog" and image.pages == 3
    assert [(m.gva, m.vaddr, m.file_offset) for m in image.modified] == [(0x5555_0000_2000, 0x2000, 0x2000)]
    assert trojan.unknown == []

    injected = spaces[roots["injected"]]
    assert [im.path for im in injected.images] == ["/usr/bin/prog"]  # non-PIE at 0x400000 too
    assert [(u.gva_start, u.pages, u.writable) for u in injected.unknown] == [
        (0x7F11_0000_0000, 1, True), (0x7F12_0000_0000, 2, False)]
    assert b"NEPHOSCOPE-INJECTED-CODE" in injected.unknown[0].head

    pti = spaces[roots["pti"]]
    assert pti.user_cr3 == roots["pti"] + PAGE and [im.path for im in pti.images] == ["/usr/bin/prog"]

    assert report.kernel and report.kernel.pages == 1 and report.kernel.ranges == [(KTEXT, KTEXT + PAGE)]
    assert report.missing_vcpu_roots == []
    obs = report.to_observations()
    kinds = {(o.kind, o.verdict) for o in obs}
    assert ("binary", Verdict.VERIFIED) in kinds and ("modified-binary", Verdict.VERIFIED) in kinds
    assert ("unknown-code", Verdict.VERIFIED) in kinds and ("vdso", Verdict.UNVERIFIABLE) in kinds
    kernel = next(o for o in obs if o.kind == "kernel-code")
    assert kernel.verdict is Verdict.UNVERIFIABLE and "alternatives" in kernel.reason
    assert all(o.provenance.method == "arch" for o in obs)
    assert all(o.to_dict()["verdict"] in {"verified", "unverifiable"} for o in obs)


def test_vdso_verified_when_the_kb_has_it() -> None:
    g, db, roots = _guest()
    db.add(VDSO_PATH, "linux-image-6.1.0-56-amd64", "6.1.192-2", [VDSO.ljust(PAGE, b"\0")])
    # the KB's vdso vaddr is 0x1000 (FakeDB convention); the guest maps it at 0x7ffd00010000
    report = scan(g.s.phys(), db)
    clean = next(sp for sp in report.spaces if sp.cr3 == roots["clean"])
    assert clean.vdso and clean.vdso.verified and clean.vdso.name == "vdso"
    assert clean.vdso.kernel == [("linux-image-6.1.0-56-amd64", "6.1.192-2")]


def test_vcpu_in_user_mode_on_the_pti_twin() -> None:
    g, db, roots = _guest()
    twin = roots["pti"] + PAGE
    report = scan(g.s.phys(), db, vcpus=[VcpuState(0, twin | (1 << 63) | 3, 0, 0, 0, 0)])
    pti = next(sp for sp in report.spaces if sp.cr3 == roots["pti"])
    assert pti.vcpus == [0] and report.missing_vcpu_roots == []
    assert len(report.spaces) == len(roots)


def test_missing_vcpu_root_is_reported() -> None:
    g, db, _ = _guest()
    report = scan(g.s.phys(), db, vcpus=[VcpuState(0, 0x1234000, 0, 0, 0, 0)])
    assert report.missing_vcpu_roots == [0x1234000]
    assert any(o.kind == "unfound-root" for o in report.to_observations())


def test_no_db_reports_everything_unknown() -> None:
    g, _, roots = _guest()
    report = scan(g.s.phys(), None)
    clean = next(sp for sp in report.spaces if sp.cr3 == roots["clean"])
    assert clean.images == [] and sum(u.pages for u in clean.unknown) == 7


def test_garbage_and_empty_memory_are_bounded() -> None:
    for mem in (bytearray(os.urandom(8 << 20)), bytearray(4 << 20), bytearray(b"\xff" * (4 << 20))):
        t = time.monotonic()
        report = scan(BufferMemory(mem), FakeDB())
        assert report.spaces == [] or all(sp.exec_pages >= 0 for sp in report.spaces)
        assert time.monotonic() - t < 20


def test_parse_registers() -> None:
    text = ("CPU#0\nRIP=ffffffff81000000 RFL=00000246\nCR0=80050033 CR2=0 CR3=000000001fca8000 CR4=000006f0\n"
            "EFER=0000000000000d01\nCPU#1\nCR0=80050033 CR2=0 CR3=0000000002000005 CR4=000016f0\n")
    a, b = parse_registers(text)
    assert (a.cr3, a.levels, a.rip, a.efer) == (0x1FCA8000, 4, 0xFFFFFFFF81000000, 0xD01)
    assert (b.index, b.cr3, b.levels) == (1, 0x2000005, 5)
    assert parse_registers("garbage") == []


def test_no_roots_is_an_explicit_unverifiable_result() -> None:
    report = scan(BufferMemory(bytearray(1 << 20)), FakeDB(), vm="zeros")
    assert report.spaces == [] and "no x86-64 page-table root" in report.problem
    [obs] = report.to_observations()
    assert obs.kind == "scan" and obs.verdict is Verdict.UNVERIFIABLE


def test_fake_roots_hit_the_scan_work_cap(monkeypatch) -> None:
    import nephoscope.introspect.codepages as codepages

    monkeypatch.setattr(codepages, "SCAN_BUDGET", (3000, 100_000))
    g, db, _ = _guest()
    s = g.s
    pdpt, pd, pt = s.alloc(), s.alloc(), s.alloc()
    code = g.put(b"\x90" * 16)
    for i in range(512):  # one fan-out DAG: 512 PDs -> 512 PTs -> 512 user exec leaves, all shared
        s.set_entry(pdpt, i, pd | 0x67)
        s.set_entry(pd, i, pt | 0x67)
        s.set_entry(pt, i, code | 0x25)
    for _ in range(40):  # forged top-level tables: the real kernel half, a hostile lower half
        fake = g.process()
        for i in range(256):
            s.set_entry(fake, i, pdpt | 0x67)
    t = time.monotonic()
    report = scan(s.phys(), db)
    assert time.monotonic() - t < 30
    assert "work cap" in report.problem and len(report.spaces) < 44
    assert any(o.kind == "scan" and o.verdict is Verdict.UNVERIFIABLE for o in report.to_observations())


def test_arch_method_on_a_ram_file(tmp_path) -> None:
    from nephoscope.hypervisor.target import VmTarget
    from nephoscope.introspect.arch import ArchMethod
    from nephoscope.service.methods import get_method

    g, _, roots = _guest()
    ram = tmp_path / "guest.ram"
    ram.write_bytes(bytes(g.s.mem))
    method = get_method("arch", kb=tmp_path / "kb.sqlite")
    assert isinstance(method, ArchMethod) and method.name == "arch"
    method.extra_roots = [roots["clean"]]
    obs = list(method.collect(VmTarget("synth", ram_path=ram, live=False)))
    assert sum(o.kind == "address-space" for o in obs) == len(roots)
    assert all(o.provenance.method == "arch" and o.provenance.vm == "synth" for o in obs)
    assert method.last_report and method.last_report.spaces[0].vcpus in ([], [1000])
    [bad] = method.collect(VmTarget("none", ram_path=None, live=False))
    assert bad.verdict is Verdict.UNVERIFIABLE
    [missing] = method.collect(VmTarget("gone", ram_path=tmp_path / "nope", live=False))
    assert missing.verdict is Verdict.UNVERIFIABLE and "nope" in missing.reason
