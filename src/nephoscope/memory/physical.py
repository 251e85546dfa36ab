"""Guest-physical memory: raw images (live shared RAM or dumps), QEMU ELF cores and LiME files.

Every address here is a guest-physical address (gpa). Nothing in this module pauses a VM: reading a
live guest's shared RAM file sees memory as it changes; pause the VM first if you need consistency.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import mmap
import os
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from nephoscope.core.errors import ConnectorError, MemoryAccessError

if TYPE_CHECKING:
    import numpy as np

MAX_READ = 1 << 30  # one read larger than this is a bug or guest-controlled nonsense
MAX_GPA = 1 << 52  # x86-64's architectural limit of physical addresses: nothing above is RAM
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
                 segments: list[tuple[int, int, int]], source: str = "buffer",
                 problems: list[str] | None = None) -> None:
        """Serve `segments` = [(gpa_start, gpa_end, buffer_offset)] from `buffer`; drop bad or overlapping ones.

        What was dropped or cut is recorded in `problems` (with the parser's own findings, if given)."""
        self.source = source
        self._buffer = buffer
        self._view = memoryview(buffer)
        self.problems: list[str] = list(problems or [])
        size = len(self._view)
        clean: list[tuple[int, int, int]] = []
        dropped: Counter[str] = Counter()
        for start, end, offset in sorted(segments):
            if start < 0 or offset < 0 or end <= start:
                dropped["empty or negative"] += 1
                continue
            if end > MAX_GPA:
                dropped["reaching past the 2^52 physical-address limit"] += 1
                continue
            if offset >= size:
                dropped["starting past the end of the file (truncated dump)"] += 1
                continue
            if end > start + size - offset:  # truncated dumps keep what they have
                end = start + size - offset
                dropped["truncated at the end of the file"] += 1
            if clean and start < clean[-1][1]:
                dropped["overlapping an earlier one"] += 1
                continue
            clean.append((start, end, offset))
        self.problems += [f"{n} segment(s) {why}" for why, n in dropped.items()]
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

    def iter_range_views(self, copy_limit: int = 64 << 20) -> Iterator[tuple[int, memoryview]]:
        """Yield (gpa_start, view) covering each RAM range (adjacent segments joined), in address order.

        A range whose segments are also adjacent in the buffer is one zero-copy view; otherwise its pieces
        are copied together, at most `copy_limit` bytes at a time (a range may then come in several views)."""
        i, segs = 0, self._segments
        while i < len(segs):
            j = i + 1
            while j < len(segs) and segs[j][0] == segs[j - 1][1] and segs[j][2] == segs[j - 1][2] + (
                    segs[j - 1][1] - segs[j - 1][0]):
                j += 1
            if j == len(segs) or segs[j][0] != segs[j - 1][1]:  # buffer-contiguous up to the range's end
                yield segs[i][0], self._view[segs[i][2]: segs[j - 1][2] + segs[j - 1][1] - segs[j - 1][0]]
                i = j
                continue
            start, parts, total = segs[i][0], [], 0  # adjacent in gpa, scattered in the buffer: copy
            while i < len(segs) and (not parts or (segs[i][0] == segs[i - 1][1] and total < copy_limit)):
                s, e, o = segs[i]
                parts.append(self._view[o: o + e - s])
                total += e - s
                i += 1
            yield start, memoryview(b"".join(parts))

    def flat_view(self) -> memoryview | None:
        """Return one zero-copy view in which offset = gpa, if all RAM is one buffer-contiguous run from 0."""
        first = next(self.iter_range_views(0), None)
        if first is None or first[0] != 0 or len(self.ranges) != 1 or len(first[1]) != self.ranges[0][1]:
            return None
        return first[1]

    def pages(self, gpa: int, count: int) -> np.ndarray:
        """Return a zero-copy (count, 4096) uint8 array of the pages at page-aligned `gpa`."""
        import numpy as np
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


def data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
    """Return the [start, end) file ranges that hold data (SEEK_DATA/SEEK_HOLE), or None if unknown.

    A hole of a sparse file (a tmpfs RAM file: guest RAM never touched) reads as zeros; reading it through
    `read()` does not allocate it, faulting it in through a shared mmap does."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            return None
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
        pos = end
    return out


class RawMemory(SegmentedMemory):
    """A raw image: file offset = guest-physical address (the lab's live /dev/shm RAM file or a raw dump).

    Holes of a sparse file (RAM the guest never touched) read as zeros without being allocated: reads
    that touch a hole go through `pread`, and `iter_segments`/`iter_range_views` yield only the data
    extents (what lies between them is zeros). Holes are learnt when the file is opened; a hole the guest
    fills later is still read correctly (pread sees the new data)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        mm = _map_file(path)
        super().__init__(mm, [(0, len(mm), 0)], source=str(path))
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            mm.close()
            raise ConnectorError(f"cannot open memory image {path}: {exc.strerror}") from exc
        self.data: list[tuple[int, int]] | None = None
        self._data_starts: list[int] = []
        self.refresh()

    def refresh(self) -> list[tuple[int, int]]:
        """Learn the file's data extents again (the guest touched more RAM); return them."""
        size = len(self._view)
        extents = data_extents(self._fd, size)
        self.data = None if extents is None or extents == [(0, size)] else extents
        self._data_starts = [s for s, _ in self.data or []]
        return self.data if self.data is not None else [(0, size)]

    def iter_touched(self) -> Iterator[tuple[int, int]]:
        """Yield (gpa, size) of each data extent (all of the file when it has no holes)."""
        for start, end in self.data if self.data is not None else [(0, len(self._view))]:
            yield start, end - start

    @property
    def holes(self) -> bool:
        """Return whether the file has holes (never-touched RAM) that reads skip."""
        return self.data is not None

    def _in_data(self, gpa: int, size: int) -> bool:
        if self.data is None:
            return True
        i = bisect.bisect_right(self._data_starts, gpa) - 1
        return i >= 0 and gpa + size <= self.data[i][1]

    def data_bytes(self) -> int:
        """Return how many bytes of the file hold data (all of it when it has no holes)."""
        return sum(e - s for s, e in self.data) if self.data is not None else self.size

    def read(self, gpa: int, size: int) -> bytes:
        """Return `size` bytes at guest-physical `gpa`; holes read as zeros without being allocated."""
        if self.data is None or self._in_data(gpa, size) or not 0 <= size <= MAX_READ or not self.contains(gpa, size):
            return super().read(gpa, size)
        try:
            data = os.pread(self._fd, size, gpa)
        except OSError as exc:
            raise MemoryAccessError(f"cannot read 0x{size:x} bytes at 0x{gpa:x} of {self.source}: {exc.strerror}") \
                from exc
        return data + bytes(size - len(data))

    def view(self, gpa: int, size: int) -> memoryview:
        """Return a view of [gpa, gpa+size) in one segment (a copy where it touches a hole)."""
        if self._in_data(gpa, size) or not self.contains(gpa, size):
            return super().view(gpa, size)
        return memoryview(self.read(gpa, size))

    def iter_segments(self) -> Iterator[tuple[int, memoryview]]:
        """Yield (gpa_start, zero-copy view) of each data extent (everything between them reads as zeros)."""
        if self.data is None:
            yield from super().iter_segments()
            return
        for start, end in self.data:
            yield start, self._view[start:end]

    def iter_range_views(self, copy_limit: int = 64 << 20) -> Iterator[tuple[int, memoryview]]:
        """Yield (gpa_start, zero-copy view) of each data extent (holes read as zeros and are skipped)."""
        if self.data is None:
            yield from super().iter_range_views(copy_limit)
            return
        yield from self.iter_segments()

    def flat_view(self) -> memoryview | None:
        """Return the whole file as one view where it has no holes (None otherwise: a hole would be faulted in)."""
        return super().flat_view() if self.data is None else None

    def close(self) -> None:
        """Release the mapping and the file."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        super().close()


class ElfCoreMemory(SegmentedMemory):
    """A QEMU `dump-guest-memory` ELF core: each PT_LOAD maps p_paddr to a file offset."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        mm = _map_file(path)
        problems: list[str] = []
        try:
            segments = parse_elf_segments(mm, str(path), problems)
        except Exception:
            mm.close()
            raise
        super().__init__(mm, segments, source=str(path), problems=problems)


class LimeMemory(SegmentedMemory):
    """A LiME dump: a chain of 32-byte headers (magic 0x4C694D45, start, inclusive end) each followed by data."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        mm = _map_file(path)
        problems: list[str] = []
        try:
            segments = parse_lime_segments(mm, str(path), problems)
        except Exception:
            mm.close()
            raise
        super().__init__(mm, segments, source=str(path), problems=problems)


def parse_elf_segments(data: mmap.mmap | bytes, source: str,
                       problems: list[str] | None = None) -> list[tuple[int, int, int]]:
    """Return [(gpa_start, gpa_end, file_offset)] of an ELF64 little-endian core's PT_LOAD headers.

    Segments that cannot be RAM (past 2^52, wrapping past 2^64, outside the file) are skipped and counted
    in `problems`, as are page-misaligned ones (kept: a sign the headers, not the guest, are wrong)."""
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
    skipped: Counter[str] = Counter()
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type != 1 or not p_filesz:
            continue
        if p_paddr + p_filesz > MAX_GPA:
            skipped["PT_LOAD past the 2^52 physical-address limit (or wrapping past 2^64)"] += 1
        elif p_offset >= size:
            skipped["PT_LOAD starting past the end of the file"] += 1
        else:
            if p_paddr % 4096:
                skipped["PT_LOAD at a page-misaligned physical address (kept)"] += 1
            segments.append((p_paddr, p_paddr + p_filesz, p_offset))
    if problems is not None:
        problems += [f"{n} {why}" for why, n in skipped.items()]
    return segments


def parse_lime_segments(data: mmap.mmap | bytes, source: str,
                        problems: list[str] | None = None) -> list[tuple[int, int, int]]:
    """Return [(gpa_start, gpa_end, file_offset)] of a LiME dump's ranges (stops at the first bad header)."""
    segments = []
    pos, size = 0, len(data)
    while pos + _LIME_HEADER.size <= size:
        magic, _version, start, end = _LIME_HEADER.unpack_from(data, pos)
        if magic != LIME_MAGIC:
            break
        if end < start or end >= MAX_GPA:
            if problems is not None:
                problems.append(f"LiME header at file offset {pos} has an absurd range {start:#x}-{end:#x}; "
                                "the rest of the file is ignored")
            break
        if len(segments) >= _MAX_SEGMENTS:
            if problems is not None:
                problems.append(f"more than {_MAX_SEGMENTS} LiME ranges; the rest of the file is ignored")
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
