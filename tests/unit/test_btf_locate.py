"""Finding vmlinux BTF in guest RAM: prefer the largest valid blob, skip module BTF and decoys."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nephoscope.core.errors import DetectionError
from nephoscope.memory.physical import BufferMemory, RawMemory
from nephoscope.os.btf import locate
from nephoscope.os.btf.build import BtfBuilder
from nephoscope.os.btf.locate import find_vmlinux_btf, get_vmlinux_btf, iter_btf_headers
from nephoscope.os.btf.reader import Btf

HOST_BTF = Path("/sys/kernel/btf/vmlinux")
LAB_RAM = Path(os.environ.get("NEPHOSCOPE_TEST_RAM", "/tmp/nephoscope-dev/tampered.ram"))


def _vmlinux_like(extra_members: int = 0) -> bytes:
    b = BtfBuilder()
    integer = b.int("int", 4, signed=True)
    for name in ("task_struct", "mm_struct", "vm_area_struct", "module"):
        b.struct(name, 8 + 4 * extra_members, [("a", integer, 0, 0)] +
                 [(f"m{i}", integer, 32 * (i + 2), 0) for i in range(extra_members)])
    return b.blob()


def _module_like(base: Btf) -> bytes:
    b = BtfBuilder(start_id=base.count, str_base=len(base._strings))
    b.struct("e1000_adapter", 4, [("x", 1, 0, 0)])
    return b.blob()


def _ram(*placed: tuple[int, bytes], size: int = 1 << 20) -> bytearray:
    ram = bytearray(os.urandom(size))
    for gpa, blob in placed:
        ram[gpa:gpa + len(blob)] = blob
    return ram


class _ReadOnly:
    """Memory without zero-copy views: exercises the chunked read path."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.ranges = [(0, len(data))]

    def read(self, gpa: int, size: int) -> bytes:
        return self._data[gpa:gpa + size]


def test_prefers_largest_valid_blob_and_marks_module_btf() -> None:
    small, large = _vmlinux_like(), _vmlinux_like(extra_members=8)
    module = _module_like(Btf.parse(large))
    truncated = large[:24]  # a header whose sections run off the end of RAM
    ram = _ram((0x1000, module), (0x4000, small), (0x9004, large), ((1 << 20) - 24, truncated))
    located = get_vmlinux_btf(BufferMemory(ram))
    assert (located.gpa, located.size) == (0x9004, len(large))
    assert located.btf.get_struct("task_struct").size == 8 + 4 * 8
    verdicts = {c.gpa: c.verdict for c in located.candidates}
    assert verdicts[0x1000] == "split" and verdicts[0x9004] == "vmlinux"
    assert verdicts[(1 << 20) - 24] == "invalid"


def test_skips_blobs_without_kernel_structs_and_garbage() -> None:
    b = BtfBuilder()
    b.struct("not_a_kernel", 4, [])
    decoy = b.blob()
    broken = bytearray(_vmlinux_like(extra_members=20))
    broken[30:34] = b"\xff\xff\xff\xff"  # corrupt the first type record
    good = _vmlinux_like()
    ram = _ram((0x100, decoy), (0x2000, bytes(broken)), (0x8000, good))
    located = find_vmlinux_btf(BufferMemory(ram, base=0x100000))
    assert located is not None and located.gpa == 0x108000
    verdicts = {c.gpa: c.verdict for c in located.candidates}
    assert verdicts[0x102000] == "invalid"


def test_chunked_reads_find_the_same_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(locate, "READ_CHUNK", 1 << 20)  # the header below straddles a chunk edge
    good = _vmlinux_like()
    ram = bytes(_ram((0x3FFFF0, good), size=4 << 20))
    assert [c.gpa for c in iter_btf_headers(_ReadOnly(ram))] == [c.gpa for c in iter_btf_headers(BufferMemory(ram))]
    located = get_vmlinux_btf(_ReadOnly(ram))
    assert located.gpa == 0x3FFFF0


def test_no_btf_raises_detection_error() -> None:
    with pytest.raises(DetectionError, match="stage btf: no vmlinux BTF"):
        get_vmlinux_btf(BufferMemory(bytes(1 << 16)))


@pytest.mark.skipif(not HOST_BTF.exists(), reason="this host has no /sys/kernel/btf/vmlinux")
def test_host_btf_in_a_ram_image() -> None:
    blob = HOST_BTF.read_bytes()
    ram = _ram((0x123458, blob), (0x800000, blob[:4096]), size=16 << 20)
    located = get_vmlinux_btf(BufferMemory(ram))
    assert located.gpa == 0x123458 and located.size == len(blob)


@pytest.mark.skipif(not LAB_RAM.exists(), reason=f"no lab RAM snapshot at {LAB_RAM} (set NEPHOSCOPE_TEST_RAM)")
def test_lab_ram_snapshot_scan_finds_vmlinux_btf() -> None:
    with RawMemory(LAB_RAM) as memory:
        start = time.perf_counter()
        located = get_vmlinux_btf(memory)
        elapsed = time.perf_counter() - start
        assert located.btf.get_struct("task_struct").member("comm").offset > 0
        assert any(c.verdict == "split" for c in located.candidates)
    assert elapsed < 60, f"the BTF scan must end in bounded time; took {elapsed:.2f}s"
