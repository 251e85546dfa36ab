"""Guest-physical RAM read out of the QEMU process itself (anonymous, hugepage, memfd or file-backed RAM).

The layout — which guest-physical range lives at which host-virtual address of the QEMU process — is
found and proven by `nephoscope.hypervisor.qemu`; this module only reads. Every address named `gpa` is
guest-physical, `hva` is host-virtual in the QEMU process. Nothing here pauses the VM.

Never inflate the VM on the host: a page the guest never touched is neither present nor swapped in
`/proc/PID/pagemap`; it reads as zeros here without being touched (reading it through the process
would fault it in). Pages are read with `process_vm_readv` (many runs in one call), falling back to
`pread` on `/proc/PID/mem`.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import ctypes.util
import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nephoscope.core.errors import ConnectorError, MemoryAccessError
from nephoscope.memory.physical import MAX_READ

PAGE = 4096
PM_PRESENT = np.uint64(1 << 63)
PM_SWAPPED = np.uint64(1 << 62)
BLOCK = 64 << 10  # the small-read cache's unit: one pagemap read and one memory read fill it
SEGMENT_LIMIT = 16 << 20  # per iter_segments view: below glibc's mmap threshold, so buffers are reused (no faults)
_IOV_MAX = 1024


@dataclass(frozen=True, slots=True)
class RamRegion:
    """One guest-physical range [gpa_start, gpa_end) held at host-virtual `hva` of the QEMU process."""

    gpa_start: int
    gpa_end: int
    hva: int
    block: str = ""  # the QEMU RAM block (e.g. pc.ram) and the offset in it, for messages
    block_offset: int = 0

    @property
    def size(self) -> int:
        return self.gpa_end - self.gpa_start


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _libc_readv() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.process_vm_readv
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                   ctypes.c_ulong]
    return fn


_PROCESS_VM_READV = _libc_readv()


def present_pages(entries: np.ndarray) -> np.ndarray:
    """Return which pagemap entries (uint64) hold guest data: present or swapped (the rest read as zeros)."""
    return (entries & (PM_PRESENT | PM_SWAPPED)) != 0


def page_runs(present: np.ndarray) -> list[tuple[int, int]]:
    """Return [(first_page, end_page)) runs of True in a boolean page array."""
    if not len(present):
        return []
    flags = np.concatenate(([False], present.astype(bool), [False]))
    edges = np.flatnonzero(flags[1:] != flags[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


class ProcessMemory:
    """Guest RAM read from a QEMU process (`regions` proven by the caller); untouched pages read as zeros."""

    def __init__(self, pid: int, regions: list[RamRegion], source: str = "", *, cache: bool = True,
                 cache_seconds: float = 1.0, method: str = "auto") -> None:
        """Read the regions of process `pid`; `cache` keeps 64 KiB blocks of small reads for `cache_seconds`.

        `method` "auto" (process_vm_readv where available), "readv" or "mem" (pread on /proc/PID/mem)."""
        if not regions:
            raise ConnectorError(f"QEMU process {pid}: no guest RAM regions to read")
        self.pid = pid
        self.source = source or f"pid:{pid}"
        self.regions = sorted(regions, key=lambda r: r.gpa_start)
        for a, b in zip(self.regions, self.regions[1:], strict=False):
            if b.gpa_start < a.gpa_end:
                raise ConnectorError(f"{self.source}: overlapping guest RAM regions {a} and {b}")
        self._starts = [r.gpa_start for r in self.regions]
        self.ranges: list[tuple[int, int]] = _merge([(r.gpa_start, r.gpa_end) for r in self.regions])
        try:
            self._mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except OSError as exc:
            raise ConnectorError(f"cannot open /proc/{pid}/mem: {exc.strerror} (run as root or as the QEMU "
                                 "process's user)") from exc
        try:
            self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        except OSError as exc:
            os.close(self._mem)
            raise ConnectorError(f"cannot open /proc/{pid}/pagemap: {exc.strerror}") from exc
        use_readv = method == "readv" or (method == "auto" and _PROCESS_VM_READV is not None)
        if use_readv and _PROCESS_VM_READV is None:
            raise ConnectorError("process_vm_readv is not available here; use method 'mem'")
        self.method = "process_vm_readv" if use_readv else "/proc/PID/mem"
        self._cache_on = cache
        self._cache_seconds = cache_seconds
        self._blocks: dict[int, tuple[float, bytes]] = {}
        self.stats = {"pages_read": 0, "pages_skipped": 0, "syscalls": 0}

    # --- layout ------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Return the number of bytes of guest RAM."""
        return sum(e - s for s, e in self.ranges)

    def _region(self, gpa: int) -> RamRegion:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self.regions[i].gpa_end:
            return self.regions[i]
        raise MemoryAccessError(f"guest-physical 0x{gpa:x} is outside RAM ({self.source}); check the address")

    def contains(self, gpa: int, size: int = 1) -> bool:
        """Return whether [gpa, gpa+size) lies entirely in one RAM region."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        return i >= 0 and size >= 0 and gpa + size <= self.regions[i].gpa_end

    # --- the page map ------------------------------------------------------------------------------

    def pagemap(self, hva: int, pages: int) -> np.ndarray:
        """Return the QEMU process's pagemap entries (uint64) of `pages` pages from page-aligned `hva`."""
        raw = os.pread(self._pagemap, pages * 8, (hva // PAGE) * 8)
        self.stats["syscalls"] += 1
        if len(raw) != pages * 8:
            raise ConnectorError(f"{self.source}: short pagemap read at host 0x{hva:x} (the process exited?)")
        return np.frombuffer(raw, dtype="<u8")

    def touched(self, gpa: int, size: int) -> np.ndarray:
        """Return per page of [gpa, gpa+size) (page-aligned, one region) whether the guest touched it."""
        r = self._region(gpa)
        return present_pages(self.pagemap(r.hva + gpa - r.gpa_start, -(-size // PAGE)))

    # --- reading -----------------------------------------------------------------------------------

    def _read_runs(self, buf: bytearray | memoryview | mmap.mmap, runs: list[tuple[int, int, int]]) -> None:
        """Fill `buf` from the process: runs = [(buffer_offset, hva, length)]."""
        if not runs:
            return
        if self.method == "/proc/PID/mem":
            view = memoryview(buf)
            for off, hva, n in runs:
                got = os.preadv(self._mem, [view[off: off + n]], hva)
                self.stats["syscalls"] += 1
                if got != n:
                    raise MemoryAccessError(f"{self.source}: short read at host 0x{hva:x} ({got} of {n} bytes)")
            return
        base = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
        for i in range(0, len(runs), _IOV_MAX):
            part = runs[i: i + _IOV_MAX]
            local = (_Iovec * len(part))(*[(base + off, n) for off, _, n in part])
            remote = (_Iovec * len(part))(*[(hva, n) for _, hva, n in part])
            want = sum(n for _, _, n in part)
            got = _PROCESS_VM_READV(self.pid, local, len(part), remote, len(part), 0)  # type: ignore[misc]
            self.stats["syscalls"] += 1
            if got != want:
                err = ctypes.get_errno()
                raise MemoryAccessError(f"{self.source}: process_vm_readv read {got} of {want} bytes "
                                        f"({os.strerror(err) if got < 0 else 'short'}); did the QEMU process exit?")

    def _fill(self, buf: bytearray | memoryview, gpa: int, size: int) -> None:
        """Read [gpa, gpa+size) into zeroed `buf`, skipping pages the guest never touched."""
        runs: list[tuple[int, int, int]] = []
        pos = 0
        while pos < size:
            r = self._region(gpa + pos)
            n = min(size - pos, r.gpa_end - gpa - pos)
            hva = r.hva + gpa + pos - r.gpa_start
            first = hva & ~(PAGE - 1)
            pages = (hva + n - first + PAGE - 1) // PAGE
            present = present_pages(self.pagemap(first, pages))
            if present.all():
                runs.append((pos, hva, n))
                self.stats["pages_read"] += pages
            else:
                self.stats["pages_read"] += int(present.sum())
                self.stats["pages_skipped"] += pages - int(present.sum())
                for a, b in page_runs(present):
                    lo, hi = max(hva, first + a * PAGE), min(hva + n, first + b * PAGE)
                    runs.append((pos + lo - hva, lo, hi - lo))
            pos += n
        self._read_runs(buf, runs)

    def read(self, gpa: int, size: int) -> bytes:
        """Return `size` bytes at guest-physical `gpa` (untouched pages as zeros; no pause)."""
        if not 0 <= size <= MAX_READ:
            raise MemoryAccessError(f"refusing a {size}-byte physical read at 0x{gpa:x} (limit {MAX_READ})")
        if not size:
            self._region(gpa)
            return b""
        block = gpa // BLOCK
        if self._cache_on and (gpa + size - 1) // BLOCK == block and self.contains(gpa, size):
            hit = self._blocks.get(block)
            now = time.monotonic()
            if hit is None or now - hit[0] > self._cache_seconds:
                base = block * BLOCK
                r = self._region(gpa)
                lo, hi = max(base, r.gpa_start), min(base + BLOCK, r.gpa_end)
                buf = bytearray(hi - lo)
                self._fill(buf, lo, hi - lo)
                if len(self._blocks) >= 2048:
                    self._blocks.clear()
                hit = self._blocks[block] = (now, bytes(buf) if lo == base else bytes(lo - base) + bytes(buf))
            off = gpa - block * BLOCK
            return hit[1][off: off + size]
        buf = bytearray(size)
        self._fill(buf, gpa, size)
        return bytes(buf)

    def read_into(self, buf: bytearray | memoryview, gpa: int) -> None:
        """Fill `buf` (zeroed by the caller) from guest-physical `gpa`, uncached: the bulk path."""
        self._fill(buf, gpa, len(buf))

    def flush(self) -> None:
        """Forget cached blocks (after the guest ran, e.g. at a breakpoint)."""
        self._blocks.clear()

    def _region_runs(self, r: RamRegion) -> list[tuple[int, int]]:
        """Return [(first_page, end_page)) runs of touched pages of region `r` (pagemap, 2 MiB of entries a read)."""
        step = 1 << 18
        pages = r.size // PAGE
        if not pages:
            return []
        return page_runs(np.concatenate([present_pages(self.pagemap(r.hva + p * PAGE, min(step, pages - p)))
                                         for p in range(0, pages, step)]))

    def iter_touched(self) -> Iterator[tuple[int, int]]:
        """Yield (gpa, size) of each run of touched pages (present or swapped), in address order."""
        for r in self.regions:
            for a, b in self._region_runs(r):
                yield r.gpa_start + a * PAGE, (b - a) * PAGE

    def iter_segments(self, limit: int = SEGMENT_LIMIT, gap: int = 1 << 20) -> Iterator[tuple[int, memoryview]]:
        """Yield (gpa_start, copied view) covering the touched pages, in address order; the rest reads as zeros.

        Runs closer than `gap` share one view (the untouched pages between them are zeros in it, never read);
        a view spans at most `limit` bytes. One process_vm_readv call reads up to 1024 runs."""
        limit_pages, gap_pages = max(1, limit // PAGE), gap // PAGE
        plan = [(r, self._region_runs(r)) for r in self.regions]
        wanted = sum(b - a for _, runs in plan for a, b in runs) // 512 + len(plan) * 16
        huge = free_huge_blocks() > 2 * wanted + 256  # plenty free: no compaction stall, and others keep theirs
        for r, runs in plan:
            i = 0
            while i < len(runs):
                first, end = runs[i]
                if end - first > limit_pages:  # one long run: cut it
                    end = first + limit_pages
                    runs[i] = (end, runs[i][1])
                    group = [(first, end)]
                else:
                    group = [runs[i]]
                    i += 1
                    while i < len(runs) and runs[i][0] - end <= gap_pages and runs[i][1] - first <= limit_pages:
                        group.append(runs[i])
                        end = runs[i][1]
                        i += 1
                buf = _scratch((end - first) * PAGE, huge)
                self._read_runs(buf, [((a - first) * PAGE, r.hva + a * PAGE, (b - a) * PAGE) for a, b in group])
                self.stats["pages_read"] += sum(b - a for a, b in group)
                yield r.gpa_start + first * PAGE, memoryview(buf)

    def iter_range_views(self, copy_limit: int = SEGMENT_LIMIT) -> Iterator[tuple[int, memoryview]]:
        """Yield (gpa_start, view) of touched RAM (as iter_segments); untouched pages hold zeros."""
        yield from self.iter_segments(copy_limit or SEGMENT_LIMIT)

    def touched_bytes(self) -> int:
        """Return how many bytes of guest RAM the guest has touched (present or swapped pages)."""
        return sum(n for _, n in self.iter_touched())

    def close(self) -> None:
        """Close the process handles (the VM keeps running)."""
        for fd in (self._mem, self._pagemap):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._mem = self._pagemap = -1
        self._blocks.clear()

    def __enter__(self) -> ProcessMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ProcessMemory({self.source!r}, {self.size >> 20} MiB in {len(self.regions)} regions, {self.method})"


def free_huge_blocks(buddyinfo: str | None = None) -> int:
    """Return how many free 2 MiB blocks the kernel's buddy allocator holds (/proc/buddyinfo, orders >= 9)."""
    if buddyinfo is None:
        try:
            buddyinfo = Path("/proc/buddyinfo").read_text()
        except OSError:
            return 0
    total = 0
    for line in buddyinfo.splitlines():
        counts = line.split()[4:]
        total += sum(int(c) << (order - 9) for order, c in enumerate(counts) if order >= 9 and c.isdigit())
    return total


def _scratch(size: int, huge: bool = False) -> mmap.mmap | bytearray:
    """Return a zeroed writable buffer of `size` bytes: huge pages when `huge`, else pre-faulted when large.

    Callers keep many of these at once (a RAM scan lists its views), so they cannot reuse one buffer, and
    faulting 4 KiB pages in one by one costs more than reading the guest's RAM. Transparent huge pages are
    fastest while free 2 MiB blocks exist (the caller checks `free_huge_blocks`): on a fragmented host a
    madvise'd region stalls in direct compaction (0.6 s instead of 0.02 s for 240 MiB, measured here), so
    then the kernel's batch populate (MAP_POPULATE, 4 KiB pages) is used."""
    if size < 1 << 21:
        return bytearray(size)
    if huge:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(AttributeError, OSError):
            buf.madvise(mmap.MADV_HUGEPAGE)
        return buf
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
