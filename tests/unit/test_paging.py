"""Paging over synthetic tables: 4/5 levels, large pages, permissions, cross-page reads, hostile tables."""

from __future__ import annotations

import contextlib
import os
import time

import pytest
from test_paging_synth import Synth

from nephoscope.core.errors import MemoryAccessError, TranslationError
from nephoscope.memory.paging import NX, PS, RW, US, AddressSpace, Limits, Mapping, P, iter_runs
from nephoscope.memory.physical import BufferMemory

KERNEL = 0xFFFF_FFFF_8100_0000


@pytest.mark.parametrize("levels", [4, 5])
def test_translate_4k_2m_1g(levels: int) -> None:
    s = Synth(8 << 20, levels)
    cr3 = s.alloc()
    s.map(cr3, 0x7F00_0000_1000, 0x5000)
    s.map(cr3, 0x40_0000, 0x20_0000, 2 << 20)
    s.map(cr3, 0x4000_0000, 0, 1 << 30)
    asp = AddressSpace(s.phys(), cr3 | 0x123, levels)  # PCID bits ignored
    assert asp.translate(0x7F00_0000_1ABC) == 0x5ABC
    assert asp.translate(0x40_0000 + 0x12345) == 0x20_0000 + 0x12345
    assert asp.translate(0x4000_0000 + 0x3456789) == 0x3456789
    with pytest.raises(TranslationError):
        asp.translate(0x7F00_0000_2000)


def test_kernel_half_and_canonical() -> None:
    s = Synth(4 << 20)
    cr3 = s.alloc()
    s.map(cr3, KERNEL, 0x3000, user=False)
    asp = AddressSpace(s.phys(), cr3)
    assert asp.translate(KERNEL + 8) == 0x3008
    with pytest.raises(TranslationError, match="not canonical"):
        asp.translate(0x0000_8000_0000_0000)
    with pytest.raises(TranslationError, match="not canonical"):
        asp.translate(KERNEL & 0x0001_FFFF_FFFF_FFFF)
    assert [m.gva for m in asp.iter_mappings()] == [KERNEL]


def test_five_level_canonical_is_57_bits() -> None:
    s = Synth(4 << 20, 5)
    cr3 = s.alloc()
    gva = 0x00FF_0000_0000_0000  # valid only with 57-bit addresses
    s.map(cr3, gva, 0x3000)
    asp = AddressSpace(s.phys(), cr3, 5)
    assert asp.translate(gva + 1) == 0x3001
    assert [m.gva for m in asp.iter_mappings()] == [gva]


def test_permissions_and_of_user_write_or_of_nx() -> None:
    s = Synth(4 << 20)
    cr3 = s.alloc()
    s.map(cr3, 0x1000, 0x3000, writable=True, user=True, nx=False)
    s.map(cr3, 0x8000_0000, 0x4000, table_flags=P | US)  # read-only PDPT entry above a writable leaf
    s.map(cr3, 0x1_0000_0000, 0x5000, table_flags=P | RW)  # supervisor table above a user leaf
    s.map(cr3, 0x2_0000_0000, 0x6000, table_flags=P | RW | US | NX)  # NX above an executable leaf
    got = {m.gva: m for m in AddressSpace(s.phys(), cr3).iter_mappings()}
    assert got[0x1000] == Mapping(0x1000, 0x3000, 4096, True, True, False)
    assert not got[0x8000_0000].writable and got[0x8000_0000].user
    assert not got[0x1_0000_0000].user and got[0x1_0000_0000].writable
    assert got[0x2_0000_0000].nx and not got[0x2_0000_0000].executable
    asp = AddressSpace(s.phys(), cr3)
    assert [m.gva for m in asp.iter_mappings(user_only=True, exec_only=True)] == [0x1000, 0x8000_0000]
    assert [m.gva for m in asp.iter_mappings(start=0x8000_0000, end=0x1_0000_0001)] == [0x8000_0000, 0x1_0000_0000]


def test_cross_page_read_and_first_gap() -> None:
    s = Synth(4 << 20)
    cr3 = s.alloc()
    s.map(cr3, 0x10000, 0x7000)
    s.map(cr3, 0x11000, 0x3000)  # virtually contiguous, physically not
    s.write(0x7FFC, b"ABCD")
    s.write(0x3000, b"EFGH")
    asp = AddressSpace(s.phys(), cr3)
    assert asp.read(0x10FFC, 8) == b"ABCDEFGH"
    assert asp.unpack(0x10FFC, "4s4s") == (b"ABCD", b"EFGH")
    assert asp.read_u64(0x10FFC) == int.from_bytes(b"ABCDEFGH", "little")
    with pytest.raises(TranslationError, match="0x12000"):
        asp.read(0x11FF0, 0x20)
    with pytest.raises(MemoryAccessError):
        asp.read(0x10000, -1)
    runs = list(iter_runs(asp.iter_mappings()))
    assert [(a, b) for a, b, _ in runs] == [(0x10000, 0x12000)]


def test_flush_sees_changed_tables() -> None:
    s = Synth(4 << 20)
    cr3 = s.alloc()
    s.map(cr3, 0x10000, 0x7000)
    asp = AddressSpace(s.phys(), cr3)
    assert asp.translate(0x10000) == 0x7000
    s.map(cr3, 0x10000, 0x9000)
    assert asp.translate(0x10000) == 0x7000  # cached
    asp.flush()
    assert asp.translate(0x10000) == 0x9000


def test_reserved_bits_and_ps_at_pml4() -> None:
    s = Synth(4 << 20)
    cr3 = s.alloc()
    s.map(cr3, 0x1000, 0x3000)
    s.set_entry(cr3, 1, 0x20_0000 | P | PS)  # PS is reserved in a PML4 entry
    s.map(cr3, 0x4000_0000, 0x20_0000 | 0x2000, 2 << 20)  # 2 MiB leaf with reserved low address bits
    asp = AddressSpace(s.phys(), cr3)
    with pytest.raises(TranslationError, match="reserved"):
        asp.translate(1 << 39)
    with pytest.raises(TranslationError, match="reserved"):
        asp.translate(0x4000_0000)
    assert [m.gva for m in asp.iter_mappings()] == [0x1000]
    assert asp.anomalies["reserved-bits"] == 2
    narrow = AddressSpace(s.phys(), cr3, phys_bits=24)  # RAM fits in 24 bits
    assert narrow.translate(0x1000) == 0x3000


def test_entries_outside_ram_are_skipped_and_counted() -> None:
    s = Synth(4 << 20)
    cr3 = s.alloc()
    s.map(cr3, 0x1000, 0x3000)
    s.set_entry(cr3, 2, (1 << 40) | P | RW | US)  # table outside RAM
    s.map(cr3, 0x2000, 0x7FFF_F000)  # leaf outside RAM
    asp = AddressSpace(s.phys(), cr3)
    assert [m.gva for m in asp.iter_mappings()] == [0x1000]
    assert asp.anomalies == {"table-outside-ram": 1, "page-outside-ram": 1}
    with pytest.raises(TranslationError, match="outside RAM"):
        asp.translate(2 << 39)
    with pytest.raises(MemoryAccessError):
        asp.read(0x2000, 1)  # translates, but the page is not in RAM


def test_cyclic_tables_terminate() -> None:
    s = Synth(1 << 20)
    cr3 = s.alloc()
    other = s.alloc()
    for i in range(512):
        s.set_entry(cr3, i, cr3 | P | RW | US)  # every entry points back at the root
        s.set_entry(other, i, cr3 | P | RW | US)
    s.set_entry(cr3, 7, other | P | RW | US)  # and a two-table cycle
    asp = AddressSpace(s.phys(), cr3)
    t = time.monotonic()
    assert list(asp.iter_mappings()) == []
    assert time.monotonic() - t < 5
    assert asp.anomalies["table-cycle"] > 0
    # as on hardware, a walk through a self-referencing root ends on the root as a data page: depth is fixed
    assert asp.translate(0x1234) == cr3 | 0x234


def test_shared_tables_hit_the_work_cap() -> None:
    s = Synth(1 << 20)
    cr3, pdpt, pd, pt = s.alloc(), s.alloc(), s.alloc(), s.alloc()
    for i in range(512):  # a DAG: 512^3 paths to one PT full of leaves; no cycle, a huge fan-out
        s.set_entry(cr3, i, pdpt | P | RW | US)
        s.set_entry(pdpt, i, pd | P | RW | US)
        s.set_entry(pd, i, pt | P | RW | US)
        s.set_entry(pt, i, 0x1000 | P | RW | US)
    asp = AddressSpace(s.phys(), cr3, limits=Limits(max_tables=1000, max_leaves=100_000))
    t = time.monotonic()
    n = sum(1 for _ in asp.iter_mappings())
    assert n <= 100_000
    assert asp.anomalies["work-cap"] >= 1
    assert time.monotonic() - t < 10


def test_garbage_memory_is_bounded() -> None:
    mem = bytearray(os.urandom(2 << 20))
    phys = BufferMemory(mem)
    t = time.monotonic()
    for cr3 in range(0, 2 << 20, 0x40000):
        asp = AddressSpace(phys, cr3)
        for _ in asp.iter_mappings():
            pass
        for gva in (0, 0x400000, KERNEL):
            with contextlib.suppress(TranslationError):
                asp.translate(gva)
    assert time.monotonic() - t < 10


def test_bad_levels() -> None:
    with pytest.raises(ValueError):
        AddressSpace(BufferMemory(bytearray(4096)), 0, 3)


def test_phys_bits_makes_high_address_bits_reserved() -> None:
    s = Synth(4 << 20)
    cr3 = s.alloc()
    s.map(cr3, 0x1000, 0x3000 | (1 << 30))
    with pytest.raises(TranslationError, match="reserved"):
        AddressSpace(s.phys(), cr3, phys_bits=24).translate(0x1000)


def test_segmented_memory_takes_the_generic_path() -> None:
    from nephoscope.memory.physical import SegmentedMemory

    s = Synth(4 << 20)
    cr3 = s.alloc()
    s.map(cr3, 0x10000, 0x7000)
    s.map(cr3, 0x4000_0000, 0x20_0000, 2 << 20)
    half = 2 << 20
    phys = SegmentedMemory(s.mem, [(0, half, 0), (half, 4 << 20, half)])
    asp = AddressSpace(phys, cr3)
    assert asp._flat is None
    assert asp.translate(0x10010) == 0x7010
    assert [m.gva for m in asp.iter_mappings()] == [0x10000, 0x4000_0000]
    assert asp.translate(0x4000_0123) == 0x20_0123
