"""Verify the running kernel's code against the Debian kernel package: the vmlinux text and every module's text,
page by page, after undoing what the kernel itself legitimately changes at boot and load.

Normalised (see docs/kernel.md): KASLR (the vmlinux relocation table, slide = kallsyms `_text` − link
`_text`), alternatives, paravirt sites, jump labels, static calls and their trampolines, retpoline and
return-thunk sites, call-depth sites, lock prefixes on one CPU, ENDBR sealing, ftrace/mcount sites — each
from the image's own tables in the package file (a .ko's after its relocations) — and module relocations
(symbol values from the guest's kallsyms and module symbols). Everything outside a site must be
byte-identical; a site may only hold a variant the kernel writes there.

Addresses are kernel guest-virtual (init_top_pgt) unless named `link` (the package's ELF addresses).
Nothing here pauses the VM: pause it first for a consistent view of a live guest.
"""

from __future__ import annotations

import bisect
import dataclasses
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from nephoscope.core.errors import GuestDataError, KnowledgeError, MemoryAccessError, NephoscopeError
from nephoscope.knowledge.kernelpkg import HEADER_ONLY, KernelImageFile, KernelStore, Section
from nephoscope.memory.paging import AddressSpace, Budget, iter_runs
from nephoscope.os.linux import patchsites as ps

if TYPE_CHECKING:
    from nephoscope.os.linux.model import LinuxKernel

PAGE = 4096
MAX_CHANGES = 64  # changed byte runs listed per image (the rest are counted)
MAX_TEXT = 256 << 20  # no kernel text is this large
MAX_MODULE_SECTIONS = 256
BPF_PACK_SIZE = 2 << 20  # BPF_PROG_PACK_SIZE with huge vmalloc pages on one NUMA node
THUNKS = ("__x86_return_thunk", "srso_return_thunk", "srso_alias_return_thunk", "retbleed_return_thunk",
          "its_return_thunk", "entry_untrain_ret", "zen_untrain_ret", "call_depth_return_thunk", "srso_untrain_ret",
          "retbleed_untrain_ret", "__ret")
FTRACE = ("__fentry__", "ftrace_caller", "ftrace_regs_caller", "ftrace_stub", "ftrace_stub_graph")
FTRACE_CALLS = ("ftrace_call", "ftrace_regs_call")  # the patched call sites inside ftrace_caller/ftrace_regs_caller
VERIFIED, MODIFIED, UNVERIFIABLE = "verified", "modified", "unverifiable"
UNSHIPPED = "unshipped"  # internal: a listed module its kernel package does not ship (reported as unknown code)
R_X86_64_64, R_X86_64_PC32, R_X86_64_PLT32, R_X86_64_32, R_X86_64_32S, R_X86_64_PC64 = 1, 2, 4, 10, 11, 24
_BAD = (GuestDataError, MemoryAccessError, ValueError, OverflowError, IndexError, KeyError, struct.error)


@dataclass(frozen=True, slots=True)
class ByteChange:
    """A run of bytes that differ from every legitimate variant: where, in which function, old and new."""

    gva: int
    function: str  # symbol+0xoffset
    old: bytes  # the package's bytes (relocated)
    new: bytes  # the guest's bytes
    site: str = ""  # the patch-site kind when the bytes are a site holding a foreign variant


@dataclass(slots=True)
class ImageVerdict:
    """The verdict on one kernel image (the vmlinux or one module)."""

    name: str  # "vmlinux" or the module name
    kind: str  # "vmlinux" | "module"
    status: str  # verified | modified | unverifiable
    reason: str = ""
    package: str = ""
    version: str = ""
    ranges: list[tuple[int, int]] = field(default_factory=list)  # executable gva ranges this image explains
    pages: int = 0
    pages_verified: int = 0
    modified_pages: list[int] = field(default_factory=list)
    changes: list[ByteChange] = field(default_factory=list)
    changes_not_listed: int = 0
    normalised: dict[str, int] = field(default_factory=dict)  # sites whose bytes differed, by kind
    symbols: list[tuple[int, str]] = field(default_factory=list)  # (gva, name) sorted, to name functions

    def function_at(self, gva: int) -> str:
        """Return symbol+offset for a gva inside this image ("" when no symbol precedes it)."""
        i = bisect.bisect_right(self.symbols, (gva, "\U0010ffff")) - 1
        if i < 0:
            return ""
        at, name = self.symbols[i]
        return f"{name}+0x{gva - at:x}"


@dataclass(frozen=True, slots=True)
class CodeLocation:
    """What a kernel gva is: inside which image, whether that image is verified, and which function."""

    image: str  # "vmlinux", a module name, or "" for unknown kernel code
    status: str  # the image's status, or "unknown"
    function: str
    page_verified: bool  # the page holding gva matched the package


@dataclass(slots=True)
class KernelCodeReport:
    """Kernel code identity: one verdict per image and the executable kernel memory that belongs to none."""

    release: str
    images: list[ImageVerdict]
    unknown: list[tuple[int, int]]  # executable supervisor gva ranges in no image (unknown kernel code)
    exec_pages: int
    seconds: float = 0.0
    problem: str = ""  # why nothing could be verified ("" when the verifier ran)
    kernel_symbol: Callable[[int], str] | None = None  # names core-kernel gvas (kallsyms), for `classify`
    # listed modules the KB's kernel package does not ship: name -> text gva range (their pages are unknown code)
    unshipped: dict[str, tuple[int, int]] = field(default_factory=dict)
    # code the kernel's own lists say it generated (kprobe instruction pages, ftrace trampolines): [start, end), label
    generated: list[tuple[int, int, str]] = field(default_factory=list)

    def unknown_owner(self, gva: int) -> str:
        """Return the listed module whose text holds unknown-code gva `gva` ("" when no listed module claims it)."""
        return next((n for n, (a, b) in self.unshipped.items() if a <= gva < b), "")

    def describe_unknown(self, start: int, end: int) -> str:
        """Return why kernel gva range [start, end) is unknown kernel code, naming a module that claims it."""
        owners = sorted({n for n, (a, b) in self.unshipped.items() if a < end and start < b})
        if owners:
            return (f"executable kernel memory of module {', '.join(owners)}, which the KB's package "
                    f"linux-image-{self.release} does not ship (the provider's or someone else's own module)")
        labels = sorted({lab for a, b, lab in self.generated if a < end and start < b and lab != "bpf-prog-pack"})
        if labels:
            return (f"executable kernel memory in no kernel image or known module; the kernel's own lists call it "
                    f"{', '.join(labels)} (generated at run time: its bytes cannot be verified)")
        return "executable kernel memory in no kernel image or known module"

    @property
    def verified(self) -> bool:
        """Return whether every packaged image (all but BPF JIT memory) is verified and no unknown code exists."""
        return not self.problem and not self.unknown and all(i.status == VERIFIED for i in self.images
                                                             if i.kind != "bpf")

    def image(self, name: str) -> ImageVerdict | None:
        """Return the verdict of image `name` ("vmlinux" or a module name), or None."""
        return next((i for i in self.images if i.name == name), None)

    def classify(self, gva: int) -> CodeLocation | None:
        """Return which image kernel gva `gva` lies in (None when it is not executable kernel memory seen here).

        The public question for pointer checks (system-call table, IDT, LSTAR, hooks): a target is
        trustworthy when `loc.status == "verified"` (or `loc.page_verified`)."""
        for im in self.images:
            for a, b in im.ranges:
                if a <= gva < b:
                    page = gva & ~(PAGE - 1)
                    ok = im.status == VERIFIED or (im.status == MODIFIED and page not in im.modified_pages)
                    name = (self.kernel_symbol(gva) if im.name == "vmlinux" and self.kernel_symbol
                            else im.function_at(gva))
                    return CodeLocation(im.name, im.status, name, ok)
        for a, b in self.unknown:
            if a <= gva < b:
                owner = self.unknown_owner(gva)
                return CodeLocation("", "unknown", f"module {owner} (not shipped by the package)" if owner else "",
                                    False)
        return None


# --- helpers ----------------------------------------------------------------------------------------------


def _read(space: AddressSpace, gva: int, size: int) -> tuple[bytearray, list[int]]:
    """Return `size` bytes at kernel gva page by page; unmapped pages read as zero and are listed."""
    out = bytearray(size)
    missing = []
    pos = 0
    while pos < size:
        n = min(size - pos, PAGE - ((gva + pos) & (PAGE - 1)))
        try:
            out[pos:pos + n] = space.phys.read(space.translate(gva + pos), n)
        except MemoryAccessError:
            missing.append((gva + pos) & ~(PAGE - 1))
        pos += n
    return out, missing


def _apply_relocs(expected: bytearray, link: int, slide: int, relocs: Section) -> int:
    """Apply the vmlinux KASLR relocations inside [link, link+len(expected)); return how many were applied."""
    r32, r32neg, r64 = ps.parse_relocs(relocs.data)
    buf = np.frombuffer(expected, np.uint8)
    applied = 0
    for addrs, width, sign in ((r32, 4, 1), (r32neg, 4, -1), (r64, 8, 1)):
        pos = (addrs - np.uint64(link)).view(np.int64)  # wraps: addresses below `link` become negative
        pos = pos[(pos >= 0) & (pos <= len(expected) - width)]
        if not pos.size:
            continue
        idx = pos[:, None] + np.arange(width)
        words = buf[idx].copy().view("<u8" if width == 8 else "<u4").ravel()
        mask = (1 << (8 * width)) - 1
        words = (words.astype(np.uint64) + np.uint64((sign * slide) & mask)) & np.uint64(mask)
        buf[idx] = words.astype("<u8" if width == 8 else "<u4").view(np.uint8).reshape(-1, width)
        applied += pos.size
    return applied


def _runs(positions: np.ndarray, gap: int = 1) -> list[tuple[int, int]]:
    """Group sorted positions into [start, end) runs (positions closer than `gap` join)."""
    if not positions.size:
        return []
    breaks = np.flatnonzero(np.diff(positions) > gap)
    starts = np.concatenate(([positions[0]], positions[breaks + 1]))
    ends = np.concatenate((positions[breaks], [positions[-1]])) + 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


class _Checker:
    """Decide, byte run by byte run, whether differences from the package are legitimate site variants."""

    def __init__(self, sites: Sequence[ps.Site], targets: ps.Targets, slide: int = 0) -> None:
        self.sites, self.starts = ps.sort_sites(sites)
        self.targets = targets
        self.slide = slide  # run-time gva − site address (the vmlinux's sites stay in link addresses)
        self.max_len = max((s.length for s in self.sites), default=0)

    def covering(self, gva: int) -> list[ps.Site]:
        """Return the sites whose span holds `gva`."""
        hi = bisect.bisect_right(self._starts_list, gva)
        out = []
        for i in range(hi - 1, -1, -1):
            s = self.sites[i]
            if s.start + self.max_len <= gva:
                break
            if s.start <= gva < s.start + s.length:
                out.append(s)
        return out

    @property
    def _starts_list(self) -> list[int]:
        cached = getattr(self, "_sl", None)
        if cached is None:
            cached = self._sl = self.starts.tolist()
        return cached

    def check(self, base: int, expected: bytes | bytearray, got: bytes | bytearray, diff: np.ndarray,
              counts: dict[str, int]) -> np.ndarray:
        """Return the positions of `diff` (offsets from gva `base`) that no accepting site explains."""
        bad: list[np.ndarray] = []
        verdicts: dict[int, bool] = {}
        starts, sites = self._starts_list, self.sites
        for a, b in _runs(diff):  # runs of consecutive differing bytes
            ga, gb = base + a, base + b
            accepted: list[tuple[int, int]] = []
            reach = ga  # the run is explained up to here by accepting sites (sites come sorted by start)
            for i in range(bisect.bisect_left(starts, ga - self.max_len + 1), bisect.bisect_left(starts, gb)):
                s = sites[i]
                end = s.start + s.length
                if end <= ga:
                    continue
                v = verdicts.get(i)
                if v is None:
                    lo, hi = s.start - base, end - base
                    v = verdicts[i] = lo >= 0 and hi <= len(got) and ps.accepts(
                        s, bytes(expected[lo:hi]), bytes(got[lo:hi]), self.slide, self.targets)
                    if v:
                        counts[s.kind] = counts.get(s.kind, 0) + 1
                if v:
                    accepted.append((s.start, end))
                    if s.start <= reach:
                        reach = max(reach, end)
            if reach >= gb:
                continue
            covered = np.zeros(b - a, bool)
            for lo, hi in accepted:
                covered[max(lo, ga) - ga: min(hi, gb) - ga] = True
            bad.append(a + np.flatnonzero(~covered))
        return np.concatenate(bad) if bad else np.zeros(0, np.int64)


def _changes(verdict: ImageVerdict, base: int, expected: bytes | bytearray, got: bytes | bytearray,
             bad: np.ndarray, checker: _Checker, namer: object) -> None:
    """Record the changed runs and pages of one verified range."""
    for a, b in _runs(bad, gap=8):
        gva = base + a
        kinds = {s.kind for s in checker.covering(gva - checker.slide)}
        if len(verdict.changes) < MAX_CHANGES:
            verdict.changes.append(ByteChange(gva, namer(gva), bytes(expected[a:b]), bytes(got[a:b]),  # type: ignore[operator]
                                              ",".join(sorted(kinds))))
        else:
            verdict.changes_not_listed += 1
    for page in sorted({(base + int(p)) & ~(PAGE - 1) for p in bad.tolist()}):
        if page not in verdict.modified_pages:
            verdict.modified_pages.append(page)


# --- the verifier -----------------------------------------------------------------------------------------


class KernelVerifier:
    """Verify one guest kernel's code against the KB (kernel model `k`, KB kernel store `store`)."""

    def __init__(self, k: LinuxKernel, store: KernelStore | None) -> None:
        self.k = k
        self.store = store
        self.space = k.kernel
        self.release = k.info.release or ""
        sym = k.symbols
        self._thunks = {a for n in THUNKS if (a := sym.find(n)) is not None}
        self._ftrace = {a for n in FTRACE if (a := sym.find(n)) is not None}
        self.text_range = (sym.find("_text") or 0, sym.find("_etext") or 0)
        self.code_ranges: list[tuple[int, int]] = [self.text_range]
        self.module_symbols: dict[str, int] = {}
        self._into_modules: set[int] | None = None  # while the vmlinux is verified: targets in module text
        self.targets = ps.Targets(self._is_code, self._thunks.__contains__, self._ftrace.__contains__)

    def _is_code(self, gva: int) -> bool:
        hit = any(a <= gva < b for a, b in self.code_ranges)
        if hit and self._into_modules is not None and not self.text_range[0] <= gva < self.text_range[1]:
            self._into_modules.add(gva)  # a vmlinux site accepted for pointing into module text: recorded
        return hit

    # --- vmlinux -------------------------------------------------------------------------------------

    def verify_vmlinux(self) -> ImageVerdict:
        """Return the verdict on the core kernel text [_text, _etext)."""
        out = ImageVerdict("vmlinux", "vmlinux", UNVERIFIABLE)
        g_text, g_etext = self.text_range
        out.ranges = [(g_text, (g_etext + PAGE - 1) & ~(PAGE - 1))] if g_etext > g_text else []
        out.pages = sum((b - a) // PAGE for a, b in out.ranges)
        if not g_text or g_etext <= g_text:
            out.reason = "kallsyms lacks _text/_etext"
            return out
        if self.store is None:
            out.reason = "no knowledge base is open"
            return out
        try:
            image = self.store.find_vmlinux(self.release)
        except KnowledgeError as exc:
            out.reason = str(exc)
            return out
        if image is None:
            out.reason = (f"package linux-image-{self.release} not in KB (kernel {self.release}); "
                          f"add it: nephoscope kb add linux-image-{self.release}")
            return out
        out.package, out.version = image.package, image.version
        text = image.sections[".text"]
        link, size = text.addr, len(text.data)
        slide = (g_text - link) & (2**64 - 1)
        if slide >= 1 << 31 or slide & (PAGE - 1) or g_etext - g_text != size:
            out.reason = (f"the guest's _text 0x{g_text:x}/_etext 0x{g_etext:x} do not fit the package's .text "
                          f"(0x{link:x}, {size} bytes): not this build, or kallsyms is corrupt")
            return out
        expected = bytearray(text.data)
        try:
            _apply_relocs(expected, link, slide, image.sections["relocs"])
        except (ps.SiteTableError, KeyError) as exc:
            out.reason = f"could not apply the KASLR relocations: {exc}"
            return out
        got, missing = _read(self.space, g_text, size)
        if missing:
            out.reason = f"{len(missing)} kernel text pages are not mapped (first 0x{missing[0]:x})"
            return out
        sites, problems = self._vmlinux_sites(image, link, slide, text)
        if problems:
            out.reason = "; ".join(problems)
            return out
        self._compare(out, g_text, expected, got, sites, self._kernel_name, slide=slide)
        return out

    def _kernel_name(self, gva: int) -> str:
        hit = self.k.symbols.lookup(gva)
        return f"{hit[0]}+0x{hit[1]:x}" if hit else f"0x{gva:x}"

    def _vmlinux_sites(self, image: KernelImageFile, link: int, slide: int,
                       text: Section) -> tuple[list[ps.Site], list[str]]:
        """Return every patch site of the core text (run-time gvas) and the tables that could not be read."""
        secs = image.sections
        lo = min(s.addr for s in secs.values() if s.addr >= 1 << 63)
        hi = max(s.addr + len(s.data) for s in secs.values() if s.addr >= 1 << 63) + (64 << 20)
        whole = (lo, hi)
        text_end = text.addr + len(text.data)

        def code_at(addr: int, n: int) -> bytes:
            off = addr - text.addr
            return bytes(text.data[off:off + n]) if off >= 0 and addr + n <= text_end else b""

        sites: list[ps.Site] = []
        problems: list[str] = []

        def table(name: str, fn: object) -> None:
            try:
                sites.extend(fn())  # type: ignore[operator]
            except ps.SiteTableError as exc:
                problems.append(f"could not read {name}: {exc}")

        def sec(name: str) -> Section | None:
            return secs.get(name)

        def between(start: str, stop: str) -> tuple[int, bytes] | None:
            """Return (link address, bytes) of a table bounded by kallsyms symbols, from the package's sections."""
            a, b = self.k.symbols.find(start), self.k.symbols.find(stop)
            if a is None or b is None:
                return None
            a, b = a - slide, b - slide
            if not 0 <= b - a <= 64 << 20:
                raise ps.SiteTableError(f"{start}..{stop} spans {b - a} bytes")
            for s in secs.values():
                if s.addr <= a and b <= s.addr + len(s.data) and s.name != "relocs":
                    return a, s.data[a - s.addr:b - s.addr]
            raise ps.SiteTableError(f"{start}..{stop} (0x{a:x}-0x{b:x} link) is in no stored section")

        alt, repl = sec(".altinstructions"), sec(".altinstr_replacement")
        repl_bytes = bytearray(repl.data) if repl else bytearray()
        if repl is not None:  # replacements are relocated like the text (per-cpu rip-relative: inverse relocs)
            try:
                _apply_relocs(repl_bytes, repl.addr, slide, secs["relocs"])
            except (ps.SiteTableError, KeyError) as exc:
                problems.append(f"could not relocate .altinstr_replacement: {exc}")
        if alt is not None:
            table(".altinstructions", lambda: ps.decode_alternatives(
                ".altinstructions", alt.data, alt.addr, whole, (repl.addr, bytes(repl_bytes)) if repl else (0, b"")))
        if (para := sec(".parainstructions")) is not None:
            table(".parainstructions", lambda: ps.decode_paravirt(".parainstructions", para.data, whole))
        for name, kind, length in ((".retpoline_sites", "retpoline", 5), (".return_sites", "return", 5),
                                   (".call_sites", "call", 5), (".smp_locks", "lock", 1),
                                   (".ibt_endbr_seal", "endbr", 4)):
            if (s := sec(name)) is not None:
                table(name, lambda s=s, name=name, kind=kind, length=length: ps.decode_relative(
                    name, s.data, s.addr, whole, kind, length))
        for start, stop, name in (("__start___jump_table", "__stop___jump_table", "__jump_table"),
                                  ("__start_static_call_sites", "__stop_static_call_sites", ".static_call_sites"),
                                  ("__start_mcount_loc", "__stop_mcount_loc", "__mcount_loc")):
            try:
                found = between(start, stop)
            except ps.SiteTableError as exc:
                problems.append(f"could not read {name}: {exc}")
                continue
            if found is None:
                continue
            at, data = found
            if name == "__jump_table":
                table(name, lambda at=at, data=data, name=name: ps.decode_jump_table(name, data, at, whole, code_at))
            elif name == ".static_call_sites":
                table(name, lambda at=at, data=data, name=name: ps.decode_static_calls(name, data, at, whole))
            else:
                table(name, lambda data=data, name=name: ps.decode_absolute(name, data, whole, "mcount", 5))
        for s in secs.values():
            if s.name.startswith(("runtime_ptr_", "runtime_shift_")):
                table(s.name, lambda s=s: self._runtime_consts(s, whole))
        for gva, _t, name in self.k.symbols.entries():
            if name.startswith("__SCT__") and self.text_range[0] <= gva < self.text_range[1]:
                sites.append(ps.Site(gva - slide, 5, "static_call_tramp"))
        # ftrace_update_ftrace_func() rewrites the call in ftrace_caller / ftrace_regs_caller when an ftrace_ops
        # registers (arch/x86/kernel/ftrace.c): a call to kernel code or ftrace's own functions
        for name in FTRACE_CALLS:
            if (gva := self.k.symbols.find(name)) is not None and self.text_range[0] <= gva < self.text_range[1]:
                sites.append(ps.Site(gva - slide, 5, "ftrace_call"))
        # sites stay in link addresses (hundreds of thousands): the checker adds the slide
        return [s for s in sites if text.addr <= s.start < text_end], problems

    def _runtime_consts(self, s: Section, whole: tuple[int, int]) -> list[ps.Site]:
        """Return the sites of one 6.11+ runtime constant: its immediates hold the variable's value in the guest."""
        ptr = s.name.startswith("runtime_ptr_")
        var = s.name.removeprefix("runtime_ptr_" if ptr else "runtime_shift_")
        gva = self.k.symbols.find(var)
        if gva is None:
            raise ps.SiteTableError(f"kallsyms has no {var}, the variable of {s.name}")
        try:
            value = self.k.u64(gva) if ptr else self.k.u32(gva) & 0xFF
        except (*_BAD, NephoscopeError) as exc:
            raise ps.SiteTableError(f"{var} is unreadable ({exc})") from exc
        return [dataclasses.replace(site, target=value)
                for site in ps.decode_relative(s.name, s.data, s.addr, whole, "runtime_const", 8 if ptr else 1)]

    def _compare(self, out: ImageVerdict, base: int, expected: bytearray, got: bytearray, sites: list[ps.Site],
                 namer: object, checker: _Checker | None = None, slide: int = 0) -> None:
        """Compare one range (run-time gva `base`) byte by byte, explain the differences by sites (at run-time
        address − `slide`), and set the verdict."""
        checker = checker or _Checker(sites, self.targets, slide)
        diff = np.flatnonzero(np.frombuffer(expected, np.uint8) != np.frombuffer(got, np.uint8))
        counts: dict[str, int] = out.normalised
        bad = checker.check(base - checker.slide, expected, got, diff, counts)
        if bad.size:
            _changes(out, base, expected, got, bad, checker, namer)
        out.status = MODIFIED if out.modified_pages else VERIFIED
        out.pages_verified = out.pages - len(out.modified_pages)
        if out.status == MODIFIED:
            out.reason = (f"{len(out.modified_pages)} page(s) differ from {out.package} {out.version} outside "
                          "every legitimate patch-site variant")

    # --- modules ---------------------------------------------------------------------------------------

    def module_sections(self, module_gva: int) -> dict[str, int]:
        """Return {section name: gva} of a loaded module from its sysfs section attributes (module.sect_attrs)."""
        from nephoscope.os.linux.model import Offsets

        k = self.k
        wanted = {"module": ["sect_attrs"], "module_sect_attrs": ["nsections", "attrs"],
                  "module_sect_attr": ["battr.attr.name", "address"]}
        off = getattr(self, "_sect_off", None)
        if off is None:
            off = self._sect_off = Offsets(k.types, wanted, self.release)
        attrs = k.u64(module_gva + off["module.sect_attrs"])
        if not attrs:
            raise GuestDataError("the module has no section attributes (module.sect_attrs is NULL)")
        n = k.u32(attrs + off["module_sect_attrs.nsections"])
        if not 0 < n <= MAX_MODULE_SECTIONS:
            raise GuestDataError(f"module.sect_attrs says {n} sections")
        stride = off.size["module_sect_attr"]
        blob = k.read(attrs + off["module_sect_attrs.attrs"], stride * n)
        out = {}
        for i in range(n):
            name_ptr, = struct.unpack_from("<Q", blob, i * stride + off["module_sect_attr.battr.attr.name"])
            addr, = struct.unpack_from("<Q", blob, i * stride + off["module_sect_attr.address"])
            out[k.cstr(name_ptr, 128)] = addr
        return out

    def verify_module(self, module: object, symbols: dict[str, int]) -> ImageVerdict:
        """Return the verdict on one loaded module's executable sections."""
        name = module.name  # type: ignore[attr-defined]
        out = ImageVerdict(name, "module", UNVERIFIABLE)
        try:
            where = self.module_sections(module.gva)  # type: ignore[attr-defined]
        except (*_BAD, NephoscopeError) as exc:
            out.reason = f"could not read the module's section addresses: {exc}"
            return out
        image = None
        if self.store is not None:
            try:
                image = self.store.find_module(self.release, name)
            except KnowledgeError as exc:
                out.reason = str(exc)
                return out
        execs = sorted((a, n) for n, a in where.items() if n.startswith(".text") or n in (".noinstr.text",
                                                                                          ".altinstr_replacement",
                                                                                          ".exit.text",
                                                                                          ".static_call.text"))
        if image is not None:
            execs = [(where[s.name], s.name) for s in image.executable() if s.name in where
                     and not s.name.startswith(".init")]
            sizes = {s.name: len(s.data) for s in image.executable()}
        else:
            sizes = {}
        out.ranges = self._module_ranges([(a, a + sizes.get(n, 1)) for a, n in execs])
        if image is None:  # section sizes unknown: the module's text allocation is its own (not unknown code)
            base, size = self._module_text(module)
            if 0 < size <= 1 << 30:
                out.ranges = self._module_ranges([(base, base + size)])
        out.pages = sum((b - a) // PAGE for a, b in out.ranges)
        if image is None:
            out.reason = f"module {name} of kernel {self.release} not in KB (package linux-image-{self.release})"
            shipped = self._shipped_modules()
            if shipped is None:
                out.reason += "; the KB keeps no module list of that package, so it cannot tell a module the " \
                              "package ships from a foreign one"
            elif name in shipped:
                out.reason += "; the package ships it, but the KB lacks its .ko"
            else:
                out.status = UNSHIPPED
                out.reason = (f"module {name} is not shipped by the KB's package linux-image-{self.release}: "
                              "its memory is unknown kernel code")
            return out
        out.package, out.version = image.package, image.version
        placed = {}
        percpu = self._module_percpu(module)
        if percpu and ".data..percpu" in image.sections and ".data..percpu" not in where:
            placed[".data..percpu"] = percpu  # the loader clears its SHF_ALLOC: no sysfs attribute
        try:
            linked, syms, ranged = _link_module(image, where, symbols, self._check_function,
                                                self.module_regions(module), placed)
        except (ps.SiteTableError, GuestDataError, *_BAD) as exc:
            out.reason = f"could not apply the module's relocations: {exc}"
            return out
        out.symbols = sorted(syms)
        sites, problems = _module_sites(image, linked, where)
        sites.extend(ranged)
        # the module's own static call trampolines (DEFINE_STATIC_CALL in the module, e.g. kvm's kvm_x86_*):
        # __static_call_update() rewrites their jmp like the vmlinux's
        sites.extend(ps.Site(gva, 5, "static_call_tramp") for gva, n in syms if n.startswith("__SCT__"))
        if problems:
            out.reason = "; ".join(problems)
            return out
        checker = _Checker(sites, self.targets)
        namer = lambda gva: out.function_at(gva) or f"{name}+0x{gva:x}"  # noqa: E731
        for a, b in out.ranges:  # whole pages: section bytes, zero padding elsewhere
            got, missing = _read(self.space, a, b - a)
            if missing:
                out.reason = f"{len(missing)} module text pages are not mapped (first 0x{missing[0]:x})"
                out.status = UNVERIFIABLE
                return out
            expected = bytearray(b - a)
            for sname, data in linked.items():
                sa = where.get(sname)
                if sa is None or not image.sections[sname].executable:
                    continue
                lo, hi = max(sa, a), min(sa + len(data), b)
                if lo < hi:
                    expected[lo - a:hi - a] = data[lo - sa:hi - sa]
            self._compare(out, a, expected, got, sites, namer, checker)
        if ranged and out.status == VERIFIED:
            out.reason = (f"{len(ranged)} relocation(s) against sections without a load address ("
                          f"{', '.join(sorted(_unplaced_sections(image, where, placed)))}) range-checked into the "
                          "module's own allocation, not matched exactly")
        return out

    def _module_percpu(self, module: object) -> int:
        """Return a module's per-cpu area (module.percpu; 0 when unknown)."""
        from nephoscope.os.linux.model import Offsets

        try:
            off = getattr(self, "_percpu_off", None)
            if off is None:
                off = self._percpu_off = Offsets(self.k.types, {"module": ["percpu"]}, self.release)
            return self.k.u64(module.gva + off["module.percpu"])  # type: ignore[attr-defined]
        except (*_BAD, NephoscopeError):
            return 0

    def module_regions(self, module: object) -> dict[str, tuple[int, int]]:
        """Return {kind: (gva, end)} of a loaded module's memory by kind (section_kind), end inclusive: mem[]
        on 6.4+, else the core layout's text/ro/ro_after_init/data split; {} when unreadable."""
        from nephoscope.os.linux.model import Offsets

        k = self.k
        try:
            if k.module_mem_types:  # 6.4+: MOD_TEXT, MOD_DATA, MOD_RODATA, MOD_RO_AFTER_INIT
                stride = k.off.size["module_memory"]
                blob = k.read(module.gva + k.off["module.mem"], stride * 4)  # type: ignore[attr-defined]
                out = {}
                for kind, i in (("text", 0), ("data", 1), ("rodata", 2), ("ro_after_init", 3)):
                    base = struct.unpack_from("<Q", blob, i * stride + k.off["module_memory.base"])[0]
                    size = struct.unpack_from("<I", blob, i * stride + k.off["module_memory.size"])[0]
                    if base and 0 < size <= 1 << 30:
                        out[kind] = (base, base + size)
                return out
            off = getattr(self, "_layout_off", None)
            if off is None:
                off = self._layout_off = Offsets(k.types, {"module_layout": ["base", "size", "text_size", "ro_size",
                                                                              "ro_after_init_size"]}, self.release)
            layout = module.gva + k.off["module.core_layout.base"] - off["module_layout.base"]  # type: ignore[attr-defined]
            base = k.u64(layout + off["module_layout.base"])
            cut = [k.u32(layout + off[f"module_layout.{f}"]) for f in ("text_size", "ro_size", "ro_after_init_size",
                                                                         "size")]
            if not base or not 0 < cut[0] <= cut[1] <= cut[2] <= cut[3] <= 1 << 30:
                return {}
            return {"text": (base, base + cut[0]), "rodata": (base + cut[0], base + cut[1]),
                    "ro_after_init": (base + cut[1], base + cut[2]), "data": (base + cut[2], base + cut[3])}
        except (*_BAD, NephoscopeError):
            return {}

    def _shipped_modules(self) -> set[str] | None:
        """Return the module names the KB's kernel package ships (None: no vmlinux or no list in the KB)."""
        if not hasattr(self, "_shipped"):
            self._shipped: set[str] | None = None
            names = getattr(self.store, "module_names", None)
            try:
                if names is not None and self.store.find_vmlinux(self.release) is not None:  # type: ignore[union-attr]
                    self._shipped = names(self.release)
            except KnowledgeError:
                self._shipped = None
        return self._shipped

    def _check_function(self, name: str, gva: int) -> None:
        """Refuse a function symbol (a kallsyms hint) that points outside kernel or module text."""
        if name in getattr(self, "functions", ()) and not self._is_code(gva):
            raise GuestDataError(f"kallsyms puts function {name} at 0x{gva:x}, outside every kernel and module text")

    def _module_text(self, module: object) -> tuple[int, int]:
        """Return (gva, size) of a module's text allocation: mem[MOD_TEXT] on 6.4+, else the core layout
        (one allocation holding text, rodata and data)."""
        k = self.k
        try:
            if k.module_mem_types:  # 6.4+: struct module_memory mem[]; MOD_TEXT is 0
                blob = k.read(module.gva + k.off["module.mem"], k.off.size["module_memory"])  # type: ignore[attr-defined]
                return (struct.unpack_from("<Q", blob, k.off["module_memory.base"])[0],
                        struct.unpack_from("<I", blob, k.off["module_memory.size"])[0])
            return (k.u64(module.gva + k.off["module.core_layout.base"]),  # type: ignore[attr-defined]
                    k.u32(module.gva + k.off["module.core_layout.size"]))  # type: ignore[attr-defined]
        except (*_BAD, NephoscopeError):
            return 0, 0

    @staticmethod
    def _module_ranges(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        pages = sorted({p for a, b in spans for p in range(a & ~(PAGE - 1), b, PAGE)})
        out: list[tuple[int, int]] = []
        for p in pages:
            if out and out[-1][1] == p:
                out[-1] = (out[-1][0], p + PAGE)
            else:
                out.append((p, p + PAGE))
        return out

    # --- everything -----------------------------------------------------------------------------------

    def verify(self, budget: Budget | None = None) -> KernelCodeReport:
        """Verify the vmlinux text and every listed module, then find executable kernel memory in no image."""
        started = time.perf_counter()
        mods = self.k.modules()
        symbols = dict(self.k.symbols.symbols)
        self.functions = {n for _, t, n in self.k.symbols.entries() if t in "tT"}
        per_module = []
        for m in mods:
            try:
                listing = self.k.module_symbols(m)
            except NephoscopeError:
                continue
            per_module.append((m, listing))
            for gva, t, name in listing:
                symbols.setdefault(name, gva)
                if t in "tT":
                    self.functions.add(name)
        for m, _ in per_module:
            try:
                where = self.module_sections(m.gva)
            except (*_BAD, NephoscopeError):
                continue
            for n, a in where.items():
                if n.startswith(".text") or n == ".noinstr.text":
                    self.code_ranges.append((a, m.base + m.size if m.base <= a < m.base + m.size else a + PAGE))
        # the vmlinux after the module text is known: its static calls may point into modules (perf's guest
        # callbacks into kvm)
        self._into_modules = set()
        images = [self.verify_vmlinux()]
        into, self._into_modules = self._into_modules, None
        if into:
            owners = sorted({m.name for m, _ in per_module for t in into if m.base <= t < m.base + m.size})
            images[0].reason = (images[0].reason + "; " if images[0].reason else "") + (
                f"{len(into)} site target(s) accepted in the text of listed module(s) {', '.join(owners) or '?'} "
                "(verified or not on their own)")
        for m, _ in per_module:
            try:
                images.append(self.verify_module(m, symbols))
            except (*_BAD, NephoscopeError) as exc:
                images.append(ImageVerdict(m.name, "module", UNVERIFIABLE, f"verification failed: {exc}"))
        unshipped = {i.name: (i.ranges[0][0], i.ranges[-1][1]) for i in images if i.status == UNSHIPPED and i.ranges}
        images = [i for i in images if i.status != UNSHIPPED]  # no image explains their pages: unknown code
        images.append(self.verify_realmode())
        bpf = self.bpf_programs()
        if bpf is not None:
            images.append(bpf)
        unknown, exec_pages = self._unknown(images, budget)
        if bpf is not None:
            self._bpf_pages(bpf)
        report = KernelCodeReport(self.release, images, unknown, exec_pages, time.perf_counter() - started,
                                  kernel_symbol=self._kernel_name, unshipped=unshipped)
        if unknown:
            report.generated = self._generated()
        if not mods.complete:
            report.problem = f"the module list is incomplete ({mods.problem}); unlisted modules show as unknown code"
        return report

    def _generated(self) -> list[tuple[int, int, str]]:
        """Return the module-area code the kernel's own lists say it generated (names unknown code; a hint)."""
        from nephoscope.os.linux.crossviews import known_exec_allocations

        try:
            return list(known_exec_allocations(self.k).items)
        except (*_BAD, NephoscopeError):
            return []

    # --- code the kernel generates or copies at boot -----------------------------------------------------

    def verify_realmode(self) -> ImageVerdict:
        """Return the verdict on the real-mode trampoline: vmlinux's real_mode_blob copied below 1 MiB (direct
        map) with its segment and linear relocations applied (arch/x86/realmode/init.c)."""
        out = ImageVerdict("realmode trampoline", "vmlinux", UNVERIFIABLE)
        k, sym = self.k, self.k.symbols
        names = ("real_mode_header", "real_mode_blob", "real_mode_blob_end", "real_mode_relocs")
        where = {n: sym.find(n) for n in names}
        if any(v is None for v in where.values()):
            out.reason = "kallsyms lacks " + ", ".join(n for n, v in where.items() if v is None)
            return out
        try:
            base = k.u64(where["real_mode_header"])  # type: ignore[arg-type]
            phys = self.space.translate(base) if base else 0
            # struct real_mode_header starts with u32 text_start, a physical address after relocation
            text_start = (k.u32(base) - phys) & 0xFFFF_FFFF if base else 0
            ro_end = (k.u32(base + 4) - phys) & 0xFFFF_FFFF if base else 0  # the text pages end with rodata
        except (*_BAD, NephoscopeError) as exc:
            out.reason = f"real_mode_header is unreadable ({exc})"
            return out
        size = where["real_mode_blob_end"] - where["real_mode_blob"]  # type: ignore[operator]
        if not base or base & (PAGE - 1) or not 0 < size <= 1 << 20 or not 0 < text_start < ro_end <= size:
            out.reason = (f"real_mode_header 0x{base:x} (text +0x{text_start:x}..+0x{ro_end:x}, {size} bytes) "
                          "is implausible")
            return out
        out.ranges = [((base + text_start) & ~(PAGE - 1), (base + ro_end + PAGE - 1) & ~(PAGE - 1))]
        out.pages = (out.ranges[0][1] - out.ranges[0][0]) // PAGE
        image = self._vmlinux_image(out)
        if image is None:
            return out
        slide = self.text_range[0] - image.sections[".text"].addr
        blob = self._link_bytes(image, where["real_mode_blob"] - slide, size)  # type: ignore[operator]
        relocs = self._link_bytes(image, where["real_mode_relocs"] - slide, 1 << 16)  # type: ignore[operator]
        if blob is None or relocs is None:
            out.reason = "real_mode_blob is in no stored section of the package's vmlinux"
            return out
        try:
            expected = bytearray(blob)
            pos = 0
            for width in (2, 4):
                count, = struct.unpack_from("<I", relocs, pos)
                if count > 1 << 14:
                    raise GuestDataError(f"real_mode_relocs counts {count} entries")
                offs = struct.unpack_from(f"<{count}I", relocs, pos + 4)
                pos += 4 + 4 * count
                for off in offs:
                    if width == 2 and off + 2 <= size:
                        struct.pack_into("<H", expected, off, (phys >> 4) & 0xFFFF)
                    elif off + 4 <= size:
                        old, = struct.unpack_from("<I", expected, off)
                        struct.pack_into("<I", expected, off, (old + phys) & 0xFFFF_FFFF)
        except (*_BAD, NephoscopeError) as exc:
            out.reason = f"could not relocate the real-mode blob ({exc})"
            return out
        a, b = out.ranges[0]
        got, missing = _read(self.space, a, b - a)
        want = bytearray(got)  # bytes past the blob's end in its last page: not the blob's, compared to themselves
        lo, hi = a - base, min(b - base, size)
        want[0:hi - lo] = expected[lo:hi]
        if missing:
            out.reason = f"{len(missing)} trampoline pages are not mapped"
            return out
        out.symbols = [(base, "real_mode_blob")]
        self._compare(out, a, want, got, [], lambda gva: f"real_mode_blob+0x{gva - base:x}")
        return out

    def _vmlinux_image(self, out: ImageVerdict) -> KernelImageFile | None:
        cached = getattr(self, "_vmlinux", None)
        if cached is None and self.store is not None:
            try:
                cached = self._vmlinux = self.store.find_vmlinux(self.release)
            except KnowledgeError as exc:
                out.reason = str(exc)
                return None
        if cached is None:
            out.reason = f"package linux-image-{self.release} not in KB (kernel {self.release})"
            return None
        out.package, out.version = cached.package, cached.version
        return cached

    @staticmethod
    def _link_bytes(image: KernelImageFile, link: int, size: int) -> bytes | None:
        for sec in image.sections.values():
            if sec.addr <= link < sec.addr + len(sec.data) and sec.name != "relocs":
                return sec.data[link - sec.addr: link - sec.addr + size]
        return None

    def bpf_programs(self) -> ImageVerdict | None:
        """Return the BPF JIT memory: bpf_prog_pack chunks (kernel/bpf/core.c pack_list, 2 MiB each) and the
        images on the bpf_kallsyms list; None when the kernel has neither."""
        from nephoscope.os.linux.model import Offsets
        from nephoscope.os.linux.walkers import walk_list

        out = ImageVerdict("bpf-jit", "bpf", UNVERIFIABLE, "JIT-compiled BPF programs are generated in the guest at "
                           "run time; no package holds their bytes")
        sym = self.k.symbols
        try:
            if (packs := sym.find("pack_list")) is not None and self.k.types.has_struct("bpf_prog_pack"):
                off = Offsets(self.k.types, {"bpf_prog_pack": ["list", "ptr"]}, self.release)
                for e in walk_list(self.k, packs, off["bpf_prog_pack.list"], 4096, "bpf pack_list"):
                    ptr = self.k.u64(e + off["bpf_prog_pack.ptr"])
                    if ptr and not ptr & (PAGE - 1):
                        out.ranges.append((ptr, ptr + BPF_PACK_SIZE))
                        out.symbols.append((ptr, "bpf_prog_pack"))
            if (head := sym.find("bpf_kallsyms")) is not None:
                off = Offsets(self.k.types, {"bpf_ksym": ["start", "end", "lnode", "name"]}, self.release)
                for e in walk_list(self.k, head, off["bpf_ksym.lnode"], 4096, "bpf_kallsyms"):
                    a, b = self.k.u64(e + off["bpf_ksym.start"]), self.k.u64(e + off["bpf_ksym.end"])
                    if a < b <= a + (16 << 20):
                        out.symbols.append((a, self.k.cstr(e + off["bpf_ksym.name"], 128)))
                        out.ranges.append((a & ~(PAGE - 1), (b + PAGE - 1) & ~(PAGE - 1)))
        except (*_BAD, NephoscopeError) as exc:
            out.reason = f"the BPF JIT lists are unreadable ({exc})"
            return out
        if not out.ranges:
            return None
        out.symbols.sort()
        out.ranges = self._module_ranges(out.ranges)
        out.pages = sum((b - a) // PAGE for a, b in out.ranges)
        return out

    def _bpf_pages(self, bpf: ImageVerdict) -> None:
        """Count BPF pack pages that hold only int3 (bpf_prog_pack's filler: no code) and list the others."""
        jit = 0
        for a, b in bpf.ranges:
            for page in range(a, b, PAGE):
                try:
                    data = self.space.read(page, PAGE)
                except NephoscopeError:
                    continue  # not mapped: nothing executes there
                if data == b"\xcc" * PAGE:
                    bpf.pages_verified += 1
                else:
                    jit += 1
                    bpf.modified_pages.append(page)
        bpf.normalised["int3 filler pages"] = bpf.pages_verified
        bpf.reason += f" ({jit} page(s) hold JIT code; {bpf.pages_verified} pages are int3 filler)"

    def _unknown(self, images: list[ImageVerdict], budget: Budget | None) -> tuple[list[tuple[int, int]], int]:
        """Return executable supervisor ranges of the kernel page tables that no image explains."""
        space = self.space
        start = space.canonical(1 << (space.va_bits - 1))
        known = sorted(r for im in images for r in im.ranges)
        unknown: list[tuple[int, int]] = []
        pages = 0
        for a, b, ms in iter_runs(space.iter_mappings(exec_only=True, start=start, budget=budget)):
            if ms[0].user:
                continue
            pages += (b - a) // PAGE
            for lo, hi in _subtract((a, b), known):
                unknown.append((lo, hi))
        return unknown, pages


def _subtract(span: tuple[int, int], known: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    pos, end = span
    for a, b in known:
        if b <= pos or a >= end:
            continue
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < end:
        out.append((pos, end))
    return out


# --- module linking -------------------------------------------------------------------------------------


def _symtab(image: KernelImageFile) -> list[tuple[str, int, int, int]]:
    """Return (name, info, shndx, value) of each .ko symbol."""
    symtab, strtab = image.sections.get(".symtab"), image.sections.get(".strtab")
    if symtab is None or strtab is None:
        raise GuestDataError("the .ko has no symbol table")
    out = []
    strs = strtab.data
    for i in range(len(symtab.data) // 24):
        st_name, info, _other, shndx, value, _size = struct.unpack_from("<IBBHQQ", symtab.data, 24 * i)
        end = strs.find(b"\0", st_name)
        out.append((strs[st_name:end].decode("utf-8", "replace"), info, shndx, value))
    return out


SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 0x1, 0x2, 0x4
RO_AFTER_INIT_SECTIONS = (".data..ro_after_init", "__jump_table")  # the loader flags these SHF_RO_AFTER_INIT


def section_kind(sec: Section) -> str | None:
    """Return the module memory kind the kernel's loader (layout_sections) puts a .ko section in: "text",
    "rodata", "ro_after_init" or "data"; None for sections it does not keep after load (not SHF_ALLOC, .init*)."""
    if not sec.flags & SHF_ALLOC or sec.name.startswith(".init") or sec.name in (".modinfo", "__versions"):
        return None
    if sec.flags & SHF_EXECINSTR:
        return "text"
    if sec.name in RO_AFTER_INIT_SECTIONS:
        return "ro_after_init"
    return "data" if sec.flags & SHF_WRITE else "rodata"


def _unplaced_sections(image: KernelImageFile, where: dict[str, int], placed: dict[str, int]) -> set[str]:
    """Return the names of the kept .ko sections with no load address (neither sysfs nor `placed`)."""
    return {s.name for s in image.sections.values() if section_kind(s) and s.name not in where and s.name not in placed}


def _signed64(value: int) -> int:
    value &= 2**64 - 1
    return value - 2**64 if value >= 2**63 else value


def _link_module(image: KernelImageFile, where: dict[str, int], symbols: dict[str, int],
                 check: Callable[[str, int], None] = lambda _n, _v: None,
                 regions: dict[str, tuple[int, int]] | None = None, placed: dict[str, int] | None = None,
                 ) -> tuple[dict[str, bytes], list[tuple[int, str]], list[ps.Site]]:
    """Apply a .ko's relocations for its load addresses; return the linked bytes of every kept section, the
    module's own (gva, name) function symbols and the range-checked relocation sites. `check(name, gva)`
    vets each kallsyms value used.

    `placed` adds load addresses used only to resolve symbols (the per-cpu section: module.percpu). A
    relocation in code against a kept section with no known address (an empty .bss has no sysfs section
    attribute) cannot be matched exactly: it becomes a "reloc_range" site whose field must point into
    `regions[kind]`, the module's own allocation of that section's kind ([gva, end], end inclusive)."""
    by_index = image.by_index()
    syms = _symtab(image)
    regions = regions or {}
    at = {**(placed or {}), **where}

    class _Unplaced(Exception):
        pass

    def sym_value(i: int) -> int:
        name, _info, shndx, value = syms[i]
        if shndx == 0:  # undefined: exported by the kernel or another module (kallsyms: a hint)
            got = symbols.get(name)
            if got is None:
                raise GuestDataError(f"symbol {name} is in no kallsyms table")
            check(name, got)
            return got
        if shndx >= 0xFF00:
            return value  # SHN_ABS and friends
        sec = by_index.get(shndx)
        if sec is not None and sec.name not in at and section_kind(sec) in regions:
            raise _Unplaced(sec, value)
        if sec is None or sec.name not in at:
            return 0  # a section the kernel did not load (the site tables never point there)
        return at[sec.name] + value

    linked: dict[str, bytes] = {}
    ranged: list[ps.Site] = []
    for s in image.sections.values():
        if s.name in where and s.type not in ("SHT_NOBITS", HEADER_ONLY) and s.flags & SHF_ALLOC:
            linked[s.name] = s.data
    for rel in image.sections.values():
        if rel.type != "SHT_RELA":
            continue
        target = by_index.get(rel.info)
        if target is None or target.name not in linked:
            continue
        buf = bytearray(linked[target.name])
        base = where[target.name]
        for j in range(len(rel.data) // 24):
            offset, info, addend = struct.unpack_from("<QQq", rel.data, 24 * j)
            rtype, si = info & 0xFFFF_FFFF, info >> 32
            if not 0 <= offset <= len(buf) - 4:
                raise GuestDataError(f"{rel.name}: relocation {j} at {offset} is outside {target.name}")
            p = base + offset
            try:
                value = sym_value(si)
            except _Unplaced as unplaced:
                sec, sym_off = unplaced.args
                lo, hi = regions[section_kind(sec)]  # type: ignore[index]
                adj = sym_off + addend
                if target.flags & SHF_EXECINSTR and rtype in (R_X86_64_PC32, R_X86_64_PLT32):
                    ranged.append(ps.Site(p, 4, "reloc_range", target=lo + adj - p, bound=hi + adj - p))
                elif target.flags & SHF_EXECINSTR and rtype == R_X86_64_32S:
                    ranged.append(ps.Site(p, 4, "reloc_range", target=_signed64(lo + adj), bound=_signed64(hi + adj)))
                elif target.flags & SHF_EXECINSTR and rtype == R_X86_64_64 and offset <= len(buf) - 8:
                    ranged.append(ps.Site(p, 8, "reloc_range", target=lo + adj, bound=hi + adj))
                elif target.flags & SHF_EXECINSTR:
                    raise GuestDataError(f"{rel.name}: relocation {j} (type {rtype}) against {sec.name}, which "
                                         "has no load address, cannot be range-checked") from None
                continue
            except GuestDataError:
                if target.flags & SHF_EXECINSTR:
                    raise
                continue  # data tables may reference symbols from init sections we never read
            if value == 0 and not target.flags & SHF_EXECINSTR:
                continue
            if rtype == R_X86_64_64:
                struct.pack_into("<Q", buf, offset, (value + addend) & (2**64 - 1))
            elif rtype in (R_X86_64_PC32, R_X86_64_PLT32):
                struct.pack_into("<I", buf, offset, (value + addend - p) & 0xFFFF_FFFF)
            elif rtype in (R_X86_64_32, R_X86_64_32S):
                struct.pack_into("<I", buf, offset, (value + addend) & 0xFFFF_FFFF)
            elif rtype == R_X86_64_PC64:
                struct.pack_into("<Q", buf, offset, (value + addend - p) & (2**64 - 1))
            elif rtype != 0:
                raise GuestDataError(f"{rel.name}: relocation type {rtype} is not handled")
        linked[target.name] = bytes(buf)
    own = [(where[by_index[sh].name] + v, n) for n, info, sh, v in syms
           if n and info & 0xF == 2 and sh in by_index and by_index[sh].name in where]
    return linked, own, ranged


def _module_sites(image: KernelImageFile, linked: dict[str, bytes], where: dict[str, int],
                  ) -> tuple[list[ps.Site], list[str]]:
    """Return a module's patch sites (run-time gvas) from its relocated tables."""
    addrs = [where[n] for n in linked if n in where]
    whole = (min(addrs), max(where[n] + len(d) for n, d in linked.items())) if addrs else (0, 0)
    execs = {n: (where[n], d) for n, d in linked.items() if image.sections[n].executable}

    def code_at(addr: int, n: int) -> bytes:
        for a, d in execs.values():
            if a <= addr and addr + n <= a + len(d):
                return d[addr - a: addr - a + n]
        return b""

    sites: list[ps.Site] = []
    problems: list[str] = []

    def tab(name: str) -> tuple[int, bytes] | None:
        return (where[name], linked[name]) if name in linked and name in where else None

    repl = tab(".altinstr_replacement") or (0, b"")
    decoders = {
        ".altinstructions": lambda a, d: ps.decode_alternatives(".altinstructions", d, a, whole, repl),
        ".parainstructions": lambda a, d: ps.decode_paravirt(".parainstructions", d, whole),
        "__jump_table": lambda a, d: ps.decode_jump_table("__jump_table", d, a, whole, code_at),
        ".static_call_sites": lambda a, d: ps.decode_static_calls(".static_call_sites", d, a, whole),
        ".retpoline_sites": lambda a, d: ps.decode_relative(".retpoline_sites", d, a, whole, "retpoline", 5),
        ".return_sites": lambda a, d: ps.decode_relative(".return_sites", d, a, whole, "return", 5),
        ".call_sites": lambda a, d: ps.decode_relative(".call_sites", d, a, whole, "call", 5),
        ".smp_locks": lambda a, d: ps.decode_relative(".smp_locks", d, a, whole, "lock", 1),
        ".ibt_endbr_seal": lambda a, d: ps.decode_relative(".ibt_endbr_seal", d, a, whole, "endbr", 4),
        "__mcount_loc": lambda a, d: ps.decode_absolute("__mcount_loc", d, whole, "mcount", 5),
    }
    for name, fn in decoders.items():
        found = tab(name)
        if found is None:
            continue
        try:
            sites.extend(fn(*found))
        except ps.SiteTableError as exc:
            problems.append(f"could not read {name}: {exc}")
    return sites, problems


def verify_kernel(k: LinuxKernel, store: KernelStore | None, budget: Budget | None = None) -> KernelCodeReport:
    """Verify the kernel code of the guest modelled by `k` (kernel gvas; does not pause). Raises only
    NephoscopeError."""
    try:
        return KernelVerifier(k, store).verify(budget)
    except _BAD as exc:
        raise GuestDataError(f"kernel {k.info.release}: malformed guest data stopped kernel-code verification "
                             f"({exc!r})") from exc
