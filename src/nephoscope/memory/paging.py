"""x86-64 paging as data: address spaces (one cr3) over guest-physical memory, 4- and 5-level.

Addresses named `gva` are guest-virtual in this address space; `gpa` are guest-physical. Nothing here
pauses the VM: on a live guest, page tables can change between two reads (call `flush()` to forget
cached translations; pause the VM for a consistent view).
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nephoscope.core.errors import MemoryAccessError, TranslationError
from nephoscope.memory.physical import MAX_READ, PhysicalMemory, SegmentedMemory

if TYPE_CHECKING:  # numpy is imported where it is used (iter_mappings), not for translations
    import numpy as np

PAGE = 4096
ENTRIES = 512
P, RW, US, PS, NX = 1, 1 << 1, 1 << 2, 1 << 7, 1 << 63
ADDR_MASK = ((1 << 52) - 1) & ~(PAGE - 1)  # bits 12..51
_U64 = struct.Struct("<Q")
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Level:
    """One paging level: its name, the gva bit its index starts at, and whether PS makes a leaf here."""

    name: str
    shift: int
    large: bool  # PS=1 maps a 2 MiB (PD) or 1 GiB (PDPT) page; at PML4/PML5 PS is reserved

    @property
    def page_size(self) -> int:
        return 1 << self.shift


PML5 = Level("PML5", 48, False)
PML4 = Level("PML4", 39, False)
PDPT = Level("PDPT", 30, True)
PD = Level("PD", 21, True)
PT = Level("PT", 12, False)
PAGING = {4: (PML4, PDPT, PD, PT), 5: (PML5, PML4, PDPT, PD, PT)}


@dataclass(frozen=True, slots=True)
class Mapping:
    """One present leaf page: gva (canonical) → gpa, its size and effective permissions."""

    gva: int
    gpa: int
    size: int
    writable: bool
    user: bool
    nx: bool

    @property
    def executable(self) -> bool:
        return not self.nx


@dataclass(frozen=True, slots=True)
class Limits:
    """Work caps that keep walks of hostile page tables bounded."""

    max_tables: int = 8192  # table visits per iter_mappings call (a real process uses tens to hundreds)
    max_leaves: int = 1 << 20  # leaf entries yielded per iter_mappings call (4 GiB of 4 KiB pages)
    cache_translations: int = 1 << 16


@dataclass(slots=True)
class Budget:
    """Work left for one walk, or for every walk and read of one command that share it.

    `tables` counts page-table visits, `leaves` pages (mapped, hashed or read); `caps` records every place
    that stopped early because the budget (or a cap of its own) ran out, so the result can say it."""

    tables: int
    leaves: int
    caps: Counter[str] = field(default_factory=Counter)

    @property
    def exhausted(self) -> bool:
        return self.tables <= 0 or self.leaves <= 0

    def hit(self, what: str, times: int = 1) -> None:
        """Record that `what` stopped short: its results are incomplete."""
        self.caps[what] += times


def _entry_reserved(level: Level, phys_bits: int) -> int:
    """Return the mask of must-be-zero bits of a leaf or table entry at `level`."""
    mask = ((1 << 52) - 1) & ~((1 << phys_bits) - 1)
    if level.shift >= 39:
        mask |= PS
    return mask


def _large_reserved(level: Level) -> int:
    """Return the must-be-zero address bits of a PS=1 entry (bit 12 is PAT, the rest below the frame)."""
    return ((1 << level.shift) - 1) & ~((1 << 13) - 1)


class AddressSpace:
    """One guest-virtual address space: a cr3 over guest-physical memory, with cached translations."""

    def __init__(self, phys: PhysicalMemory, cr3: int, levels: int = 4, *, phys_bits: int = 52,
                 limits: Limits | None = None) -> None:
        """Walk tables rooted at guest-physical `cr3` (low 12 bits / PCID ignored, bit 63 too)."""
        if levels not in PAGING:
            raise ValueError(f"levels must be 4 or 5, not {levels}")
        self.phys = phys
        self.cr3 = cr3 & ADDR_MASK
        self.levels = levels
        self.phys_bits = phys_bits
        self.limits = limits or Limits()
        self.anomalies: Counter[str] = Counter()
        self._levels = PAGING[levels]
        self._va_bits = self._levels[0].shift + 9
        # the levels compiled for the hot loop: (level, shift, must-be-zero bits, PS makes a leaf, extra
        # must-be-zero bits of a PS leaf)
        self._steps = [(lvl, lvl.shift, _entry_reserved(lvl, phys_bits), lvl.large,
                        _large_reserved(lvl) if lvl.large else 0) for lvl in self._levels]
        self._translations: dict[int, tuple[int, int]] = {}  # gva page → (gpa page, flags)
        # a raw image or the live RAM file: read entries straight from its one zero-copy view
        segments = list(phys.iter_segments()) if isinstance(phys, SegmentedMemory) else []
        self._flat = segments[0][1] if len(segments) == 1 and segments[0][0] == 0 else None

    # --- translation ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Forget cached translations (after the guest ran)."""
        self._translations.clear()

    @property
    def va_bits(self) -> int:
        """Return the width of a virtual address in this paging mode (48 or 57)."""
        return self._va_bits

    def canonical(self, gva: int) -> int:
        """Return `gva` sign-extended from this paging mode's top bit (48 or 57 bits)."""
        gva &= (1 << self._va_bits) - 1
        if gva >> (self._va_bits - 1):
            gva |= _MASK64 & ~((1 << self._va_bits) - 1)
        return gva

    def _entry(self, gpa: int) -> int:
        flat = self._flat
        if flat is not None and gpa + 8 <= len(flat):
            return _U64.unpack_from(flat, gpa)[0]
        try:
            return _U64.unpack(self.phys.read(gpa, 8))[0]
        except MemoryAccessError:
            raise TranslationError(f"page table at guest-physical 0x{gpa & ~0xFFF:x} is outside RAM "
                                   f"(cr3 0x{self.cr3:x}); the tables are corrupt or cr3 is wrong") from None

    def _table(self, gpa: int) -> np.ndarray:
        import numpy as np
        try:
            return np.frombuffer(self.phys.read(gpa, PAGE), dtype="<u8")
        except MemoryAccessError:
            raise TranslationError(f"page table at guest-physical 0x{gpa:x} is outside RAM") from None

    def _walk(self, gva: int) -> tuple[int, int]:
        """Return (gpa of the page containing gva, effective flags) or raise TranslationError."""
        gva &= _MASK64
        vpn = gva >> 12
        hit = self._translations.get(vpn)
        if hit is not None:
            return hit
        if self.canonical(gva) != gva:
            raise TranslationError(f"guest-virtual 0x{gva:x} is not canonical for {self.levels}-level paging")
        table, flags = self.cr3, RW | US
        for lvl, shift, reserved, large, large_reserved in self._steps:
            entry = self._entry(table + ((gva >> shift) & 511) * 8)
            if not entry & P:
                raise TranslationError(f"guest-virtual 0x{gva:x} is not mapped ({lvl.name} entry not present, "
                                       f"cr3 0x{self.cr3:x})")
            leaf = shift == 12 or (large and entry & PS)
            if entry & reserved or (leaf and entry & large_reserved):
                raise TranslationError(f"guest-virtual 0x{gva:x}: {lvl.name} entry 0x{entry:x} has reserved "
                                       f"bits set (cr3 0x{self.cr3:x})")
            flags = (flags & entry & (RW | US)) | ((flags | entry) & NX)
            if leaf:
                size = 1 << shift
                result = ((entry & ADDR_MASK & ~(size - 1)) | (gva & (size - 1) & ~(PAGE - 1)), flags)
                if len(self._translations) >= self.limits.cache_translations:
                    self._translations.clear()
                self._translations[vpn] = result
                return result
            table = entry & ADDR_MASK
        raise AssertionError("unreachable: the last level is always a leaf")

    def translate(self, gva: int) -> int:
        """Return the guest-physical address of guest-virtual `gva`; TranslationError if not present."""
        return self._walk(gva)[0] | (gva & (PAGE - 1))

    def find_translation(self, gva: int) -> int | None:
        """Return the guest-physical address of `gva`, or None if it is not mapped."""
        try:
            return self.translate(gva)
        except TranslationError:
            return None

    def read(self, gva: int, size: int) -> bytes:
        """Return `size` bytes at guest-virtual `gva`, across pages; TranslationError names the first gap."""
        if not 0 <= size <= MAX_READ:
            raise MemoryAccessError(f"refusing a {size}-byte virtual read at 0x{gva:x} (limit {MAX_READ})")
        parts = []
        while size > 0:
            n = min(size, PAGE - (gva & (PAGE - 1)))
            gpa = self.translate(gva)
            parts.append(self.phys.read(gpa, n))
            gva = (gva + n) & _MASK64
            size -= n
        return b"".join(parts)

    def unpack(self, gva: int, fmt: str | struct.Struct) -> tuple:
        """Read and unpack a little-endian struct at guest-virtual `gva` (fmt without '<' is made '<')."""
        st = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt if fmt[:1] in "<>!=@" else "<" + fmt)
        return st.unpack(self.read(gva, st.size))

    def read_u64(self, gva: int) -> int:
        """Return the little-endian 64-bit value (e.g. a pointer) at guest-virtual `gva`."""
        return _U64.unpack(self.read(gva, 8))[0]

    # --- enumeration ---------------------------------------------------------------------------

    def iter_mappings(self, *, user_only: bool = False, exec_only: bool = False, start: int = 0,
                      end: int | None = None, budget: Budget | None = None) -> Iterator[Mapping]:
        """Yield present leaf pages with gva in [start, end) (canonical gvas, ascending); never raises.

        Entries with reserved bits or pointing outside RAM are skipped and counted in `anomalies`;
        the walk stops (counted as "work-cap") after `limits.max_tables` tables or `max_leaves` leaves,
        or when a `budget` shared by several walks (e.g. one scan of many address spaces) runs out.
        """
        end = _MASK64 + 1 if end is None else end
        budget = budget or Budget(self.limits.max_tables, self.limits.max_leaves)
        capped = yield from self._iter_level(0, self.cr3, 0, RW | US, user_only, exec_only, start, end, budget, ())
        if capped:
            self.anomalies["work-cap"] += 1
            budget.hit("page-table walks")

    def _iter_level(self, depth: int, table_gpa: int, base: int, flags: int, user_only: bool, exec_only: bool,
                    start: int, end: int, budget: Budget, path: tuple[int, ...]) -> Iterator[Mapping]:
        """Yield this table's mappings; return True when the walk stopped with work left (a cap was hit)."""
        if table_gpa in path:  # a table that points back to an ancestor: a cycle (or a recursive slot)
            self.anomalies["table-cycle"] += 1
            return False
        if budget.tables <= 0:
            return True
        budget.tables -= 1
        _, shift, reserved, large, large_reserved = self._steps[depth]
        try:
            table = self._table(table_gpa)
        except TranslationError:
            self.anomalies["table-outside-ram"] += 1
            return False
        # select in numpy: effective US is an AND and NX an OR over the walk, so an entry's own bits prune
        import numpy as np
        sel = (table & np.uint64(P)) != 0
        if user_only:
            sel &= (table & np.uint64(US)) != 0
        if exec_only:
            sel &= (table & np.uint64(NX)) == 0
        size = 1 << shift
        path += (table_gpa,)
        wanted = [(idx, gva) for idx in np.flatnonzero(sel).tolist()
                  if not ((gva := self.canonical(base | (idx << shift))) + size <= start or gva >= end)]
        for pos, (idx, gva) in enumerate(wanted):
            entry = int(table[idx])
            eff = (flags & entry & (RW | US)) | ((flags | entry) & NX)
            leaf = shift == 12 or (large and entry & PS)
            if entry & reserved or (leaf and entry & large_reserved):
                self.anomalies["reserved-bits"] += 1
                continue
            target = entry & ADDR_MASK
            if leaf:
                target &= ~(size - 1)
                if not _in_ram(self.phys, target):
                    self.anomalies["page-outside-ram"] += 1
                    continue
                if budget.leaves <= 0:
                    return True
                budget.leaves -= 1
                yield Mapping(gva, target, size, bool(eff & RW), bool(eff & US), bool(eff & NX))
            else:
                capped = yield from self._iter_level(depth + 1, target, base | (idx << shift), eff, user_only,
                                                     exec_only, start, end, budget, path)
                if capped:
                    return True
            if budget.exhausted and pos + 1 < len(wanted):  # out of work with entries left: a cap, not the end
                return True
        return False


def _in_ram(phys: PhysicalMemory, gpa: int) -> bool:
    contains = getattr(phys, "contains", None)
    if contains is not None:
        return bool(contains(gpa, 1))
    return any(s <= gpa < e for s, e in phys.ranges)


def iter_runs(mappings: Iterator[Mapping]) -> Iterator[tuple[int, int, list[Mapping]]]:
    """Group gva-contiguous mappings with equal permissions into (gva_start, gva_end, mappings) runs."""
    run: list[Mapping] = []
    for m in mappings:
        if run and (m.gva != run[-1].gva + run[-1].size or
                    (m.writable, m.user, m.nx) != (run[-1].writable, run[-1].user, run[-1].nx)):
            yield run[0].gva, run[-1].gva + run[-1].size, run
            run = []
        run.append(m)
    if run:
        yield run[0].gva, run[-1].gva + run[-1].size, run
