"""Guest-physical memory: raw images (live shared RAM or dumps), QEMU ELF cores and LiME files.

Every address here is a guest-physical address (gpa). Nothing in this module pauses a VM: reading a
live guest's shared RAM file sees memory as it changes; pause the VM first if you need consistency.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from nephoscope.core.errors import ConnectorError, MemoryAccessError

MAX_READ = 1 << 30  # one read larger than this is a bug or guest-controlled nonsense
ELF_MAGIC = b"\x7fELF"
LIME_MAGIC = 0x4C694D45
_LIME_HEADER = struct.Struct("<IIQQ8x")  # magic, version, start, end (inclusive), reserved
_MAX_SEGMENTS = 1 << 16


@runtime_checkable
class PhysicalMemory(Protocol):
    """Guest-physical RAM: a list of [start, end) ranges and a bounded read."""

    ranges: list[tuple[int, int]]

    def read(self, gpa: int, size: int) -> bytes:
        """Return `size` bytes at guest-physical `gpa`; raise MemoryAccessError outside RAM."""
        ...

    def close(self) -> None:
        """Release the backing file or buffer."""
        ...


class SegmentedMemory:
    """Guest RAM served from one buffer holding sorted, non-overlapping segments (zero-copy views)."""

    def __init__(self, buffer: mmap.mmap | bytearray | bytes | memoryview,
                 segments: list[tuple[int, int, int]], source: str = "buffer") -> None:
        """Serve `segments` = [(gpa_start, gpa_end, buffer_offset)] from `buffer`; drop bad or overlapping ones."""
        self.source = source
        self._buffer = buffer
        self._view = memoryview(buffer)
        size = len(self._view)
        clean: list[tuple[int, int, int]] = []
        for start, end, offset in sorted(segments):
            end = min(end, start + max(0, size - offset))  # truncated dumps keep what they have
            if start < 0 or offset < 0 or end <= start or (clean and start < clean[-1][1]):
                continue
            clean.append((start, end, offset))
        if not clean:
            raise ConnectorError(f"{source}: no guest RAM found (empty, truncated or not a memory image)")
        self._segments = clean
        self._starts = [s for s, _, _ in clean]
        self.ranges: list[tuple[int, int]] = _merge([(s, e) for s, e, _ in clean])

    @property
    def size(self) -> int:
        """Return the number of bytes of guest RAM."""
        return sum(e - s for s, e in self.ranges)

    def _locate(self, gpa: int) -> tuple[int, int, int]:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            seg = self._segments[i]
            if gpa < seg[1]:
                return seg
        raise MemoryAccessError(f"guest-physical 0x{gpa:x} is outside RAM ({self.source}); "
                                "check the address or the dump's RAM ranges")

    def contains(self, gpa: int, size: int = 1) -> bool:
        """Return whether [gpa, gpa+size) lies entirely in one RAM segment."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        return i >= 0 and gpa + size <= self._segments[i][1] and size >= 0

    def view(self, gpa: int, size: int) -> memoryview:
        """Return a zero-copy view of [gpa, gpa+size) if it lies in one segment; else MemoryAccessError."""
        start, end, offset = self._locate(gpa)
        if size < 0 or gpa + size > end:
            raise MemoryAccessError(f"guest-physical 0x{gpa:x}+0x{size:x} crosses the end of a RAM range "
                                    f"({self.source}); use read() for spanning reads")
        return self._view[offset + gpa - start: offset + gpa - start + size]

    def read(self, gpa: int, size: int) -> bytes:
        """Return `size` bytes at guest-physical `gpa` (may span adjacent segments)."""
        if not 0 <= size <= MAX_READ:
            raise MemoryAccessError(f"refusing a {size}-byte physical read at 0x{gpa:x} (limit {MAX_READ})")
        start, end, offset = self._locate(gpa)
        if gpa + size <= end:
            return bytes(self._view[offset + gpa - start: offset + gpa - start + size])
        parts = []
        while size > 0:
            start, end, offset = self._locate(gpa)
            n = min(size, end - gpa)
            parts.append(self._view[offset + gpa - start: offset + gpa - start + n])
            gpa += n
            size -= n
        return b"".join(parts)

    def iter_segments(self) -> Iterator[tuple[int, memoryview]]:
        """Yield (gpa_start, zero-copy view) for each RAM segment, in address order."""
        for start, end, offset in self._segments:
            yield start, self._view[offset: offset + end - start]

    def pages(self, gpa: int, count: int) -> np.ndarray:
        """Return a zero-copy (count, 4096) uint8 array of the pages at page-aligned `gpa`."""
        return np.frombuffer(self.view(gpa, count * 4096), dtype=np.uint8).reshape(count, 4096)

    def close(self) -> None:
        """Release the buffer (views still held elsewhere keep the mapping until they are dropped)."""
        self._view.release()
        if isinstance(self._buffer, mmap.mmap):
            with contextlib.suppress(BufferError):
                self._buffer.close()

    def __enter__(self) -> SegmentedMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {self.size >> 20} MiB in {len(self.ranges)} ranges)"


class BufferMemory(SegmentedMemory):
    """Guest RAM held in a Python buffer (tests, small captures); gpa = `base` + buffer offset."""

    def __init__(self, buffer: bytearray | bytes | memoryview, base: int = 0) -> None:
        super().__init__(buffer, [(base, base + len(buffer), 0)], source="buffer")


def _map_file(path: Path) -> mmap.mmap:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ConnectorError(f"cannot open memory image {path}: {exc.strerror}") from exc
    try:
        if os.fstat(fd).st_size == 0:
            raise ConnectorError(f"memory image {path} is empty")
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ConnectorError(f"cannot map memory image {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


class RawMemory(SegmentedMemory):
    """A raw image: file offset = guest-physical address (the lab's live /dev/shm RAM file or a raw dump)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        mm = _map_file(path)
        super().__init__(mm, [(0, len(mm), 0)], source=str(path))


class ElfCoreMemory(SegmentedMemory):
    """A QEMU `dump-guest-memory` ELF core: each PT_LOAD maps p_paddr to a file offset."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        mm = _map_file(path)
        try:
            segments = parse_elf_segments(mm, str(path))
        except Exception:
            mm.close()
            raise
        super().__init__(mm, segments, source=str(path))


class LimeMemory(SegmentedMemory):
    """A LiME dump: a chain of 32-byte headers (magic 0x4C694D45, start, inclusive end) each followed by data."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        mm = _map_file(path)
        try:
            segments = parse_lime_segments(mm, str(path))
        except Exception:
            mm.close()
            raise
        super().__init__(mm, segments, source=str(path))


def parse_elf_segments(data: mmap.mmap | bytes, source: str) -> list[tuple[int, int, int]]:
    """Return [(gpa_start, gpa_end, file_offset)] of an ELF64 little-endian core's PT_LOAD headers."""
    size = len(data)
    if size < 64 or data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise ConnectorError(f"{source}: not an ELF64 little-endian core")
    phoff, = struct.unpack_from("<Q", data, 32)
    shoff, = struct.unpack_from("<Q", data, 40)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    if phnum == 0xFFFF and 0 < shoff <= size - 64:  # PN_XNUM: the real count is section 0's sh_info
        phnum, = struct.unpack_from("<I", data, shoff + 44)
    if phentsize < 56 or phnum > _MAX_SEGMENTS or phoff + phnum * phentsize > size:
        raise ConnectorError(f"{source}: ELF program headers are truncated or absurd "
                             f"(phoff={phoff}, phnum={phnum}, phentsize={phentsize})")
    segments = []
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1 and p_filesz and p_offset < size:
            segments.append((p_paddr, p_paddr + p_filesz, p_offset))
    return segments


def parse_lime_segments(data: mmap.mmap | bytes, source: str) -> list[tuple[int, int, int]]:
    """Return [(gpa_start, gpa_end, file_offset)] of a LiME dump's ranges (stops at the first bad header)."""
    segments = []
    pos, size = 0, len(data)
    while pos + _LIME_HEADER.size <= size and len(segments) < _MAX_SEGMENTS:
        magic, _version, start, end = _LIME_HEADER.unpack_from(data, pos)
        if magic != LIME_MAGIC or end < start:
            break
        pos += _LIME_HEADER.size
        segments.append((start, end + 1, pos))
        pos += end + 1 - start
    if not segments:
        raise ConnectorError(f"{source}: no LiME header found")
    return segments


def open_memory(path: str | Path) -> SegmentedMemory:
    """Open a memory image, choosing the format by content: ELF core, LiME, else raw."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ConnectorError(f"cannot open memory image {path}: {exc.strerror}") from exc
    if head[:4] == ELF_MAGIC:
        return ElfCoreMemory(path)
    if len(head) >= 4 and struct.unpack_from("<I", head)[0] == LIME_MAGIC:
        return LimeMemory(path)
    return RawMemory(path)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
