"""Identify the code of address spaces from hardware state alone: walk every present user executable page,
hash it, and group the pages into images (file + load bias) against the code-page DB. No OS knowledge.

Addresses: `cr3`/`gpa` are guest-physical, `gva` guest-virtual in the address space of the named cr3,
`vaddr`/`file_offset` are in the ELF file. Nothing here pauses the VM or talks to a hypervisor: it reads
guest-physical memory (pause the VM first for a consistent view of a live guest). Every walk and read of
one scan draws on one `Budget`; every cap that is hit is recorded in the report.
"""

from __future__ import annotations

import bisect
import contextlib
import re
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from nephoscope.core.errors import GuestDataError, MemoryAccessError, NephoscopeError
from nephoscope.knowledge.binaries import PageHit, PageInfo
from nephoscope.knowledge.pagehash import PAGE_SIZE, page_digest
from nephoscope.memory.paging import ADDR_MASK, AddressSpace, Budget, Mapping, iter_runs
from nephoscope.memory.physical import PhysicalMemory, SegmentedMemory
from nephoscope.memory.roots import Root, RootScan, VcpuState, scan_roots

if TYPE_CHECKING:
    from nephoscope.core.records import Observation
    from nephoscope.introspect.kernelcode import KernelCodeReport
    from nephoscope.introspect.vdso import VdsoImage

VDSO_PATH = "[vdso]"  # how the knowledge base names the kernel's vdso
KERNEL_REASON = ("kernel text is patched at boot (alternatives, jump labels, static calls, retpolines) and "
                 "modules are relocated at load, so its pages cannot match a package's bytes")
USER_TOP = 0x0000_7FFF_FFFF_F000
MAX_HITS_PER_PAGE = 64  # content found in more places than this identifies nothing by itself
SCAN_BUDGET = (1 << 16, 1 << 20)  # page tables and pages for a whole scan: bounds hostile fake roots
MAX_UNKNOWN_REGIONS = 256  # unknown regions kept per address space (the rest are counted, not listed)
MAX_VDSO_CANDIDATES = 8  # Linux maps one vdso; more look-alikes than this are not examined
# The image, not the guest, is in doubt when fewer than this fraction of user executable pages match the
# code-page DB (while it holds packages and there are at least MIN_EXEC_PAGES such pages). A compromised
# guest runs its injected or unpackaged code next to packaged libc, ld.so and programs in every address
# space; a misread image (wrong RAM layout in the headers, a shifted dump) matches almost nothing.
MIN_IDENTIFIED = 0.5
MIN_EXEC_PAGES = 256
_LIBRARY = re.compile(r"\.so(\.[0-9.]+)?$")
_GUEST_ERRORS = (ValueError, OverflowError, IndexError, KeyError, struct.error)  # malformed guest data


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

    @property
    def is_library(self) -> bool:
        """Return whether every candidate file is a shared object (libc.so.6, ld-linux-x86-64.so.2)."""
        return all(_LIBRARY.search(c.path.rsplit("/", 1)[-1]) for c in self.candidates)


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
    reason: str = ""  # why it is not verified, when the kernel package's image was compared

    @property
    def pages(self) -> int:
        return (self.gva_end - self.gva_start) // PAGE_SIZE


def main_image(images: Sequence[Image], unknown: Sequence[UnknownRegion] = (),
               exec_path: str = "") -> Image | UnknownRegion | None:
    """Return the main program of one address space (gva regions of that space), the one rule for it.

    The image whose file is `exec_path` (same path, or same name: renamed and "(deleted)" files) when the
    caller knows what was exec'd; else the lowest-addressed region that is not a shared library — an
    unknown region counts (an unpackaged program), a library never does (the program is mapped below its
    libraries on Linux, PIE or not); else the lowest-addressed region of any kind. See `main_of` for the
    same rule over plain (paths, gva_start) pairs.
    """
    regions: list[Image | UnknownRegion] = [*images, *unknown]
    index = main_of([(tuple(c.path for c in r.candidates) if isinstance(r, Image) else (), r.gva_start)
                     for r in regions], exec_path)
    return None if index is None else regions[index]


def main_of(regions: Sequence[tuple[Sequence[str], int]], exec_path: str = "") -> int | None:
    """Return the index of the main program among `regions` = (candidate file paths, gva_start) of one
    address space (no paths: unknown code), or None when there is none; the rule of `main_image`."""
    exe = exec_path.removesuffix(" (deleted)")
    name = exe.rsplit("/", 1)[-1]
    if name:
        for i, (paths, _) in enumerate(regions):
            if any(p == exe or p.rsplit("/", 1)[-1] == name for p in paths):
                return i
    programs = [i for i, (paths, _) in enumerate(regions)
                if not paths or not all(_LIBRARY.search(p.rsplit("/", 1)[-1]) for p in paths)]
    pool = programs or list(range(len(regions)))
    return min(pool, key=lambda i: regions[i][1], default=None)


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
        """Return the main program (see `main_image`)."""
        return main_image(self.images, self.unknown)

    @property
    def modified(self) -> list[Image]:
        return [i for i in self.images if i.modified]

    @property
    def identified_pages(self) -> int:
        """Return the executable pages explained by a known file or the vdso."""
        return sum(im.pages for im in self.images) + (self.vdso.pages if self.vdso else 0)


@dataclass(slots=True)
class KernelCode:
    """Supervisor executable pages (kernel text and modules): counted, and verified against the kernel package
    when the kernel model and the KB allow it (`verification`; `reason` says why not)."""

    pages: int
    bytes: int
    ranges: list[tuple[int, int]]
    reason: str = KERNEL_REASON
    verification: KernelCodeReport | None = None
    vdso: VdsoImage | None = None  # the package's vDSO image, to verify each space's vDSO with its alternatives
    vdso_reason: str = "the kernel model or the kernel package is not available"


@dataclass(slots=True)
class ScanStats:
    """How much work the scan did and where the time went."""

    seconds: float = 0.0
    root_seconds: float = 0.0
    walk_seconds: float = 0.0
    hash_seconds: float = 0.0
    lookup_seconds: float = 0.0
    pages_hashed: int = 0
    kernel_seconds: float = 0.0  # kernel-code verification (kernel model included)
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
    problem: str = ""  # why nothing (or not everything) could be scanned ("" when the scan is complete)
    caps: dict[str, int] = field(default_factory=dict)  # every cap hit: what stopped short, how often
    doubt: str = ""  # why the image itself is inconsistent ("" when it reads like a guest)
    memory_problems: list[str] = field(default_factory=list)  # what the dump's headers got wrong

    def to_observations(self) -> list[Observation]:
        """Return the report as Observations (method "arch")."""
        from nephoscope.introspect.arch_observations import observations

        return list(observations(self))


# --- caches shared by the address spaces of one scan (or one watch) ------------------------------------


class DigestCache:
    """Page digests by gpa: shared library pages are hashed once per scan."""

    def __init__(self, phys: PhysicalMemory, stats: ScanStats | None = None) -> None:
        self._phys = phys
        self._stats = stats or ScanStats()
        self._cache: dict[int, bytes] = {}
        # the common case (a raw image, the live RAM file): all RAM in one view, slice it directly
        self._flat = phys.flat_view() if isinstance(phys, SegmentedMemory) else None

    def get(self, gpas: list[int]) -> list[bytes]:
        """Return the digest of the guest-physical page at each gpa (unreadable pages match nothing)."""
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


class FileCache:
    """A file's executable pages by ELF vaddr, fetched once per scan."""

    def __init__(self, db: CodePageLookup | None) -> None:
        self._db = db
        self._pages: dict[int, dict[int, tuple[int, bytes]]] = {}

    def pages(self, file_id: int) -> dict[int, tuple[int, bytes]]:
        """Return {vaddr: (file_offset, digest)} of the file's executable pages."""
        got = self._pages.get(file_id)
        if got is None and self._db is not None:
            got = {p.vaddr & ~(PAGE_SIZE - 1): (p.file_offset, p.digest) for p in self._db.file_pages(file_id)}
            self._pages[file_id] = got
        return got or {}


# --- one address space ----------------------------------------------------------------------------------


def identify_space(phys: PhysicalMemory, root: Root, levels: int, db: CodePageLookup | None, budget: Budget, *,
                   digests: DigestCache | None = None, files: FileCache | None = None,
                   stats: ScanStats | None = None, vcpus: Sequence[int] = ()) -> SpaceReport:
    """Identify every present user executable page of the address space `root` (guest-physical); no pause.

    Walks and page reads draw on `budget` (shared by the caller's other spaces); a cap hit shows in the
    space's anomalies as "work-cap" and in `budget.caps`. Raises only NephoscopeError."""
    stats = stats or ScanStats()
    digests = digests or DigestCache(phys, stats)
    files = files or FileCache(db)
    try:
        return _identify_space(phys, root, levels, db, budget, digests, files, stats, list(vcpus))
    except _GUEST_ERRORS as exc:
        raise GuestDataError(f"address space cr3 0x{root.gpa:x}: malformed guest data ({exc!r})") from exc


def _identify_space(phys: PhysicalMemory, root: Root, levels: int, db: CodePageLookup | None, budget: Budget,
                    digests: DigestCache, files: FileCache, stats: ScanStats, vcpus: list[int]) -> SpaceReport:
    t = time.perf_counter()
    asp = AddressSpace(phys, root.user_gpa, levels)
    pages: list[Mapping] = []
    for m in asp.iter_mappings(user_only=True, exec_only=True, end=USER_TOP + PAGE_SIZE, budget=budget):
        budget.leaves -= m.size // PAGE_SIZE - 1  # a huge page costs what its 4 KiB pages cost to hash
        if budget.leaves < 0:
            asp.anomalies["work-cap"] += 1
            budget.hit("page-table walks")
            break
        pages.extend(_split(m))
    stats.walk_seconds += time.perf_counter() - t
    page_digests = digests.get([p.gpa for p in pages])
    t = time.perf_counter()
    # the KB's shared-tuple lookup when it has one (no copy per page: CodePageDB.lookup_shared)
    lookup = (getattr(db, "lookup_shared", None) or db.lookup_digests) if db is not None else None
    hits = lookup(page_digests) if lookup is not None and pages else [[] for _ in pages]
    stats.lookup_seconds += time.perf_counter() - t
    images, claimed = _identify(pages, page_digests, hits, files)
    rest = [p for i, p in enumerate(pages) if i not in claimed]
    unknown = []
    seen: set[tuple[int, ...]] = set()
    aliased: set[tuple[int, ...]] = set()
    for _, _, ms in iter_runs(iter(rest)):
        gpas = tuple(m.gpa for m in ms)
        if gpas in seen:  # the same physical code mapped again: one fact, counted
            asp.anomalies["unknown-region-aliases"] += 1
            aliased.add(gpas)
            continue
        seen.add(gpas)
        if len(unknown) >= MAX_UNKNOWN_REGIONS:
            asp.anomalies["unknown-regions-not-listed"] += 1
            continue
        unknown.append(_unknown(asp, ms))
    if asp.anomalies.get("unknown-regions-not-listed"):
        budget.hit(f"unknown regions per address space (over {MAX_UNKNOWN_REGIONS})")
    vdso = _find_vdso(asp, images, [u for u in unknown if tuple(u.gpas) not in aliased], budget)
    if vdso is not None and not vdso.verified:
        unknown = [u for u in unknown if u.gva_start != vdso.gva_start]
    return SpaceReport(root.gpa, root.user_gpa, len(pages), images, unknown, vdso, dict(asp.anomalies), vcpus)


def _split(m: Mapping) -> Iterator[Mapping]:
    """Yield the 4 KiB pages of a (possibly large) mapping."""
    if m.size == PAGE_SIZE:
        yield m
        return
    for off in range(0, m.size, PAGE_SIZE):
        yield Mapping(m.gva + off, m.gpa + off, PAGE_SIZE, m.writable, m.user, m.nx)


def _identify(pages: list[Mapping], page_digests: list[bytes], hits: Sequence[Sequence[PageHit]], files: FileCache,
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
    with contextlib.suppress(NephoscopeError):
        head = asp.phys.read(ms[0].gpa, 64)
    return UnknownRegion(ms[0].gva, ms[-1].gva + PAGE_SIZE, [m.gpa for m in ms], ms[0].writable, head)


def _find_vdso(asp: AddressSpace, images: list[Image], unknown: list[UnknownRegion], budget: Budget) -> Vdso | None:
    """Take the vdso out of `images` (KB-verified), or name it among `unknown` (ELF header + position: unverified;
    the caller leaves out code mapped more than once, as Linux maps the vdso once per address space).

    One walk at most, whatever the number of look-alikes: it finds the highest writable user page above
    the lowest candidate, and the chosen vdso must lie above it."""
    for im in images:
        if any(c.path == VDSO_PATH for c in im.candidates):
            images.remove(im)
            if im.modified:  # the code page the kernel patched: verified against the package's image later
                return Vdso(im.gva_start, im.gva_end, "vdso (unverified)", False, [])
            return Vdso(im.gva_start, im.gva_end, "vdso", True, sorted(im.versions))
    candidates = []
    for region in unknown:
        if not _may_be_vdso(region):
            continue
        if len(candidates) >= MAX_VDSO_CANDIDATES or budget.leaves <= 0:
            budget.hit("vdso look-alikes examined")
            break
        budget.leaves -= 1  # one page read
        if _looks_like_vdso(asp, region):
            candidates.append(region)
    if not candidates:
        return None
    # Linux maps exactly one vdso per address space: above the stack on 6.1, next to ld.so in the mmap
    # area on newer kernels. Prefer the one with nothing writable above it; take a lone candidate
    # anywhere; with several and none above the stack, name none (they all stay unknown code).
    top_writable = -1
    walk = asp.iter_mappings(user_only=True, start=candidates[0].gva_end, end=USER_TOP, budget=budget)
    for m in walk:
        if m.writable:
            top_writable = max(top_writable, m.gva)
    above = [r for r in candidates if r.gva_start > top_writable]
    chosen = above[-1] if above else (candidates[0] if len(candidates) == 1 else None)
    if chosen is None:
        return None
    return Vdso(chosen.gva_start, chosen.gva_end, "vdso (unverified)", False, [])


def _may_be_vdso(region: UnknownRegion) -> bool:
    return region.pages <= 4 and not region.writable and region.head.startswith(b"\x7fELF\x02\x01")


def _looks_like_vdso(asp: AddressSpace, region: UnknownRegion) -> bool:
    """Return whether an unknown region is a small read-only ELF whose soname is linux-vdso.so.1."""
    try:
        body = asp.phys.read(region.gpas[0], PAGE_SIZE)
    except NephoscopeError:
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


def verify_kernel_code(kernel: KernelCode, phys: PhysicalMemory, db: CodePageLookup | None) -> None:
    """Verify the kernel half's code against the KB's kernel package and record it in `kernel` (no pause).

    Kernel code is only identified with the kernel's own tables (kallsyms for _text and the table bounds,
    BTF for the module list); without them the pages stay counted and `unverifiable` with the reason."""
    from nephoscope.introspect.kernelcode import verify_kernel
    from nephoscope.os.linux.model import LinuxKernel

    store = getattr(db, "kernel_store", None)
    try:
        k = LinuxKernel.open(phys)
    except NephoscopeError as exc:
        kernel.reason = f"{KERNEL_REASON}; kernel code cannot be verified without the kernel model ({exc})"
        return
    try:
        report = verify_kernel(k, store() if store is not None else None)
    except NephoscopeError as exc:
        kernel.reason = f"kernel code verification failed: {exc}"
        return
    kernel.verification = report
    bad = [f"{i.name}: {i.reason}" for i in report.images if i.status != "verified" and i.kind != "bpf"]
    kernel.reason = "; ".join(bad) if bad else ""
    from nephoscope.introspect.vdso import load_vdso_image

    kernel.vdso, kernel.vdso_reason = load_vdso_image(store() if store is not None else None, k.info.release)


def verify_vdsos(phys: PhysicalMemory, spaces: list[SpaceReport], kernel: KernelCode | None, levels: int) -> None:
    """Verify each space's unverified vDSO against the kernel package's image and its alternatives (no pause).

    The vDSO is one set of physical pages shared by every process: each distinct content is checked once."""
    if kernel is None or kernel.vdso is None:
        for sp in spaces:
            if sp.vdso is not None and not sp.vdso.verified and kernel is not None:
                sp.vdso.reason = f"vDSO not compared: {kernel.vdso_reason}"
        return
    from nephoscope.introspect.vdso import check_vdso

    image = kernel.vdso
    seen: dict[bytes, str] = {}
    for sp in spaces:
        v = sp.vdso
        if v is None or v.verified:
            continue
        asp = AddressSpace(phys, sp.user_cr3, levels)
        got, present = bytearray(), []
        for gva in range(v.gva_start, v.gva_end, PAGE_SIZE):
            try:
                got += asp.read(gva, PAGE_SIZE)
                present.append(True)
            except NephoscopeError:
                got += bytes(PAGE_SIZE)
                present.append(False)
        key = page_digest(bytes(got)) + bytes(present)
        if key not in seen:
            seen[key] = check_vdso(bytes(got), image, present)
        why = seen[key]
        if why:
            v.reason = why
        else:
            sp.vdso = Vdso(v.gva_start, v.gva_end, "vdso", True, [(image.package, image.version)])


# --- the whole image ------------------------------------------------------------------------------------


def scan(phys: PhysicalMemory, db: CodePageLookup | None, *, vcpus: Sequence[VcpuState] = (), vm: str = "",
         levels: int | None = None, budget: Budget | None = None, verify_kernel: bool = True) -> ArchReport:
    """Scan guest-physical memory for every address space and identify its executable pages (no pause).

    `vcpus` are known roots with their paging mode (CR4.LA57 → 5-level); `levels` overrides it. Every
    walk and read draws on `budget` (default: SCAN_BUDGET). `verify_kernel` also verifies the kernel's
    text and modules against the KB's kernel package (needs the guest's kallsyms and BTF; see
    `introspect.kernelcode`). Raises only NephoscopeError."""
    budget = budget if budget is not None else Budget(*SCAN_BUDGET)
    try:
        return _scan(phys, db, vcpus, vm, levels, budget, verify_kernel)
    except _GUEST_ERRORS as exc:
        raise GuestDataError(f"{vm or 'image'}: malformed guest memory stopped the arch scan ({exc!r})") from exc


def _scan(phys: PhysicalMemory, db: CodePageLookup | None, vcpus: Sequence[VcpuState], vm: str,
          levels: int | None, budget: Budget, verify_kernel: bool = True) -> ArchReport:
    started = time.perf_counter()
    stats = ScanStats()
    levels = levels or next((v.levels for v in vcpus if v.cr4), 4)
    roots = scan_roots(phys, known=[v.cr3 for v in vcpus], budget=budget)
    stats.root_seconds = time.perf_counter() - started
    stats.root_candidates, stats.roots_rejected = roots.candidates, dict(roots.rejected)
    found = {r.gpa for r in roots.roots} | {r.user_gpa for r in roots.roots}
    missing = sorted({v.cr3 & ADDR_MASK for v in vcpus} - found)
    digests = DigestCache(phys, stats)
    files = FileCache(db)
    kernel = _kernel_code(phys, roots, levels, stats, budget)
    if kernel is not None and verify_kernel:
        t = time.perf_counter()
        verify_kernel_code(kernel, phys, db)
        stats.kernel_seconds = time.perf_counter() - t
    spaces = []
    process_roots = roots.process_roots
    for n, root in enumerate(process_roots):
        if budget.exhausted:
            budget.hit(f"address spaces ({len(process_roots) - n} of {len(process_roots)} not walked)")
            break
        on = [v.index for v in vcpus if v.cr3 & ADDR_MASK in (root.gpa, root.user_gpa)]
        spaces.append(identify_space(phys, root, levels, db, budget, digests=digests, files=files, stats=stats,
                                     vcpus=on))
    verify_vdsos(phys, spaces, kernel, levels)
    stats.seconds = time.perf_counter() - started
    problem = ""
    if not roots.roots:
        problem = (f"no x86-64 page-table root found in {sum(e - s for s, e in phys.ranges)} bytes of RAM "
                   f"({roots.candidates} candidates; rejected: {dict(roots.rejected) or 'none'}): not a guest "
                   "memory image, incomplete RAM, or a non-Linux page-table layout")
    elif budget.caps:
        problem = ("work cap reached, results are incomplete (fake or corrupt tables?): "
                   + "; ".join(f"{what} ×{n}" for what, n in budget.caps.items())
                   + f" ({len(spaces)} of {len(process_roots)} address spaces walked; budget {SCAN_BUDGET[0]} "
                   f"page tables / {SCAN_BUDGET[1]} pages by default)")
    report = ArchReport(vm, spaces, kernel, [r.gpa for r in roots.roots if not r.user_entries], missing, stats,
                        problem, dict(budget.caps), memory_problems=list(getattr(phys, "problems", [])))
    report.doubt = image_doubt(report, kb_has_pages(db))
    return report


def kb_has_pages(db: CodePageLookup | None) -> bool:
    """Return whether the code-page DB can identify anything (open and not empty)."""
    if db is None:
        return False
    stats = getattr(db, "stats", None)
    if stats is None:
        return True  # a lookup without statistics (tests, remote KBs): assume it holds something
    try:
        return bool(stats().pages)
    except NephoscopeError:
        return False


_LAYOUT_DOUBT = ("overlapping", "misaligned", "absurd")  # header faults that misplace the RAM that is kept


def image_doubt(report: ArchReport, kb_loaded: bool) -> str:
    """Return why the memory image itself, not the guest, is inconsistent ("" when it reads like a guest).

    A compromised guest shows a few unknown regions among many identified images, under a kernel half
    that maps kernel text; a misread image (RAM misplaced in the dump's headers, a wrong layout, page
    tables that lead elsewhere) identifies almost nothing, or has no kernel text at all.
    """
    why = []
    if report.spaces and report.kernel is not None and report.kernel.pages == 0:
        why.append("the kernel half of the page tables maps no executable supervisor page (every x86-64 Linux "
                   "maps its text there): the tables are not where the image says")
    layout = [p for p in report.memory_problems if any(w in p for w in _LAYOUT_DOUBT)]
    if layout:
        why.append("the dump's RAM layout is implausible (" + "; ".join(layout) + ")")
    exec_pages = sum(sp.exec_pages for sp in report.spaces)
    identified = sum(sp.identified_pages for sp in report.spaces)
    if kb_loaded and exec_pages >= MIN_EXEC_PAGES and identified < MIN_IDENTIFIED * exec_pages:
        why.append(f"only {identified} of {exec_pages} user executable pages ({identified / exec_pages:.0%}) "
                   f"match the code-page DB across {len(report.spaces)} address spaces, below {MIN_IDENTIFIED:.0%} "
                   "(a guest, even a compromised one, runs mostly packaged code: RAM is misplaced in the dump's "
                   "headers, or the KB lacks this distribution)")
    return "; ".join(why)
