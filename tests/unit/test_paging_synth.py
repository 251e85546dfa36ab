"""A builder of synthetic x86-64 page tables in a bytearray (shared by the paging and arch unit tests)."""

from __future__ import annotations

import struct

from nephoscope.memory.paging import NX, PAGING, PS, RW, US, P
from nephoscope.memory.physical import BufferMemory

TABLE_FLAGS = P | RW | US


class Synth:
    """Guest RAM of `size` bytes; tables come from the upper half, the lower half is free for data pages."""

    def __init__(self, size: int = 16 << 20, levels: int = 4) -> None:
        self.mem = bytearray(size)
        self.levels = levels
        self.next_free = size // 2
        self.top = size

    def alloc(self, count: int = 1, align: int = 4096) -> int:
        """Return the gpa of `count` fresh zeroed pages aligned to `align`."""
        gpa = (self.next_free + align - 1) & ~(align - 1)
        self.next_free = gpa + count * 4096
        assert self.next_free <= self.top, "synthetic RAM exhausted"
        return gpa

    def entry(self, table: int, idx: int) -> int:
        return struct.unpack_from("<Q", self.mem, table + idx * 8)[0]

    def set_entry(self, table: int, idx: int, value: int) -> None:
        struct.pack_into("<Q", self.mem, table + idx * 8, value)

    def map(self, cr3: int, gva: int, gpa: int, size: int = 4096, *, writable: bool = True, user: bool = True,
            nx: bool = False, table_flags: int = TABLE_FLAGS) -> None:
        """Map gva → gpa with a leaf of `size` (4 KiB, 2 MiB or 1 GiB); create missing tables with table_flags."""
        table = cr3
        for lvl in PAGING[self.levels]:
            idx = (gva >> lvl.shift) & 511
            if lvl.page_size == size:
                leaf = gpa | P | (RW if writable else 0) | (US if user else 0) | (NX if nx else 0)
                self.set_entry(table, idx, leaf | (PS if size > 4096 else 0))
                return
            entry = self.entry(table, idx)
            if not entry & P:
                entry = self.alloc() | table_flags
                self.set_entry(table, idx, entry)
            table = entry & 0x000FFFFFFFFFF000
        raise AssertionError(f"no level maps {size}-byte pages")

    def write(self, gpa: int, data: bytes) -> None:
        self.mem[gpa: gpa + len(data)] = data

    def phys(self) -> BufferMemory:
        return BufferMemory(self.mem)


def test_synth_maps_one_page() -> None:
    s = Synth(1 << 20)
    cr3 = s.alloc()
    s.map(cr3, 0x400000, 0x8000)
    assert s.entry(cr3, 0) & P
