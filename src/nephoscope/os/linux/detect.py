"""Identify a Linux guest from raw guest-physical RAM with zero configuration, stage by stage.

Stages: banner ("Linux version ..."), kallsyms (the kernel's own symbol tables), phys/virt base (KASLR
slides, `phys_base`), page-table root (`init_top_pgt`, 4 or 5 levels), btf (`__start_BTF`..`__stop_BTF`).
Each stage records ok/failed and why in a DetectionReport; later stages use what earlier ones proved.
Nothing here pauses the VM: on a live guest, pause it first if you need one consistent instant.
"""

from __future__ import annotations

import dataclasses
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from nephoscope.core.errors import DetectionError, GuestDataError, MemoryAccessError, NephoscopeError
from nephoscope.memory.paging import AddressSpace
from nephoscope.os.linux.kallsyms import Kallsyms, Phys, iter_find, recover_kallsyms

if TYPE_CHECKING:  # parsed only when a stage needs it: a cached model does not
    from nephoscope.os.btf.reader import Btf

START_KERNEL_MAP = 0xFFFFFFFF80000000  # __START_KERNEL_map: gva of physical 0 + phys_base
LINK_TEXT_GVA = 0xFFFFFFFF81000000  # _text at link time (CONFIG_PHYSICAL_START above the map)
LINK_TEXT_GPA = 0x1000000  # CONFIG_PHYSICAL_START: where an unrandomised kernel is loaded
KERNEL_ALIGN = 0x200000  # CONFIG_PHYSICAL_ALIGN on x86-64 distributions
BANNER_PREFIX = b"Linux version "
MAX_BANNER = 512
MAX_BTF = 64 << 20
MAX_NOTES = 64 << 10
NT_GNU_BUILD_ID = 3
_MASK64 = (1 << 64) - 1
FIXED_BASES = {4: {"page_offset_base": 0xFFFF888000000000, "vmalloc_base": 0xFFFFC90000000000,
                   "vmemmap_base": 0xFFFFEA0000000000},
               5: {"page_offset_base": 0xFF11000000000000, "vmalloc_base": 0xFFA0000000000000,
                   "vmemmap_base": 0xFFD4000000000000}}
_RELEASE = re.compile(r"Linux version (\S+)")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Stage:
    """One detection stage's outcome."""

    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass(slots=True)
class DetectionReport:
    """Which detection stages succeeded, which failed and why (in order)."""

    stages: list[Stage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.stages) and all(s.ok for s in self.stages)

    def stage(self, name: str) -> Stage | None:
        """Return the stage called `name`, or None if it did not run."""
        return next((s for s in self.stages if s.name == name), None)

    def failed(self) -> list[Stage]:
        """Return the stages that failed."""
        return [s for s in self.stages if not s.ok]

    def require(self, *names: str) -> None:
        """Raise DetectionError naming the first of `names` that failed or did not run."""
        for name in names:
            s = self.stage(name)
            if s is not None and not s.ok:
                before = self.stages[:self.stages.index(s)]
                earlier = next((f for f in before if not f.ok), None)  # e.g. no banner: probably not Linux
                also = f" (before it, stage {earlier.name} failed: {earlier.detail})" if earlier else ""
                raise DetectionError(f"stage {name}: {s.detail}{also}")
            if s is None:
                first = next(iter(self.failed()), None)
                if first is not None:  # the cause is the earlier stage: name it, not the one that never ran
                    raise DetectionError(f"stage {first.name}: {first.detail} (so stage {name} did not run)")
                raise DetectionError(f"stage {name}: did not run")

    def summary(self) -> str:
        """Return one line per stage: ok/FAILED, seconds, detail."""
        return "\n".join(f"{s.name:<16} {'ok' if s.ok else 'FAILED':<7} {s.seconds * 1000:7.1f} ms  {s.detail}"
                         for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"ok": self.ok, "stages": [asdict(s) for s in self.stages]}


@dataclass(frozen=True, slots=True)
class KernelInfo:
    """What detection proved about the guest kernel (gva = kernel virtual, gpa = guest physical)."""

    banner: str
    release: str
    text_gva: int  # runtime _text
    text_gpa: int
    virt_slide: int  # _text - 0xffffffff81000000 (0 without KASLR)
    phys_slide: int  # text_gpa - 0x1000000 (may be negative)
    phys_base: int  # kernel-map gva - 0xffffffff80000000 + phys_base = gpa (mod 2**64)
    init_top_pgt_gpa: int  # the kernel page-table root (swapper_pg_dir)
    levels: int  # 4 or 5
    page_offset_base: int  # gva of the direct map of physical 0
    vmalloc_base: int
    vmemmap_base: int
    num_syms: int
    btf_gpa: int | None = None
    btf_size: int = 0
    build_id: str | None = None  # the GNU build id note of vmlinux (hex), when the kernel has one

    @property
    def kaslr(self) -> bool:
        return self.virt_slide != 0 or self.phys_slide != 0

    def kernel_gpa(self, gva: int) -> int:
        """Return the gpa of kernel-image gva `gva` (text/data/bss), without walking page tables."""
        return (gva - START_KERNEL_MAP + self.phys_base) & _MASK64

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with addresses in hex."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, int) and k not in ("levels", "num_syms", "btf_size", "virt_slide", "phys_slide"):
                d[k] = hex(v)
        d["kaslr"] = self.kaslr
        return d


@dataclass(slots=True)
class Detection:
    """Everything detection produced: the info record, the report and the objects later layers reuse."""

    report: DetectionReport
    info: KernelInfo | None = None
    kallsyms: Kallsyms | None = None
    kernel_space: AddressSpace | None = None
    btf: Btf | None = None
    banners: list[tuple[int, str]] = field(default_factory=list)


def _run(report: DetectionReport, name: str, fn: Callable[[], tuple[T, str]]) -> T | None:
    """Run stage `fn` (returning (value, detail)); record ok/failed with timing; return value or None."""
    t0 = time.perf_counter()
    try:
        value, detail = fn()
    except (NephoscopeError, struct.error, ValueError, IndexError, OverflowError) as exc:
        report.stages.append(Stage(name, False, str(exc), time.perf_counter() - t0))
        return None
    report.stages.append(Stage(name, True, detail, time.perf_counter() - t0))
    return value


def iter_banners(phys: Phys) -> Iterator[tuple[int, str]]:
    """Yield (gpa, text) of each plausible "Linux version ..." string in guest RAM."""
    for gpa in iter_find(phys, BANNER_PREFIX):
        try:
            raw = phys.read(gpa, MAX_BANNER)
        except MemoryAccessError:
            continue
        text = raw.split(b"\n", 1)[0].split(b"\0", 1)[0]
        if len(text) < 24 or not all(0x20 <= c < 0x7F for c in text):
            continue
        yield gpa, text.decode("ascii")


def _read_u64(phys: Phys, gpa: int) -> int:
    return int.from_bytes(phys.read(gpa, 8), "little")


def phys_base_ok(phys: Phys, syms: Kallsyms, phys_base: int) -> bool:
    """Return whether the kernel's `phys_base` variable, read at its gpa under `phys_base`, agrees."""
    gva = syms.find("phys_base")
    if gva is None:
        return False
    try:
        return _read_u64(phys, (gva - START_KERNEL_MAP + phys_base) & _MASK64) == phys_base
    except MemoryAccessError:
        return False


def banner_at(phys: Phys, syms: Kallsyms, phys_base: int) -> bool:
    """Return whether "Linux version " sits at linux_banner's gpa under `phys_base` (True without the symbol)."""
    gva = syms.find("linux_banner")
    if gva is None:
        return True  # nothing to contradict
    try:
        return phys.read((gva - START_KERNEL_MAP + phys_base) & _MASK64, len(BANNER_PREFIX)) == BANNER_PREFIX
    except MemoryAccessError:
        return False


def find_phys_base(phys: Phys, syms: Kallsyms) -> tuple[int, str]:
    """Return (phys_base, how): the aligned load address where the phys_base variable and linux_banner agree."""
    text_gva = syms.get("_text")
    for start, end in phys.ranges:
        for text_gpa in range((start + KERNEL_ALIGN - 1) & ~(KERNEL_ALIGN - 1), end, KERNEL_ALIGN):
            pb = (text_gpa - (text_gva - START_KERNEL_MAP)) & _MASK64
            if phys_base_ok(phys, syms, pb) and banner_at(phys, syms, pb):
                return pb, f"_text at gpa 0x{text_gpa:x}: the phys_base variable and linux_banner agree"
    raise DetectionError("no physical load address makes the phys_base variable and linux_banner consistent; "
                         "the kallsyms found may belong to a stale copy of another kernel")


def find_virt_slide(phys: Phys, syms: Kallsyms) -> tuple[Kallsyms, int]:
    """Return `syms` (link-time, from a file) slid to runtime gvas, and the slide, using linux_banner."""
    banner, pb_var = syms.get("linux_banner"), syms.get("phys_base")
    for gpa, _text in iter_banners(phys):
        try:  # the image is physically contiguous: phys_base sits at a fixed distance from the banner
            pb = _read_u64(phys, gpa + pb_var - banner)
        except MemoryAccessError:
            continue
        slide = ((gpa - pb - (banner - START_KERNEL_MAP)) + (1 << 63)) % (1 << 64) - (1 << 63)
        if slide % KERNEL_ALIGN or not 0 <= slide < (1 << 30):
            continue
        slid = syms.relocated(slide)
        if phys_base_ok(phys, slid, pb):
            return slid, slide
    raise DetectionError("no linux_banner copy in RAM agrees with the symbol file's phys_base; "
                         "the file belongs to another kernel build")


def kernel_page_tables(phys: Phys, syms: Kallsyms, phys_base: int) -> tuple[AddressSpace, str]:
    """Return the kernel address space rooted at init_top_pgt, checked by translating _text and linux_banner."""
    root = (syms.get("init_top_pgt") - START_KERNEL_MAP + phys_base) & _MASK64
    l5_gva = syms.find("__pgtable_l5_enabled")
    levels = 4
    if l5_gva is not None:
        l5 = int.from_bytes(phys.read((l5_gva - START_KERNEL_MAP + phys_base) & _MASK64, 4), "little")
        levels = 5 if l5 == 1 else 4
    checks = [syms.get("_text")] + [g for g in (syms.find("linux_banner"), syms.find("init_task")) if g]
    errors = []
    for lv in (levels, 9 - levels):
        space = AddressSpace(phys, root, lv)
        bad = [g for g in checks if space.find_translation(g) != (g - START_KERNEL_MAP + phys_base) & _MASK64]
        if not bad:
            return space, f"init_top_pgt at gpa 0x{root:x}, {lv}-level; _text, linux_banner, init_task translate"
        errors.append(f"{lv}-level: 0x{bad[0]:x} does not translate to its kernel-map gpa")
    raise DetectionError(f"init_top_pgt at gpa 0x{root:x} does not map the kernel ({'; '.join(errors)})")


def btf_location(syms: Kallsyms, phys_base: int) -> tuple[int, int] | None:
    """Return (gpa, size) of the vmlinux BTF from __start_BTF/__stop_BTF, or None without those symbols."""
    start, stop = syms.find("__start_BTF"), syms.find("__stop_BTF")
    if start is not None and stop is not None and 0 < stop - start <= MAX_BTF:
        return (start - START_KERNEL_MAP + phys_base) & _MASK64, stop - start
    return None


def _btf(phys: Phys, syms: Kallsyms, phys_base: int) -> tuple[tuple[Btf, int, int], str]:
    from nephoscope.os.btf.reader import Btf

    where = btf_location(syms, phys_base)
    if where is not None:
        gpa, size = where
        try:
            btf = Btf.parse(phys.read(gpa, size), label=f"vmlinux BTF at gpa 0x{gpa:x}")
        except GuestDataError as exc:
            raise DetectionError(f"{exc}; pass this kernel's types with --symbols FILE (a Volatility 3 ISF, "
                                 "a vmlinux with BTF or DWARF)") from exc
        return (btf, gpa, size), f"__start_BTF at gpa 0x{gpa:x}, {size} bytes, {len(btf)} types"
    from nephoscope.os.btf.locate import get_vmlinux_btf  # a scan: only when the symbols are missing

    located = get_vmlinux_btf(phys)  # type: ignore[arg-type]
    return (located.btf, located.gpa, located.size), f"no __start_BTF symbol; scanned: BTF at 0x{located.gpa:x}"


def detect(phys: Phys, *, symbols: Kallsyms | None = None, want_btf: bool = True) -> Detection:
    """Identify the Linux kernel in guest-physical `phys` (does not pause the VM); never raises for guest data."""
    report = DetectionReport()
    det = Detection(report)

    def banner_stage() -> tuple[list[tuple[int, str]], str]:
        # the first banner only: it places the kallsyms search; linux_banner itself is proved later
        found = next(iter_banners(phys), None)
        if found is None:
            raise DetectionError("no \"Linux version ...\" banner in guest RAM: not Linux, or RAM is encrypted")
        return [found], f"first at gpa 0x{found[0]:x}: {found[1][:60]!r}"

    det.banners = _run(report, "banner", banner_stage) or []

    def kallsyms_stage() -> tuple[Kallsyms, str]:
        if symbols is not None and symbols.link_time:
            slid, slide = find_virt_slide(phys, symbols)
            return slid, f"{len(symbols)} symbols from a file, KASLR slide 0x{slide:x} found via linux_banner"
        if symbols is not None:
            return symbols, f"{len(symbols)} symbols supplied by the caller"
        reasons: list[str] = []
        syms = recover_kallsyms(phys, near=[g for g, _ in det.banners], reasons=reasons)
        lay = syms.layout
        return syms, (f"{len(syms)} symbols; token table at gpa 0x{lay.token_table_gpa:x}, {lay.order}, "
                      f"markers u{8 * lay.marker_width}, seqs_of_names {'yes' if lay.seqs_gpa else 'no'}")

    det.kallsyms = _run(report, "kallsyms", kallsyms_stage)
    syms = det.kallsyms
    if syms is None:
        return det
    pb_how = _run(report, "phys/virt base", lambda: _with_detail(find_phys_base(phys, syms)))
    if pb_how is None:
        return det
    phys_base = pb_how
    space = _run(report, "page-table root", lambda: kernel_page_tables(phys, syms, phys_base))
    if space is None:
        return det
    det.kernel_space = space
    btf_found = _run(report, "btf", lambda: _btf(phys, syms, phys_base)) if want_btf else None
    if btf_found is not None:
        det.btf = btf_found[0]
    try:
        det.info = kernel_info(phys, syms, phys_base, space, det.banners, btf_found)
    except (MemoryAccessError, DetectionError, GuestDataError) as exc:
        report.stages.append(Stage("kernel info", False, str(exc), 0.0))
    return det


def add_btf(phys: Phys, det: Detection) -> None:
    """Run the btf stage on a detection made with want_btf=False (fills det.btf and the info's BTF fields)."""
    if det.info is None or det.kallsyms is None or det.report.stage("btf") is not None:
        return
    syms, phys_base = det.kallsyms, det.info.phys_base
    found = _run(det.report, "btf", lambda: _btf(phys, syms, phys_base))
    if found is not None:
        det.btf = found[0]
        det.info = dataclasses.replace(det.info, btf_gpa=found[1], btf_size=found[2])


def read_build_id(space: AddressSpace, syms: Kallsyms) -> str | None:
    """Return the hex GNU build id from the kernel's .notes (kernel gva, via `space`), or None."""
    start, stop = syms.find("__start_notes"), syms.find("__stop_notes")
    if start is None or stop is None or not 0 < stop - start <= MAX_NOTES:
        return None
    try:
        notes = space.read(start, stop - start)
    except MemoryAccessError:
        return None
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, pos)
        name_end = pos + 12 + namesz
        desc_at = pos + 12 + ((namesz + 3) & ~3)
        if name_end > len(notes) or desc_at + descsz > len(notes):
            return None
        if kind == NT_GNU_BUILD_ID and notes[pos + 12:name_end] == b"GNU\0" and 0 < descsz <= 64:
            return notes[desc_at:desc_at + descsz].hex()
        pos = desc_at + ((descsz + 3) & ~3)
    return None


def _with_detail(pair: tuple[int, str]) -> tuple[int, str]:
    pb, how = pair
    return pb, f"phys_base 0x{pb:x} ({how})"


def kernel_info(phys: Phys, syms: Kallsyms, phys_base: int, space: AddressSpace, banners: list[tuple[int, str]],
                btf_found: tuple[Btf, int, int] | None) -> KernelInfo:
    """Return the KernelInfo of a proved kernel: banner through the page tables, slides, bases, build id."""
    text_gva = syms.get("_text")
    text_gpa = (text_gva - START_KERNEL_MAP + phys_base) & _MASK64
    banner_gva = syms.find("linux_banner")
    banner = ""
    if banner_gva is not None:
        raw = space.read(banner_gva, MAX_BANNER)
        banner = raw.split(b"\n", 1)[0].split(b"\0", 1)[0].decode("ascii", "replace")
    elif banners:
        banner = banners[0][1]
    m = _RELEASE.match(banner)

    def var(name: str) -> int:  # without CONFIG_RANDOMIZE_MEMORY these are constants, not variables
        gva = syms.find(name)
        return space.read_u64(gva) if gva is not None else FIXED_BASES[space.levels][name]

    return KernelInfo(
        banner=banner, release=m.group(1) if m else "", text_gva=text_gva, text_gpa=text_gpa,
        virt_slide=text_gva - LINK_TEXT_GVA, phys_slide=text_gpa - LINK_TEXT_GPA, phys_base=phys_base,
        init_top_pgt_gpa=space.cr3, levels=space.levels, page_offset_base=var("page_offset_base"),
        vmalloc_base=var("vmalloc_base"), vmemmap_base=var("vmemmap_base"), num_syms=len(syms),
        btf_gpa=btf_found[1] if btf_found else None, btf_size=btf_found[2] if btf_found else 0,
        build_id=read_build_id(space, syms))
