"""Where a QEMU VM keeps guest RAM in its own process, found from the monitor and proven before use.

The monitor gives the guest-physical layout (HMP `info mtree -f`: which gpa range is which RAM block at
which offset, e.g. `0x100000000-0x15fffffff → pc.ram @0xc0000000` above the PCI hole), the RAM blocks
(`info ramblock`) and the memory backends (QMP `query-memdev`); `/proc/PID/maps` gives the process's
mappings. A RAM block is one mapping of the block's size (anonymous rw-p, memfd, hugetlbfs or a file).
A candidate mapping is accepted only after HMP `xp` reads of several touched, non-zero pages spread over
every RAM region equal the bytes in the process at the computed address; anything less is a
ConnectorError that says why. Every `gpa` is guest-physical, every `hva` host-virtual in the QEMU
process. Nothing here pauses the VM (the guest runs during the proof: a page that changed between the
two reads is read again).
"""

from __future__ import annotations

import os
import random
import re
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from nephoscope.core.errors import ConnectorError

PAGE = 4096
_PRESENT_OR_SWAPPED = (1 << 63) | (1 << 62)
_MTREE = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([a-z/]+)\): (\S+)(?: @([0-9a-f]+))?", re.M)
_RAMBLOCK = re.compile(r"^\s*(\S+)\s+(\d+)\s*([KMG]i?B)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s*$", re.M)
_XP = re.compile(r"^([0-9a-f]+):((?:\s+0x[0-9a-f]+)+)\s*$", re.M)
SAMPLES_PER_REGION = 3


class Hmp(Protocol):
    """A monitor that runs human monitor commands (nephoscope.hypervisor.monitor.Monitor)."""

    def hmp(self, line: str) -> str: ...

    def command(self, name: str, **args: object) -> object: ...


@dataclass(frozen=True, slots=True)
class FlatRange:
    """One line of the system address space's flat view: [gpa_start, gpa_end) → region `name` at `offset`."""

    gpa_start: int
    gpa_end: int
    kind: str  # ram, rom, romd, i/o
    name: str
    offset: int


@dataclass(frozen=True, slots=True)
class RamBlock:
    """One QEMU RAM block (`info ramblock`): its name, page size, used and allocated length."""

    name: str
    page_size: int
    used: int
    total: int


@dataclass(frozen=True, slots=True)
class HostMapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    dev: str = ""  # major:minor of the backing file's device ("00:00" for anonymous memory)

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def backing(self) -> str:
        """Return anonymous, memfd, hugetlbfs or file."""
        if not self.path:
            return "anonymous"
        if self.path.startswith("/memfd:"):
            return "memfd"
        if self.path.startswith(("/dev/hugepages", "/anon_hugepage")) or "hugetlb" in self.path:
            return "hugetlbfs"
        return "file"


@dataclass(frozen=True, slots=True)
class GuestRamRange:
    """A guest-physical range [gpa_start, gpa_end) held in RAM block `block` at `block_offset`; `hva` once mapped."""

    gpa_start: int
    gpa_end: int
    block: str
    block_offset: int
    hva: int = 0


@dataclass(slots=True)
class ProcessRam:
    """Proven guest RAM of a QEMU process: its ranges (with host addresses) and how they were proven."""

    pid: int
    ranges: list[GuestRamRange]
    backing: dict[str, str]  # block → anonymous/memfd/hugetlbfs/file (path)
    proof: list[str] = field(default_factory=list)  # "gpa 0x…: 16 bytes equal (xp)" lines
    mappings: dict[str, HostMapping] = field(default_factory=dict)  # block → its proven mapping

    def shared_file(self) -> Path | None:
        """Return a path that opens the file behind the RAM (memfd, file, hugetlbfs) when it holds all guest RAM
        at file offset = gpa (one block, a shared mapping from offset 0, no RAM above the PCI hole), else None."""
        if len(self.mappings) != 1:
            return None
        m = next(iter(self.mappings.values()))
        if m.backing == "anonymous" or m.perms[3:4] != "s" or m.offset != 0:
            return None
        if not all(r.gpa_start == r.block_offset for r in self.ranges):
            return None
        if kernel_page_kib(self.pid, m.start) != 4:
            return None  # hugetlb: a read through our own mapping of a hole allocates a huge page; use pagemap
        path = Path(f"/proc/{self.pid}/map_files/{m.start:x}-{m.end:x}")  # the mapping's own file (needs root)
        return path if path.exists() else None

    def describe(self) -> dict[str, object]:
        """Return the layout as plain values (for JSON and logs)."""
        return {"pid": self.pid, "backing": self.backing, "proof": len(self.proof),
                "ranges": [{"gpa": f"{r.gpa_start:#x}-{r.gpa_end - 1:#x}", "block": r.block,
                            "offset": f"{r.block_offset:#x}", "hva": f"{r.hva:#x}"} for r in self.ranges]}


def kernel_page_kib(pid: int, start: int) -> int | None:
    """Return the kernel page size (KiB) of the mapping of process `pid` that starts at host address `start`
    (/proc/PID/smaps `KernelPageSize`: 4, or 2048 for hugetlb), or None when it cannot be read."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    header = re.search(rf"^{start:x}-", text, re.M)
    if header is None:
        return None
    m = re.compile(r"^KernelPageSize:\s+(\d+) kB", re.M).search(text, header.end())
    return int(m.group(1)) if m else None


# --- parsers (monitor and /proc text) ------------------------------------------------------------------


def parse_mtree(text: str) -> list[FlatRange]:
    """Return the ranges of the flat view that renders AS "memory" (HMP `info mtree -f`)."""
    views = re.split(r"^FlatView #\d+\s*$", text, flags=re.M)
    chosen = next((v for v in views if re.search(r'^\s*AS "memory"', v, re.M)), None)
    if chosen is None:
        chosen = views[1] if len(views) > 1 else text
    out = []
    for m in _MTREE.finditer(chosen):
        start, last = int(m.group(1), 16), int(m.group(2), 16)
        if last < start:
            continue
        out.append(FlatRange(start, last + 1, m.group(3), m.group(4), int(m.group(5) or "0", 16)))
    return out


def parse_ramblocks(text: str) -> dict[str, RamBlock]:
    """Return the RAM blocks of HMP `info ramblock` by name."""
    units = {"KiB": 1 << 10, "KB": 1 << 10, "MiB": 1 << 20, "MB": 1 << 20, "GiB": 1 << 30, "GB": 1 << 30}
    out = {}
    for m in _RAMBLOCK.finditer(text):
        out[m.group(1)] = RamBlock(m.group(1), int(m.group(2)) * units[m.group(3)], int(m.group(5), 16),
                                   int(m.group(6), 16))
    return out


def parse_maps(text: str) -> list[HostMapping]:
    """Return the mappings of /proc/PID/maps text."""
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5 or "-" not in parts[0]:
            continue
        start, _, end = parts[0].partition("-")
        try:
            out.append(HostMapping(int(start, 16), int(end, 16), parts[1], int(parts[2], 16), int(parts[4]),
                                   parts[5].strip() if len(parts) > 5 else "", parts[3]))
        except ValueError:
            continue
    return out


def parse_xp(text: str) -> bytes:
    """Return the bytes of HMP `xp /Ngx GPA` output (little-endian 64-bit words)."""
    words = [int(w, 16) for m in _XP.finditer(text) for w in m.group(2).split()]
    return b"".join(struct.pack("<Q", w & ((1 << 64) - 1)) for w in words)


def ram_ranges(flat: list[FlatRange], names: set[str]) -> list[GuestRamRange]:
    """Join the flat view's RAM/ROM ranges of the regions in `names` into contiguous guest RAM ranges."""
    out: list[GuestRamRange] = []
    for r in flat:
        if r.name not in names or r.kind not in ("ram", "rom", "romd", "ramd"):
            continue
        if out and out[-1].block == r.name and out[-1].gpa_end == r.gpa_start and \
                out[-1].block_offset + (out[-1].gpa_end - out[-1].gpa_start) == r.offset:
            last = out[-1]
            out[-1] = GuestRamRange(last.gpa_start, r.gpa_end, last.block, last.block_offset)
        else:
            out.append(GuestRamRange(r.gpa_start, r.gpa_end, r.name, r.offset))
    return out


# --- the QEMU process ----------------------------------------------------------------------------------


def find_qemu_pid(qmp_socket: str | Path) -> int | None:
    """Return the pid of the process serving `qmp_socket` (SO_PEERCRED), or None (connect before the monitor)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(qmp_socket))
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
    pid = struct.unpack("3i", creds)[0]
    return pid if pid > 0 else None


class _ProcessBytes:
    """The few reads the proof needs, straight from the process (pagemap first: never fault a page in)."""

    def __init__(self, pid: int) -> None:
        try:
            self.mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
            self.pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        except OSError as exc:
            raise ConnectorError(f"cannot read the memory of QEMU process {pid}: {exc.strerror} (run as root or "
                                 "as the QEMU process's user)") from exc

    def touched_pages(self, hva: int, pages: int, limit: int = 1 << 18) -> list[int]:
        """Return the indexes of touched pages among `pages` pages from `hva` (sampled: at most `limit`)."""
        stride = max(1, pages // limit)
        out: list[int] = []
        for first in range(0, pages, 1 << 16):
            n = min(1 << 16, pages - first)
            raw = os.pread(self.pagemap, n * 8, (hva // PAGE + first) * 8)
            ents = np.frombuffer(raw, dtype="<u8", count=len(raw) // 8)[::stride]
            out += (np.flatnonzero(ents & np.uint64(_PRESENT_OR_SWAPPED)) * stride + first).tolist()
        return out

    def read(self, hva: int, n: int) -> bytes:
        return os.pread(self.mem, n, hva)

    def close(self) -> None:
        os.close(self.mem)
        os.close(self.pagemap)


def _memdev_names(monitor: Hmp) -> set[str]:
    try:
        devs = monitor.command("query-memdev") or []
    except ConnectorError:
        return set()
    return {str(d.get("id")) for d in devs if isinstance(d, dict) and d.get("id")}  # type: ignore[union-attr]


def _candidates(block: RamBlock, maps: list[HostMapping]) -> list[HostMapping]:
    """Return the writable mappings that could hold `block`: its exact size first, then larger (merged) ones."""
    sizes = {block.total, block.used, -(-block.total // block.page_size) * block.page_size}
    exact = [m for m in maps if m.size in sizes and m.perms.startswith("rw")]
    if exact:
        return exact
    out = []
    for m in maps:  # the kernel may merge the block's VMA with a neighbour: try both ends
        if m.perms.startswith("rw") and m.size > block.total:
            out.append(HostMapping(m.start, m.start + block.total, m.perms, m.offset, m.inode, m.path, m.dev))
            out.append(HostMapping(m.end - block.total, m.end, m.perms, m.offset, m.inode, m.path, m.dev))
    return out


def _prove(monitor: Hmp, proc: _ProcessBytes, ranges: list[GuestRamRange], base: int, samples: int = SAMPLES_PER_REGION,
           strict: bool = False, start: int = 0) -> tuple[bool, list[str], str]:
    """Compare xp reads with the process at `base` + block offset; return (proven, proof lines, why not).

    `samples` equal reads are wanted per region; `strict` fails on any unequal read; `start` rotates the picks."""
    proof: list[str] = []
    compared = 0
    for r in ranges:
        pages = (r.gpa_end - r.gpa_start) // PAGE
        hva = base + r.block_offset
        touched = proc.touched_pages(hva, pages)
        if not touched:
            # nothing touched: the whole range reads as zeros; the monitor must agree at a sample
            gpa = r.gpa_start + (pages // 2) * PAGE
            if parse_xp(monitor.hmp(f"xp /2gx {gpa:#x}")) != bytes(16):
                return False, proof, f"gpa {gpa:#x} is non-zero to the monitor but untouched at host {hva:#x}"
            proof.append(f"gpa {gpa:#x}: untouched, zero to the monitor")
            continue
        # strict (a re-proof): more candidate pages, since touched pages that read as zero prove nothing
        tries = 2 * samples * (4 if strict else 1)
        picks = [touched[(start + i * (len(touched) - 1) // max(1, tries - 1)) % len(touched)] for i in range(tries)]
        matched = mismatched = 0
        for page in dict.fromkeys(picks):
            page_hva = hva + page * PAGE
            try:
                data = proc.read(page_hva, PAGE)
            except OSError as exc:
                return False, proof, f"cannot read host {page_hva:#x}: {exc.strerror}"
            nz = next((o for o in range(0, PAGE, 16) if any(data[o: o + 16])), None)
            if nz is None:
                continue
            gpa = r.gpa_start + page * PAGE + nz
            for _attempt in range(3):  # the guest runs: a page may change between the two reads
                mine = proc.read(page_hva + nz, 16)
                theirs = parse_xp(monitor.hmp(f"xp /2gx {gpa:#x}"))
                if theirs in (mine, proc.read(page_hva + nz, 16)):
                    matched += 1
                    proof.append(f"gpa {gpa:#x}: 16 bytes equal at host {page_hva + nz:#x}")
                    break
            else:
                mismatched += 1
                if strict:
                    return False, proof, f"gpa {gpa:#x}: the monitor's bytes differ from host {page_hva + nz:#x}"
            if matched >= samples:
                break
        if matched == 0 or mismatched > matched:
            return False, proof, (f"{r.block} at host {hva:#x}: {matched} of {matched + mismatched} monitor reads "
                                  f"in gpa {r.gpa_start:#x}-{r.gpa_end - 1:#x} equal the process's bytes")
        compared += matched
    if not compared:  # zeros agree with anything untouched: no evidence that this is the block
        return False, proof, "no touched non-zero page to compare with the monitor"
    return True, proof, ""


def find_process_ram(monitor: Hmp, pid: int, flat: list[FlatRange] | None = None) -> ProcessRam:
    """Return the proven guest RAM layout of QEMU process `pid` (asks `monitor`; does not pause the VM).

    `flat` is the flat view when the caller already asked for it. The proven layout is remembered for
    `recall_process_ram`. Raises ConnectorError saying why when the layout cannot be found or proven."""
    if flat is None:
        flat = parse_mtree(monitor.hmp("info mtree -f"))
    blocks = parse_ramblocks(monitor.hmp("info ramblock"))
    names = _memdev_names(monitor) & set(blocks)
    if not names:  # no memory backend reported: the largest RAM block is the guest's RAM
        if not blocks:
            raise ConnectorError(f"QEMU process {pid}: the monitor lists no RAM blocks (info ramblock)")
        names = {max(blocks.values(), key=lambda b: b.used).name}
    ranges = ram_ranges(flat, names)
    if not ranges:
        raise ConnectorError(f"QEMU process {pid}: no guest-physical range of {', '.join(sorted(names))} in "
                             "`info mtree -f`")
    try:
        maps = parse_maps(Path(f"/proc/{pid}/maps").read_text())
    except OSError as exc:
        raise ConnectorError(f"cannot read /proc/{pid}/maps: {exc.strerror}") from exc
    proc = _ProcessBytes(pid)
    try:
        placed: list[GuestRamRange] = []
        backing: dict[str, str] = {}
        mapped: dict[str, HostMapping] = {}
        proof: list[str] = []
        for name in sorted({r.block for r in ranges}):
            block = blocks[name]
            mine = [r for r in ranges if r.block == name]
            if max(r.block_offset + r.gpa_end - r.gpa_start for r in mine) > block.total:
                raise ConnectorError(f"QEMU process {pid}: `info mtree -f` maps past the end of RAM block {name}")
            cands = _candidates(block, maps)
            if not cands:
                raise ConnectorError(f"QEMU process {pid}: no mapping of {block.total:#x} bytes for RAM block "
                                     f"{name} in /proc/{pid}/maps")
            proven, why_not = [], []
            for cand in cands:
                ok, lines, why = _prove(monitor, proc, mine, cand.start)
                if ok:
                    proven.append((cand, lines))
                else:
                    why_not.append(f"host {cand.start:#x}: {why}")
            if len(proven) != 1:
                detail = "; ".join(why_not[:3]) if not proven else \
                    f"{len(proven)} mappings agree with the monitor ({', '.join(hex(c.start) for c, _ in proven)})"
                raise ConnectorError(f"QEMU process {pid}: the host mapping of RAM block {name} cannot be proven "
                                     f"({detail})")
            cand, lines = proven[0]
            backing[name] = cand.backing + (f" {cand.path}" if cand.path else "")
            mapped[name] = cand
            proof += lines
            placed += [GuestRamRange(r.gpa_start, r.gpa_end, r.block, r.block_offset, cand.start + r.block_offset)
                       for r in mine]
    finally:
        proc.close()
    layout = ProcessRam(pid, sorted(placed, key=lambda r: r.gpa_start), backing, proof, mapped)
    _remember(layout, flat)
    return layout


# --- proven layouts, remembered per QEMU process and re-proved on reuse ------------------------------------


@dataclass(frozen=True, slots=True)
class _Remembered:
    """A proven layout and what identifies the process and mappings it was proven for."""

    start_time: int  # /proc/PID/stat field 22: a reused pid has another
    ram_names: frozenset[str]  # every RAM region of the flat view then (a hot-plugged block changes it)
    layout: ProcessRam


_REMEMBERED: dict[int, _Remembered] = {}
_RECALL_SAMPLES = 1  # equal xp reads per region on reuse (every other fact is compared exactly)


def process_start_time(pid: int) -> int | None:
    """Return the start time of process `pid` in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def _ram_names(flat: list[FlatRange]) -> frozenset[str]:
    return frozenset(r.name for r in flat if r.kind in ("ram", "ramd"))


def _remember(layout: ProcessRam, flat: list[FlatRange]) -> None:
    start = process_start_time(layout.pid)
    if start is not None:
        _REMEMBERED[layout.pid] = _Remembered(start, _ram_names(flat), layout)


def forget_process_ram(pid: int | None = None) -> None:
    """Forget the remembered layout of QEMU process `pid` (every process when None)."""
    if pid is None:
        _REMEMBERED.clear()
    else:
        _REMEMBERED.pop(pid, None)


def _same_mapping(was: HostMapping, maps: list[HostMapping]) -> bool:
    """Return whether one mapping of `maps` still holds `was`: same file (inode, device, path) and permissions."""
    return any(m.start <= was.start and was.end <= m.end and m.inode == was.inode and m.dev == was.dev
               and m.path == was.path and m.perms == was.perms for m in maps)


def recall_process_ram(monitor: Hmp, pid: int, flat: list[FlatRange] | None = None) -> ProcessRam | None:
    """Return the layout proven earlier for QEMU process `pid` once re-proved, else None (then discover anew).

    Reused only when the process (pid and start time), each RAM mapping (address, inode, device, path,
    permissions) and the flat view (every RAM region, the same gpa ranges at the same block offsets) are
    unchanged and `xp` reads of touched non-zero pages in every region equal the process's bytes; any
    difference forgets it. Asks `monitor` (`info mtree -f` unless `flat` is given, and xp); does not pause."""
    was = _REMEMBERED.get(pid)
    if was is None:
        return None
    if not _still_valid(monitor, pid, was, flat):
        _REMEMBERED.pop(pid, None)
        return None
    old = was.layout
    return ProcessRam(pid, list(old.ranges), dict(old.backing), list(old.proof), dict(old.mappings))


def _still_valid(monitor: Hmp, pid: int, was: _Remembered, flat: list[FlatRange] | None) -> bool:
    if process_start_time(pid) != was.start_time:
        return False
    try:
        maps = parse_maps(Path(f"/proc/{pid}/maps").read_text())
    except OSError:
        return False
    layout = was.layout
    if not layout.mappings or not all(_same_mapping(m, maps) for m in layout.mappings.values()):
        return False
    try:
        flat = flat if flat is not None else parse_mtree(monitor.hmp("info mtree -f"))
    except ConnectorError:
        return False
    if _ram_names(flat) != was.ram_names:
        return False
    now = ram_ranges(flat, set(layout.backing))
    if [(r.gpa_start, r.gpa_end, r.block, r.block_offset) for r in now] != \
            [(r.gpa_start, r.gpa_end, r.block, r.block_offset) for r in layout.ranges]:
        return False
    try:
        proc = _ProcessBytes(pid)
    except ConnectorError:
        return False
    try:
        for name, mapping in layout.mappings.items():
            mine = [r for r in layout.ranges if r.block == name]
            ok, _lines, _why = _prove(monitor, proc, mine, mapping.start, samples=_RECALL_SAMPLES, strict=True,
                                      start=random.randrange(1 << 20))
            if not ok:
                return False
    except (ConnectorError, OSError):
        return False
    finally:
        proc.close()
    return True
