"""The `arch` method: trust only hardware state. Find every page-table root, hash every present executable
page, and identify it against the code-page DB — no OS knowledge at all.

Addresses: `cr3`/`gpa` are guest-physical, `gva` guest-virtual in the address space of the named cr3,
`vaddr`/`file_offset` are in the ELF file. `scan` reads memory only; `scan_guest` reads the vCPUs'
registers over QMP and pauses the VM only when asked (`pause=True`).
"""

from __future__ import annotations

import bisect
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from nephoscope.core.errors import ConnectorError, MemoryAccessError, NephoscopeError
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.base import unverifiable
from nephoscope.knowledge.binaries import PageHit, PageInfo
from nephoscope.knowledge.pagehash import PAGE_SIZE, page_digest
from nephoscope.memory.paging import ADDR_MASK, AddressSpace, Budget, Mapping, iter_runs
from nephoscope.memory.physical import PhysicalMemory, SegmentedMemory
from nephoscope.memory.roots import Root, RootScan, VcpuState, scan_roots

METHOD = "arch"
VDSO_PATH = "[vdso]"  # how the knowledge base names the kernel's vdso
KERNEL_REASON = ("kernel text is patched at boot (alternatives, jump labels, static calls, retpolines) and "
                 "modules are relocated at load, so its pages cannot match a package's bytes")
VDSO_REASON = ("named by its ELF header (linux-vdso.so.1) and position above the stack; its pages do not match "
               "the KB (the kernel patches vdso alternatives at boot, or the KB lacks this kernel's package)")
USER_TOP = 0x0000_7FFF_FFFF_F000
MAX_HITS_PER_PAGE = 64  # content found in more places than this identifies nothing by itself
SCAN_BUDGET = (1 << 16, 1 << 20)  # page tables and leaf pages for a whole scan: bounds hostile fake roots


class CodePageLookup(Protocol):
    """What the scan needs from the code-page DB (nephoscope.knowledge.binaries.CodePageDB)."""

    def lookup_digests(self, digests: list[bytes]) -> list[list[PageHit]]: ...

    def file_pages(self, file_id: int) -> list[PageInfo]: ...


@dataclass(frozen=True, slots=True)
class Candidate:
    """A packaged file an image's pages are byte-identical to."""

    path: str
    package: str
    version: str
    arch: str
    source_package: str
    build_id: str | None
    sha256: str
    file_id: int


@dataclass(frozen=True, slots=True)
class ModifiedPage:
    """A present executable page inside an identified image whose bytes differ from the file's page."""

    gva: int
    gpa: int
    vaddr: int  # where the file has this page (ELF virtual address)
    file_offset: int | None  # None when the file has no executable page at this vaddr


@dataclass(slots=True)
class Image:
    """A binary mapped in one address space, identified by its present executable pages."""

    gva_start: int  # first present executable page
    gva_end: int  # end of the last present executable page
    base: int  # load bias: gva - ELF vaddr
    pages: int  # identified pages
    candidates: list[Candidate]  # every file these pages match (several identical versions → several)
    modified: list[ModifiedPage] = field(default_factory=list)

    @property
    def path(self) -> str:
        return self.candidates[0].path

    @property
    def versions(self) -> set[tuple[str, str]]:
        """Return the (package, version) pairs consistent with the pages."""
        return {(c.package, c.version) for c in self.candidates}


@dataclass(slots=True)
class UnknownRegion:
    """gva-contiguous present executable pages that match no known file (injected, JIT or unpackaged code)."""

    gva_start: int
    gva_end: int
    gpas: list[int]
    writable: bool  # rwx: typical of injected code and JITs
    head: bytes  # the first 64 bytes, for people to look at

    @property
    def pages(self) -> int:
        return len(self.gpas)


@dataclass(slots=True)
class Vdso:
    """The kernel-provided vdso mapping of one address space."""

    gva_start: int
    gva_end: int
    name: str  # "vdso" when verified against the KB, else "vdso (unverified)"
    verified: bool
    kernel: list[tuple[str, str]]  # (package, version) when verified


@dataclass(slots=True)
class SpaceReport:
    """What executes in one address space."""

    cr3: int  # gpa of the root with the kernel half
    user_cr3: int  # gpa of the table user mode runs on (differs from cr3 under PTI)
    exec_pages: int
    images: list[Image]
    unknown: list[UnknownRegion]
    vdso: Vdso | None
    anomalies: dict[str, int]
    vcpus: list[int]  # vCPUs whose CR3 is this root right now

    @property
    def main(self) -> Image | UnknownRegion | None:
        """Return the lowest-addressed executable region: the main program on Linux (heuristic)."""
        regions: list[Image | UnknownRegion] = [*self.images, *self.unknown]
        return min(regions, key=lambda r: r.gva_start, default=None)

    @property
    def modified(self) -> list[Image]:
        return [i for i in self.images if i.modified]


@dataclass(slots=True)
class KernelCode:
    """Supervisor executable pages (kernel text and modules): counted, not verified."""

    pages: int
    bytes: int
    ranges: list[tuple[int, int]]
    reason: str = KERNEL_REASON


@dataclass(slots=True)
class ScanStats:
    """How much work the scan did and where the time went."""

    seconds: float = 0.0
    root_seconds: float = 0.0
    walk_seconds: float = 0.0
    hash_seconds: float = 0.0
    lookup_seconds: float = 0.0
    pages_hashed: int = 0
    root_candidates: int = 0
    roots_rejected: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class ArchReport:
    """The result of one arch scan."""

    vm: str
    spaces: list[SpaceReport]
    kernel: KernelCode | None
    kernel_only_roots: list[int]  # roots without user mappings (init's table, exited processes)
    missing_vcpu_roots: list[int]  # vCPU CR3s the scan did not find: a hidden or corrupt table
    stats: ScanStats
    problem: str = ""  # why nothing could be scanned ("" when roots were found)

    def to_observations(self) -> list[Observation]:
        """Return the report as Observations (method "arch")."""
        return list(_observations(self))


# --- the scan ---------------------------------------------------------------------------------------


def scan(phys: PhysicalMemory, db: CodePageLookup | None, *, vcpus: Sequence[VcpuState] = (), vm: str = "",
         levels: int | None = None) -> ArchReport:
    """Scan guest-physical memory for every address space and identify its executable pages (no pause)."""
    started = time.perf_counter()
    stats = ScanStats()
    levels = levels or (vcpus[0].levels if vcpus else 4)
    roots = scan_roots(phys, known=[v.cr3 for v in vcpus])
    stats.root_seconds = time.perf_counter() - started
    stats.root_candidates, stats.roots_rejected = roots.candidates, dict(roots.rejected)
    found = {r.gpa for r in roots.roots} | {r.user_gpa for r in roots.roots}
    missing = sorted({v.cr3 & ADDR_MASK for v in vcpus} - found)
    digests = _DigestCache(phys, stats)
    files = _FileCache(db)
    budget = Budget(*SCAN_BUDGET)
    kernel = _kernel_code(phys, roots, levels, stats, budget)
    spaces = []
    for root in roots.process_roots:
        if budget.exhausted:
            break
        on = [v.index for v in vcpus if v.cr3 & ADDR_MASK in (root.gpa, root.user_gpa)]
        spaces.append(_scan_space(phys, root, levels, db, digests, files, stats, on, budget))
    stats.seconds = time.perf_counter() - started
    problem = ""
    if not roots.roots:
        problem = (f"no x86-64 page-table root found in {sum(e - s for s, e in phys.ranges)} bytes of RAM "
                   f"({roots.candidates} candidates; rejected: {dict(roots.rejected) or 'none'}): not a guest "
                   "memory image, incomplete RAM, or a non-Linux page-table layout")
    elif budget.exhausted:
        problem = (f"work cap reached ({SCAN_BUDGET[0]} page tables / {SCAN_BUDGET[1]} pages) after {len(spaces)} of "
                   f"{len(roots.process_roots)} address spaces: results are incomplete (fake or corrupt tables?)")
    return ArchReport(vm, spaces, kernel, [r.gpa for r in roots.roots if not r.user_entries], missing, stats,
                      problem)


def scan_guest(name: str, kb_path: Path | None = None, *, pause: bool = False) -> ArchReport:
    """Scan running lab guest `name` through its shared RAM file; reads vCPU registers over HMP.

    Pauses the VM for the duration only when `pause` is true (consistent view); otherwise the guest runs.
    """
    from nephoscope.hypervisor.qmp import Qmp
    from nephoscope.knowledge.binaries import CodePageDB
    from nephoscope.lab.runner import get_guest
    from nephoscope.memory.physical import RawMemory
    from nephoscope.memory.roots import read_vcpu_states

    guest = get_guest(name)
    db = CodePageDB.open(kb_path)
    phys = RawMemory(guest.ram_path)
    try:
        with Qmp(guest.qmp_socket) as qmp:
            if pause:
                qmp.command("stop")
            try:
                vcpus = read_vcpu_states(qmp)
                return scan(phys, db, vcpus=vcpus, vm=name)
            finally:
                if pause:
                    qmp.command("cont")
    finally:
        phys.close()
        db.close()


def scan_file(path: str | Path, kb_path: Path | None = None, *, cr3: Sequence[int] = ()) -> ArchReport:
    """Scan a RAM image or dump file (raw, ELF core, LiME); `cr3` adds known roots (guest-physical)."""
    from nephoscope.knowledge.binaries import CodePageDB
    from nephoscope.memory.physical import open_memory

    db = CodePageDB.open(kb_path)
    phys = open_memory(path)
    try:
        vcpus = [VcpuState(i, c, 0, 0, 0, 0) for i, c in enumerate(cr3)]
        return scan(phys, db, vcpus=vcpus, vm=str(path))
    finally:
        phys.close()
        db.close()


class ArchMethod:
    """The `arch` method for the service registry: scan a VmTarget's RAM (live file or dump).

    A live VM's vCPU registers are read over HMP (no pause unless `pause`); `extra_roots` (guest-physical
    cr3 values, e.g. set by checkpoint from the paused vCPUs) are added as known roots.
    """

    name = METHOD

    def __init__(self, kb: str | Path | None = None, pause: bool = False) -> None:
        self.kb = Path(kb) if kb else None
        self.pause = pause
        self.extra_roots: list[int] = []
        self.last_report: ArchReport | None = None

    def collect(self, vm: VmTarget) -> Iterator[Observation]:
        """Yield arch observations of `vm`; failures become `unverifiable` observations."""
        from nephoscope.knowledge.binaries import CodePageDB
        from nephoscope.memory.physical import open_memory

        if vm.ram_path is None:
            yield unverifiable(METHOD, vm, "memory", "arch needs guest RAM (a shared RAM file or a dump) and "
                                                     "this VM offers none")
            return
        try:
            db = CodePageDB.open(self.kb)
        except NephoscopeError as exc:
            yield unverifiable(METHOD, vm, "knowledge", str(exc))
            return
        try:
            phys = open_memory(vm.ram_path)
        except NephoscopeError as exc:
            db.close()
            yield unverifiable(METHOD, vm, "memory", str(exc))
            return
        try:
            report, note = self._scan(vm, phys, db)
        finally:
            phys.close()
            db.close()
        if note:
            yield unverifiable(METHOD, vm, "vcpu-registers", note)
        self.last_report = report
        yield from report.to_observations()

    def _scan(self, vm: VmTarget, phys: PhysicalMemory, db: CodePageLookup) -> tuple[ArchReport, str]:
        """Scan, with the live VM's vCPU registers (and paused throughout when `pause`); say what was missing."""
        extra = [VcpuState(1000 + i, cr3, 0, 0, 0, 0) for i, cr3 in enumerate(self.extra_roots)]
        if not vm.live or vm.qmp_socket is None:
            return scan(phys, db, vcpus=extra, vm=vm.name), ""
        from nephoscope.hypervisor.qmp import Qmp
        from nephoscope.memory.roots import read_vcpu_states

        try:
            qmp = Qmp(vm.qmp_socket)
        except ConnectorError as exc:
            note = f"vCPU registers unavailable ({exc}); roots come from the RAM scan alone"
            return scan(phys, db, vcpus=extra, vm=vm.name), note
        try:
            if self.pause:
                qmp.command("stop")
            try:
                return scan(phys, db, vcpus=read_vcpu_states(qmp) + extra, vm=vm.name), ""
            finally:
                if self.pause:
                    qmp.command("cont")
        finally:
            qmp.close()


class _DigestCache:
    """Page digests by gpa: shared library pages are hashed once per scan."""

    def __init__(self, phys: PhysicalMemory, stats: ScanStats) -> None:
        self._phys = phys
        self._stats = stats
        self._cache: dict[int, bytes] = {}
        segments = list(phys.iter_segments()) if isinstance(phys, SegmentedMemory) else []
        # the common case (a raw image, the live RAM file): one segment, slice its view directly
        self._flat = segments[0][1] if len(segments) == 1 and segments[0][0] == 0 else None

    def get(self, gpas: list[int]) -> list[bytes]:
        t = time.perf_counter()
        cache, out, flat, read = self._cache, [], self._flat, self._phys.read
        for gpa in gpas:
            d = cache.get(gpa)
            if d is None:
                page = flat[gpa: gpa + PAGE_SIZE] if flat is not None else b""
                if len(page) != PAGE_SIZE:
                    try:
                        page = read(gpa, PAGE_SIZE)
                    except MemoryAccessError:  # cannot happen for walked pages; never matches the KB
                        page = b""
                d = cache[gpa] = page_digest(page)
                self._stats.pages_hashed += 1
            out.append(d)
        self._stats.hash_seconds += time.perf_counter() - t
        return out


class _FileCache:
    """A file's executable pages by ELF vaddr, fetched once per scan."""

    def __init__(self, db: CodePageLookup | None) -> None:
        self._db = db
        self._pages: dict[int, dict[int, tuple[int, bytes]]] = {}

    def pages(self, file_id: int) -> dict[int, tuple[int, bytes]]:
        got = self._pages.get(file_id)
        if got is None and self._db is not None:
            got = {p.vaddr & ~(PAGE_SIZE - 1): (p.file_offset, p.digest) for p in self._db.file_pages(file_id)}
            self._pages[file_id] = got
        return got or {}


def _scan_space(phys: PhysicalMemory, root: Root, levels: int, db: CodePageLookup | None, digests: _DigestCache,
                files: _FileCache, stats: ScanStats, vcpus: list[int], budget: Budget) -> SpaceReport:
    t = time.perf_counter()
    asp = AddressSpace(phys, root.user_gpa, levels)
    pages: list[Mapping] = []
    for m in asp.iter_mappings(user_only=True, exec_only=True, end=USER_TOP + PAGE_SIZE, budget=budget):
        budget.leaves -= m.size // PAGE_SIZE - 1  # a huge page costs what its 4 KiB pages cost to hash
        if budget.leaves < 0:
            asp.anomalies["work-cap"] += 1
            break
        pages.extend(_split(m))
    stats.walk_seconds += time.perf_counter() - t
    page_digests = digests.get([p.gpa for p in pages])
    t = time.perf_counter()
    hits = db.lookup_digests(page_digests) if db is not None and pages else [[] for _ in pages]
    stats.lookup_seconds += time.perf_counter() - t
    images, claimed = _identify(pages, page_digests, hits, files)
    rest = [p for i, p in enumerate(pages) if i not in claimed]
    unknown = [_unknown(asp, ms) for _, _, ms in iter_runs(iter(rest))]
    vdso = _find_vdso(asp, images, unknown)
    return SpaceReport(root.gpa, root.user_gpa, len(pages), images, unknown, vdso, dict(asp.anomalies), vcpus)


def _split(m: Mapping) -> Iterator[Mapping]:
    """Yield the 4 KiB pages of a (possibly large) mapping."""
    if m.size == PAGE_SIZE:
        yield m
        return
    for off in range(0, m.size, PAGE_SIZE):
        yield Mapping(m.gva + off, m.gpa + off, PAGE_SIZE, m.writable, m.user, m.nx)


def _identify(pages: list[Mapping], page_digests: list[bytes], hits: list[list[PageHit]], files: _FileCache,
              ) -> tuple[list[Image], set[int]]:
    """Group identified pages into images (one per file and load bias) and claim the pages each explains."""
    support: dict[tuple[int, int], list[int]] = {}
    meta: dict[int, PageHit] = {}
    for i, page_hits in enumerate(hits):
        for h in page_hits[:MAX_HITS_PER_PAGE]:
            support.setdefault((pages[i].gva - h.vaddr, h.file_id), []).append(i)
            meta.setdefault(h.file_id, h)
    by_base: dict[int, list[tuple[int, int]]] = {}
    for key in support:
        by_base.setdefault(key[0], []).append(key)
    gvas = [p.gva for p in pages]  # ascending: iter_mappings walks in address order
    claimed: set[int] = set()
    images: list[Image] = []
    for key in sorted(support, key=lambda k: (-len(support[k]), k)):
        base, file_id = key
        idx = support[key]
        if all(i in claimed for i in idx):
            continue
        same = [k for k in by_base[base] if support[k] == idx]  # identical pages in several files
        fpages = files.pages(file_id)
        image_idx = set(idx)
        modified = []
        if fpages:  # the file's executable extent at this bias claims every present page inside it
            lo, hi = bisect.bisect_left(gvas, base + min(fpages)), bisect.bisect_left(gvas, base + max(fpages) + 1)
            for i in range(lo, hi):
                if i in image_idx or i in claimed:
                    continue
                expect = fpages.get(gvas[i] - base)
                if expect is None or expect[1] != page_digests[i]:
                    modified.append(ModifiedPage(gvas[i], pages[i].gpa, gvas[i] - base, expect[0] if expect else None))
                image_idx.add(i)
        image_idx -= claimed
        claimed |= image_idx
        cands = sorted({_candidate(meta[k[1]]) for k in same}, key=lambda c: (c.package, c.version, c.path))
        span = sorted(gvas[i] for i in image_idx)
        images.append(Image(span[0], span[-1] + PAGE_SIZE, base, len(image_idx) - len(modified), cands, modified))
    images.sort(key=lambda im: im.gva_start)
    return images, claimed


def _candidate(h: PageHit) -> Candidate:
    return Candidate(h.path, h.package, h.version, h.arch, h.source_package, h.build_id, h.sha256, h.file_id)


def _unknown(asp: AddressSpace, ms: list[Mapping]) -> UnknownRegion:
    head = b""
    with contextlib.suppress(Exception):
        head = asp.phys.read(ms[0].gpa, 64)
    return UnknownRegion(ms[0].gva, ms[-1].gva + PAGE_SIZE, [m.gpa for m in ms], ms[0].writable, head)


def _find_vdso(asp: AddressSpace, images: list[Image], unknown: list[UnknownRegion]) -> Vdso | None:
    """Take the vdso out of `images` (KB-verified) or `unknown` (ELF header + position: unverified)."""
    for im in images:
        if any(c.path == VDSO_PATH for c in im.candidates):
            images.remove(im)
            return Vdso(im.gva_start, im.gva_end, "vdso", True, sorted(im.versions))
    candidates = [r for r in unknown if _looks_like_vdso(asp, r)]
    if not candidates:
        return None
    # Linux maps exactly one vdso per address space: above the stack on 6.1, next to ld.so in the mmap
    # area on newer kernels. Prefer the one with nothing writable above it; take a lone candidate
    # anywhere; with several and none above the stack, name none (they all stay unknown code).
    above = [r for r in candidates
             if not any(m.writable for m in asp.iter_mappings(user_only=True, start=r.gva_end, end=USER_TOP))]
    chosen = above[-1] if above else (candidates[0] if len(candidates) == 1 else None)
    if chosen is None:
        return None
    unknown.remove(chosen)
    return Vdso(chosen.gva_start, chosen.gva_end, "vdso (unverified)", False, [])


def _looks_like_vdso(asp: AddressSpace, region: UnknownRegion) -> bool:
    """Return whether an unknown region is a small read-only ELF whose soname is linux-vdso.so.1."""
    if region.pages > 4 or region.writable or not region.head.startswith(b"\x7fELF\x02\x01"):
        return False
    try:
        body = asp.phys.read(region.gpas[0], PAGE_SIZE)
    except Exception:
        return False
    return b"linux-vdso.so.1" in body


def _kernel_code(phys: PhysicalMemory, roots: RootScan, levels: int, stats: ScanStats,
                 budget: Budget) -> KernelCode | None:
    """Count supervisor executable pages in the shared kernel half (walked once, from the first root)."""
    if not roots.roots:
        return None
    t = time.perf_counter()
    asp = AddressSpace(phys, roots.roots[0].gpa, levels)
    start = asp.canonical(1 << (asp.va_bits - 1))
    ranges: list[tuple[int, int]] = []
    pages = 0
    for a, b, ms in iter_runs(asp.iter_mappings(exec_only=True, start=start, budget=budget)):
        if not ms[0].user:
            ranges.append((a, b))
            pages += (b - a) // PAGE_SIZE
    stats.walk_seconds += time.perf_counter() - t
    return KernelCode(pages, pages * PAGE_SIZE, ranges)


# --- observations -----------------------------------------------------------------------------------


def _observations(report: ArchReport) -> Iterator[Observation]:
    prov = Provenance(METHOD, report.vm)
    if report.problem:
        yield Observation("scan", report.vm, {"spaces": len(report.spaces)}, prov, Verdict.UNVERIFIABLE,
                          report.problem)
    for sp in report.spaces:
        space = f"cr3:0x{sp.cr3:x}"
        main = sp.main
        yield Observation("address-space", space, {
            "cr3": sp.cr3, "user_cr3": sp.user_cr3, "exec_pages": sp.exec_pages, "vcpus": sp.vcpus,
            "main": (main.path if isinstance(main, Image) else "unknown") if main else None,
            "anomalies": sp.anomalies}, prov, Verdict.VERIFIED)
        for im in sp.images:
            data = {"cr3": sp.cr3, "gva_start": im.gva_start, "gva_end": im.gva_end, "base": im.base,
                    "pages": im.pages, "path": im.path, "versions": sorted(im.versions),
                    "candidates": [_cand_dict(c) for c in im.candidates]}
            if im.modified:
                data["modified_pages"] = [{"gva": m.gva, "gpa": m.gpa, "vaddr": m.vaddr, "file_offset": m.file_offset}
                                          for m in im.modified]
                yield Observation("modified-binary", f"{space}:0x{im.gva_start:x}", data, prov, Verdict.VERIFIED)
            else:
                yield Observation("binary", f"{space}:0x{im.gva_start:x}", data, prov, Verdict.VERIFIED)
        for u in sp.unknown:
            yield Observation("unknown-code", f"{space}:0x{u.gva_start:x}", {
                "cr3": sp.cr3, "gva_start": u.gva_start, "gva_end": u.gva_end, "pages": u.pages,
                "writable": u.writable, "gpas": u.gpas[:64], "head": u.head.hex()}, prov, Verdict.VERIFIED)
        if sp.vdso:
            v = sp.vdso
            yield Observation("vdso", f"{space}:0x{v.gva_start:x}", {
                "cr3": sp.cr3, "gva_start": v.gva_start, "gva_end": v.gva_end, "name": v.name, "kernel": v.kernel},
                prov, Verdict.VERIFIED if v.verified else Verdict.UNVERIFIABLE, "" if v.verified else VDSO_REASON)
    if report.kernel:
        k = report.kernel
        yield Observation("kernel-code", "kernel", {"pages": k.pages, "bytes": k.bytes,
                                                    "ranges": [[a, b] for a, b in k.ranges[:256]]},
                          prov, Verdict.UNVERIFIABLE, k.reason)
    for cr3 in report.missing_vcpu_roots:
        yield Observation("unfound-root", f"cr3:0x{cr3:x}", {"cr3": cr3}, prov, Verdict.VERIFIED,
                          "a vCPU runs on this table but the scan did not accept it as a root")


def _cand_dict(c: Candidate) -> dict:
    return {f: getattr(c, f) for f in Candidate.__slots__}  # type: ignore[attr-defined]

