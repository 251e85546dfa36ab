"""Find the kernel's own BTF blob in guest-physical memory by its header, then prove it by parsing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from nephoscope.core.errors import DetectionError, GuestDataError, MemoryAccessError
from nephoscope.os.btf.reader import HEADER, MAX_BLOB, Btf

# magic 0xEB9F little-endian, version 1, flags 0, hdr_len 24: eight bytes no other kernel data starts with.
_HEADER_PREFIX = re.compile(re.escape(b"\x9f\xeb\x01\x00\x18\x00\x00\x00"))
REQUIRED_STRUCTS = ("task_struct", "mm_struct", "vm_area_struct", "module")
MAX_CANDIDATES = 4096  # hostile guests can spray headers; we parse only the largest plausible few
MAX_PARSES = 8
READ_CHUNK = 64 << 20  # for memory without zero-copy views


class ScannableMemory(Protocol):
    """Guest-physical memory that can hand out zero-copy views of its RAM segments."""

    ranges: list[tuple[int, int]]

    def read(self, gpa: int, size: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Candidate:
    """A BTF header found at guest-physical `gpa` declaring a `size`-byte blob, and what we made of it."""

    gpa: int
    size: int
    verdict: str = "unchecked"  # vmlinux | split | invalid | unchecked


@dataclass(frozen=True, slots=True)
class LocatedBtf:
    """The vmlinux BTF found in guest RAM: where it lies (gpa), the parsed blob and every candidate seen."""

    gpa: int
    size: int
    btf: Btf
    candidates: tuple[Candidate, ...]


def iter_btf_headers(memory: ScannableMemory) -> Iterator[Candidate]:
    """Yield every sane BTF header in guest RAM (gpa order) with the blob size it declares."""
    last = -1
    for gpa_start, view in _iter_views(memory):
        limit = len(view)
        for match in _HEADER_PREFIX.finditer(view):
            pos = match.start()
            if pos + HEADER.size > limit or gpa_start + pos <= last:
                continue
            last = gpa_start + pos
            _m, _v, _f, hdr_len, type_off, type_len, str_off, str_len = HEADER.unpack_from(view, pos)
            total = hdr_len + max(type_off + type_len, str_off + str_len)
            if type_len == 0 or str_len == 0 or type_off % 4 or type_len % 4 or total > MAX_BLOB:
                continue
            overlap = type_off < str_off + str_len and str_off < type_off + type_len
            if overlap:
                continue
            yield Candidate(gpa_start + pos, total)


def find_vmlinux_btf(memory: ScannableMemory) -> LocatedBtf | None:
    """Return the largest BTF blob in guest RAM that parses and describes the core kernel structs, or None."""
    seen: list[Candidate] = []
    for candidate in iter_btf_headers(memory):
        seen.append(candidate)
        if len(seen) >= MAX_CANDIDATES:
            break
    checked: dict[int, Candidate] = {}
    found: tuple[Candidate, Btf] | None = None
    for candidate in sorted(seen, key=lambda c: (-c.size, c.gpa))[:MAX_PARSES]:
        verdict, btf = _check(memory, candidate)
        checked[candidate.gpa] = Candidate(candidate.gpa, candidate.size, verdict)
        if btf is not None:
            found = (checked[candidate.gpa], btf)
            break
    report = tuple(checked.get(c.gpa) or Candidate(c.gpa, c.size, _quick_verdict(memory, c)) for c in seen)
    if found is None:
        return None
    return LocatedBtf(found[0].gpa, found[0].size, found[1], report)


def get_vmlinux_btf(memory: ScannableMemory) -> LocatedBtf:
    """Return the vmlinux BTF in guest RAM; raise DetectionError saying what the scan found instead."""
    located = find_vmlinux_btf(memory)
    if located is None:
        headers = list(iter_btf_headers(memory))
        raise DetectionError(
            f"stage btf: no vmlinux BTF in guest RAM ({len(headers)} BTF headers found, none parsed with "
            f"{', '.join(REQUIRED_STRUCTS)}); the kernel may be built without CONFIG_DEBUG_INFO_BTF — "
            "pass the kernel's types with --symbols FILE (a Volatility 3 ISF, a vmlinux with BTF or DWARF, "
            "or /sys/kernel/btf/vmlinux of the same kernel)")
    return located


def _check(memory: ScannableMemory, candidate: Candidate) -> tuple[str, Btf | None]:
    try:
        blob = memory.read(candidate.gpa, candidate.size)
    except MemoryAccessError:
        return "invalid", None  # declared size runs off the end of RAM: a truncated stale copy
    _m, _v, _f, hdr_len, _to, _tl, str_off, _sl = HEADER.unpack_from(blob)
    if blob[hdr_len + str_off] != 0:
        return "split", None  # module BTF: its strings continue vmlinux's, so it cannot stand alone
    try:
        btf = Btf.parse(blob, label=f"BTF at guest-physical 0x{candidate.gpa:x}")
        if all(btf.find_struct(name) is not None for name in REQUIRED_STRUCTS):
            return "vmlinux", btf
    except GuestDataError:
        pass
    return "invalid", None


def _quick_verdict(memory: ScannableMemory, candidate: Candidate) -> str:
    """Say "split" when the blob's strings do not start with the empty string (module BTF), without parsing."""
    try:
        header = memory.read(candidate.gpa, HEADER.size)
        _m, _v, _f, hdr_len, _to, _tl, str_off, _sl = HEADER.unpack_from(header)
        return "split" if memory.read(candidate.gpa + hdr_len + str_off, 1) != b"\0" else "unchecked"
    except MemoryAccessError:
        return "invalid"


def _iter_views(memory: ScannableMemory) -> Iterator[tuple[int, memoryview | bytes]]:
    segments = getattr(memory, "iter_segments", None)
    if segments is not None:
        yield from segments()
        return
    chunk = READ_CHUNK
    for start, end in memory.ranges:  # no zero-copy views: read overlapping chunks
        for gpa in range(start, end, chunk):
            size = min(chunk + HEADER.size, end - gpa)
            yield gpa, memory.read(gpa, size)  # overlap so no header straddles; callers drop repeats
