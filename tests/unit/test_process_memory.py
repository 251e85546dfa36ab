"""Guest RAM from a process, without a VM: the monitor parsers on real QEMU 7.2 text, the pagemap logic on
this test's own memory (a page never touched must stay untouched), the proof against a fake monitor, and
holes of a sparse RAM file that reads must not allocate."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from nephoscope.core.errors import ConnectorError, MemoryAccessError
from nephoscope.hypervisor import qemu
from nephoscope.memory.physical import RawMemory, data_extents
from nephoscope.memory.process import PAGE, ProcessMemory, RamRegion, page_runs, present_pages

DATA = Path(__file__).parent / "data"


# --- parsers on text captured from QEMU 7.2 (a 4608 MiB pc guest with plain -m) ---------------------------


def test_mtree_of_a_guest_larger_than_the_pci_hole_maps_high_ram_to_its_block_offset() -> None:
    flat = qemu.parse_mtree((DATA / "mtree_pc_4608M.txt").read_text())
    assert flat[0] == qemu.FlatRange(0, 0xC0000, "ram", "pc.ram", 0)
    assert any(r.kind == "i/o" and r.name == "e1000-mmio" for r in flat)
    assert not any(r.name == "pic" for r in flat), "only the flat view of AS memory, not the I/O space"
    ranges = qemu.ram_ranges(flat, {"pc.ram"})
    assert ranges == [qemu.GuestRamRange(0, 0xC0000000, "pc.ram", 0),
                      qemu.GuestRamRange(0x100000000, 0x160000000, "pc.ram", 0xC0000000)]
    assert sum(r.gpa_end - r.gpa_start for r in ranges) == 4608 << 20
    assert qemu.ram_ranges(flat, {"pc.bios"}) == [qemu.GuestRamRange(0xFFFC0000, 0x100000000, "pc.bios", 0)]


def test_ramblock_table() -> None:
    blocks = qemu.parse_ramblocks((DATA / "ramblock_pc_4608M.txt").read_text())
    assert blocks["pc.ram"] == qemu.RamBlock("pc.ram", 4096, 0x120000000, 0x120000000)
    assert blocks["/rom@etc/acpi/tables"].used == 0x20000 and blocks["/rom@etc/acpi/tables"].total == 0x200000
    assert len(blocks) == 7


def test_xp_and_maps_parsers() -> None:
    assert qemu.parse_xp("0000000000100000: 0x0000000000000001 0xffffffff81000000\n") == \
        struct.pack("<QQ", 1, 0xFFFFFFFF81000000)
    assert qemu.parse_xp("Cannot access memory\n") == b""
    maps = qemu.parse_maps("7fef9fe00000-7ff0bfe00000 rw-p 00000000 00:00 0 \n"
                           "7f00-7f10 rw-s 00000000 00:01 5 /memfd:ram0 (deleted)\nbogus line\n")
    assert maps[0].size == 0x120000000 and maps[0].backing == "anonymous"
    assert maps[1].backing == "memfd" and maps[1].path == "/memfd:ram0 (deleted)"
    assert len(maps) == 2


def test_candidates_prefer_the_exact_size_and_try_both_ends_of_a_merged_mapping() -> None:
    block = qemu.RamBlock("pc.ram", 4096, 0x10000, 0x10000)
    exact = qemu.HostMapping(0x20000, 0x30000, "rw-p", 0, 0, "")
    merged = qemu.HostMapping(0x100000, 0x118000, "rw-p", 0, 0, "")
    ro = qemu.HostMapping(0x40000, 0x50000, "r--p", 0, 0, "")
    assert qemu._candidates(block, [exact, merged, ro]) == [exact]
    ends = qemu._candidates(block, [merged, ro])
    assert [(c.start, c.end) for c in ends] == [(0x100000, 0x110000), (0x108000, 0x118000)]


# --- pagemap logic on this process's own memory ------------------------------------------------------------


def test_page_runs_and_present_bits() -> None:
    ents = np.array([1 << 63, 0, 1 << 62, 1 << 63, 0, 0, 1 << 63], dtype=np.uint64)
    present = present_pages(ents)
    assert present.tolist() == [True, False, True, True, False, False, True]
    assert page_runs(present) == [(0, 1), (2, 4), (6, 7)]
    assert page_runs(np.zeros(3, bool)) == [] and page_runs(np.ones(2, bool)) == [(0, 2)]


@pytest.fixture
def anon() -> tuple[mmap.mmap, int]:
    """A private anonymous mapping of 67 pages (odd size: unique in /proc/self/maps), pages 3, 4 and 40 touched.

    Guard pages (PROT_NONE) on both sides keep the kernel from merging it with a neighbour mapping."""
    outer = mmap.mmap(-1, 69 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = ctypes.addressof(ctypes.c_char.from_buffer(outer))
    mprotect = ctypes.CDLL(None, use_errno=True).mprotect
    mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert mprotect(start, PAGE, 0) == 0 and mprotect(start + 68 * PAGE, PAGE, 0) == 0
    mm = memoryview(outer)[PAGE: 68 * PAGE]
    for page, byte in ((3, 0x11), (4, 0x22), (40, 0x33)):
        mm[page * PAGE: (page + 1) * PAGE] = bytes([byte]) * PAGE
    mm[40 * PAGE: 40 * PAGE + 8] = b"NEPHOSC!"
    yield mm, start + PAGE
    mm.release()
    outer.close()


def _touched(address: int, pages: int) -> list[bool]:
    with open("/proc/self/pagemap", "rb") as fh:
        fh.seek(address // PAGE * 8)
        return present_pages(np.frombuffer(fh.read(pages * 8), dtype="<u8")).tolist()


@pytest.mark.parametrize("method", ["readv", "mem"])
def test_process_reads_touched_pages_and_never_touches_the_others(anon, method: str) -> None:
    _mm, address = anon
    base = 0x100000  # gpa of the mapping's first byte
    with ProcessMemory(os.getpid(), [RamRegion(base, base + 67 * PAGE, address, "t", 0)], method=method) as phys:
        assert phys.ranges == [(base, base + 67 * PAGE)]
        assert phys.read(base + 3 * PAGE, 4) == b"\x11" * 4
        assert phys.read(base + 40 * PAGE, 8) == b"NEPHOSC!"
        whole = phys.read(base, 67 * PAGE)
        expected = bytearray(67 * PAGE)  # built here: reading `mm` itself would fault its pages in
        expected[3 * PAGE: 4 * PAGE], expected[4 * PAGE: 5 * PAGE] = b"\x11" * PAGE, b"\x22" * PAGE
        expected[40 * PAGE: 41 * PAGE] = b"NEPHOSC!" + b"\x33" * (PAGE - 8)
        assert whole == bytes(expected), "untouched pages read as the zeros they are"
        assert phys.read(base + 5 * PAGE - 2, 4) == b"\x22\x22\0\0"
        segs = [(gpa, len(v)) for gpa, v in phys.iter_segments(gap=0)]
        assert segs == [(base + 3 * PAGE, 2 * PAGE), (base + 40 * PAGE, PAGE)]
        [(gpa, view)] = list(phys.iter_segments())  # runs 35 pages apart share one view, zeros between
        assert gpa == base + 3 * PAGE and bytes(view) == bytes(expected[3 * PAGE: 41 * PAGE])
        assert [len(v) for _, v in phys.iter_segments(limit=PAGE, gap=0)] == [PAGE] * 3  # a long run is cut
        assert phys.touched_bytes() == 3 * PAGE
        assert phys.stats["pages_skipped"] >= 64
        with pytest.raises(MemoryAccessError):
            phys.read(base - 1, 2)
        with pytest.raises(MemoryAccessError):
            phys.read(base + 67 * PAGE, 1)
    touched = _touched(address, 67)
    assert [i for i, t in enumerate(touched) if t] == [3, 4, 40], "reading must not fault a page in"


def test_cached_small_reads_expire_and_flush(anon) -> None:
    mm, address = anon
    with ProcessMemory(os.getpid(), [RamRegion(0, 67 * PAGE, address)], cache_seconds=60) as phys:
        assert phys.read(40 * PAGE, 8) == b"NEPHOSC!"
        mm[40 * PAGE: 40 * PAGE + 8] = b"CHANGED!"
        assert phys.read(40 * PAGE, 8) == b"NEPHOSC!"  # served from the 64 KiB block cache
        phys.flush()
        assert phys.read(40 * PAGE, 8) == b"CHANGED!"
    with ProcessMemory(os.getpid(), [RamRegion(0, 67 * PAGE, address)], cache=False) as phys:
        mm[40 * PAGE: 40 * PAGE + 1] = b"X"
        assert phys.read(40 * PAGE, 1) == b"X"


def test_two_regions_split_like_ram_above_the_pci_hole(anon) -> None:
    _mm, address = anon
    regions = [RamRegion(0, 32 * PAGE, address, "pc.ram", 0),
               RamRegion(1 << 32, (1 << 32) + 35 * PAGE, address + 32 * PAGE, "pc.ram", 32 * PAGE)]
    with ProcessMemory(os.getpid(), regions) as phys:
        assert phys.read((1 << 32) + 8 * PAGE, 8) == b"NEPHOSC!"  # page 40 of the block
        assert not phys.contains(32 * PAGE) and phys.contains(1 << 32, 35 * PAGE)
        with pytest.raises(MemoryAccessError):
            phys.read(32 * PAGE, 1)  # the PCI hole is not RAM


# --- the proof against a monitor -----------------------------------------------------------------------------


class FakeMonitor:
    """Answers like QEMU 7.2 for RAM block `t.ram` of `size` bytes at gpa 0 whose bytes are `ram`."""

    def __init__(self, ram: bytes | mmap.mmap, size: int, lie: bool = False) -> None:
        self.ram, self.size, self.lie = ram, size, lie
        self.lines: list[str] = []

    def hmp(self, line: str) -> str:
        self.lines.append(line)
        if line == "info mtree -f":
            return (f'FlatView #0\n AS "memory", root: system\n Root memory region: system\n'
                    f"  0000000000000000-{self.size - 1:016x} (prio 0, ram): t.ram\n")
        if line == "info ramblock":
            return (f"              Block Name    PSize              Offset               Used              Total\n"
                    f"                   t.ram    4 KiB  0x0000000000000000 0x{self.size:016x} 0x{self.size:016x}\n")
        if line.startswith("xp /2gx "):
            gpa = int(line.split()[-1], 16)
            a, b = struct.unpack_from("<QQ", self.ram, gpa)
            if self.lie:
                a ^= 1
            return f"{gpa:016x}: 0x{a:016x} 0x{b:016x}\n"
        raise AssertionError(line)

    def command(self, name: str, **args: object) -> object:
        assert name == "query-memdev"
        return [{"id": "t.ram", "size": self.size}]


def test_the_mapping_is_proven_by_monitor_reads(anon) -> None:
    mm, address = anon
    layout = qemu.find_process_ram(FakeMonitor(mm, 67 * PAGE), os.getpid())
    assert [(r.gpa_start, r.gpa_end, r.hva) for r in layout.ranges] == [(0, 67 * PAGE, address)]
    assert layout.backing == {"t.ram": "anonymous"} and layout.proof
    assert _touched(address, 67).count(True) == 3, "the proof reads only touched pages"


def test_a_mapping_the_monitor_contradicts_is_not_used(anon) -> None:
    mm, _address = anon
    with pytest.raises(ConnectorError, match="cannot be proven"):
        qemu.find_process_ram(FakeMonitor(mm, 67 * PAGE, lie=True), os.getpid())


def test_no_mapping_of_the_block_size_is_an_error_that_says_so(anon) -> None:
    mm, _ = anon
    with pytest.raises(ConnectorError, match="no mapping"):
        qemu.find_process_ram(FakeMonitor(mm, 1 << 46), os.getpid())


# --- holes of a sparse RAM file -------------------------------------------------------------------------------


def test_raw_file_holes_read_as_zeros_without_being_allocated(tmp_path: Path) -> None:
    shm = Path("/dev/shm") / f"nephoscope-test-holes-{os.getpid()}.ram"
    try:
        with shm.open("wb") as fh:
            fh.truncate(256 * PAGE)
            fh.seek(16 * PAGE)
            fh.write(b"A" * PAGE * 2)
            fh.seek(200 * PAGE)
            fh.write(b"B" * PAGE)
        blocks = shm.stat().st_blocks
        fd = os.open(shm, os.O_RDONLY)
        try:
            assert data_extents(fd, 256 * PAGE) == [(16 * PAGE, 18 * PAGE), (200 * PAGE, 201 * PAGE)]
        finally:
            os.close(fd)
        with RawMemory(shm) as phys:
            assert phys.holes and phys.data_bytes() == 3 * PAGE and phys.ranges == [(0, 256 * PAGE)]
            assert phys.read(16 * PAGE, 4) == b"AAAA"
            assert phys.read(18 * PAGE - 2, 4) == b"AA\0\0"
            assert phys.read(100 * PAGE, PAGE) == bytes(PAGE)
            assert phys.read(0, 256 * PAGE).count(b"B") == PAGE
            assert [(g, len(v)) for g, v in phys.iter_segments()] == [(16 * PAGE, 2 * PAGE), (200 * PAGE, PAGE)]
            assert [g for g, _ in phys.iter_range_views()] == [16 * PAGE, 200 * PAGE]
            assert phys.flat_view() is None
            assert bytes(phys.view(100 * PAGE, 8)) == bytes(8)
            with shm.open("r+b") as fh:  # the guest touches a page after the file was opened
                fh.seek(100 * PAGE)
                fh.write(b"C" * 8)
            blocks += 8 * (PAGE // 4096)
            assert phys.read(100 * PAGE, 8) == b"C" * 8
            with pytest.raises(MemoryAccessError):
                phys.read(256 * PAGE - 1, 2)
        assert shm.stat().st_blocks == blocks, "reading holes must not allocate them"
    finally:
        shm.unlink(missing_ok=True)


def test_a_file_without_holes_keeps_the_flat_view(tmp_path: Path) -> None:
    path = tmp_path / "full.raw"
    path.write_bytes(b"\x01" * 8 * PAGE)
    with RawMemory(path) as phys:
        assert not phys.holes and phys.flat_view() is not None and len(list(phys.iter_segments())) == 1


def test_the_qemu_pid_is_asked_of_its_qmp_socket(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        assert qemu.find_qemu_pid(path) == os.getpid()
    assert qemu.find_qemu_pid(tmp_path / "missing.sock") is None


def test_free_huge_blocks_counts_orders_from_9_up() -> None:
    from nephoscope.memory.process import free_huge_blocks

    info = ("Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3 \n"
            "Node 0, zone   Normal   3271   4699    660   2332   6454   3040    803   1761   1000    351   1112 \n")
    assert free_huge_blocks(info) == 1 + 3 * 2 + 351 + 1112 * 2
    assert free_huge_blocks("") == 0


# --- a proven layout remembered per QEMU process, re-proved on reuse ------------------------------------------


@pytest.fixture
def proven(anon):
    """The anon block's layout proven once (then remembered for this process); forgotten afterwards."""
    mm, address = anon
    qemu.forget_process_ram()
    layout = qemu.find_process_ram(FakeMonitor(mm, 67 * PAGE), os.getpid())
    yield mm, address, layout
    qemu.forget_process_ram()


def test_a_remembered_layout_is_reused_after_one_xp_per_region(proven) -> None:
    mm, address, layout = proven
    monitor = FakeMonitor(mm, 67 * PAGE)
    again = qemu.recall_process_ram(monitor, os.getpid())
    assert again is not None and again.ranges == layout.ranges and again.mappings == layout.mappings
    xps = [line for line in monitor.lines if line.startswith("xp ")]
    assert monitor.lines[0] == "info mtree -f" and 1 <= len(xps) <= 2, monitor.lines
    assert "info ramblock" not in monitor.lines
    assert _touched(address, 67).count(True) == 3, "the re-proof reads only touched pages"


def test_a_changed_start_time_forgets_the_layout(proven, monkeypatch: pytest.MonkeyPatch) -> None:
    mm, _address, _layout = proven
    start = qemu.process_start_time(os.getpid())
    assert start is not None and start > 0
    monkeypatch.setattr(qemu, "process_start_time", lambda pid: start + 1)  # another process with this pid
    monitor = FakeMonitor(mm, 67 * PAGE)
    assert qemu.recall_process_ram(monitor, os.getpid()) is None
    assert not any(line.startswith("xp ") for line in monitor.lines)
    monkeypatch.setattr(qemu, "process_start_time", lambda pid: start)
    assert qemu.recall_process_ram(monitor, os.getpid()) is None, "a stale layout is forgotten, not kept"


@pytest.mark.parametrize("change", ["dev", "inode", "perms", "moved"])
def test_a_changed_mapping_forgets_the_layout(proven, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    from dataclasses import replace

    mm, address, _layout = proven
    parse = qemu.parse_maps

    def altered(text: str) -> list[qemu.HostMapping]:
        out = []
        for m in parse(text):
            if m.start <= address < m.end:
                m = {"dev": replace(m, dev="ff:01"), "inode": replace(m, inode=m.inode + 7),
                     "perms": replace(m, perms="r--p"),
                     "moved": replace(m, start=m.start + PAGE, end=m.end + PAGE)}[change]
            out.append(m)
        return out

    monkeypatch.setattr(qemu, "parse_maps", altered)
    assert qemu.recall_process_ram(FakeMonitor(mm, 67 * PAGE), os.getpid()) is None


def test_an_xp_mismatch_forgets_the_layout_and_discovery_starts_over(proven) -> None:
    mm, address, _layout = proven
    assert qemu.recall_process_ram(FakeMonitor(mm, 67 * PAGE, lie=True), os.getpid()) is None
    honest = FakeMonitor(mm, 67 * PAGE)
    assert qemu.recall_process_ram(honest, os.getpid()) is None, "forgotten after the mismatch"
    assert not any(line.startswith("xp ") for line in honest.lines)
    layout = qemu.find_process_ram(honest, os.getpid())  # full discovery, remembered again
    assert "info ramblock" in honest.lines and layout.ranges[0].hva == address
    assert qemu.recall_process_ram(FakeMonitor(mm, 67 * PAGE), os.getpid()) is not None


class _GrownMonitor(FakeMonitor):
    """The same block, but the flat view shows another RAM region (a hot-plugged DIMM)."""

    def hmp(self, line: str) -> str:
        text = super().hmp(line)
        if line == "info mtree -f":
            text += "  0000000100000000-00000001000fffff (prio 0, ram): dimm0\n"
        return text


def test_a_changed_flat_view_forgets_the_layout(proven) -> None:
    mm, _address, _layout = proven
    monitor = _GrownMonitor(mm, 67 * PAGE)
    assert qemu.recall_process_ram(monitor, os.getpid()) is None
    assert not any(line.startswith("xp ") for line in monitor.lines)


def test_an_unknown_process_has_no_remembered_layout(anon) -> None:
    mm, _ = anon
    qemu.forget_process_ram()
    monitor = FakeMonitor(mm, 67 * PAGE)
    assert qemu.recall_process_ram(monitor, os.getpid()) is None and monitor.lines == []


def test_the_start_time_is_field_22_of_proc_stat() -> None:
    fields = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    assert qemu.process_start_time(os.getpid()) == int(fields[19])
    assert qemu.process_start_time(2**22 + 12345) is None
