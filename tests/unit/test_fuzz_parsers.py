"""Hostile input through every parser: Hypothesis mutates real-shaped inputs; only NephoscopeError may come out.

Each parser gets a seed that exercises its real paths (a BTF blob with structs, unions, enums and arrays;
a real Debian ELF binary from the host; an ELF core and a LiME header; page tables in a small RAM) and
byte-level mutations of it: flipped bytes, overwritten header fields, truncation, absurd counts. The
assertions are the project's promise for hostile input: no exception but the project's own, and every
input handled in bounded time (generous: a hang, not slowness, is what this catches; speed is in
bench/robustness.py). Runs derandomized, so CI sees the same examples every time.
"""

from __future__ import annotations

import contextlib
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nephoscope.core.errors import NephoscopeError
from nephoscope.knowledge.elfpages import exec_pages
from nephoscope.memory.paging import AddressSpace, Budget
from nephoscope.memory.physical import BufferMemory, open_memory
from nephoscope.os.btf.build import BtfBuilder
from nephoscope.os.btf.layout import member_offsets
from nephoscope.os.btf.reader import Btf
from nephoscope.os.btf.types import Kind

BOUND_S = 10.0  # per input; a hang shows as minutes
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _bounded(fn: Callable[[], object]) -> None:
    """Run `fn`; allow only NephoscopeError, and fail if it took longer than BOUND_S."""
    t = time.monotonic()
    with contextlib.suppress(NephoscopeError):
        fn()
    elapsed = time.monotonic() - t
    assert elapsed < BOUND_S, f"one input took {elapsed:.1f}s"


@st.composite
def mutated(draw: st.DrawFn, seed: bytes, header: int = 64) -> bytes:
    """Return `seed` with a few byte flips, header-field overwrites with extreme values, and maybe truncation."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    for _ in range(draw(st.integers(0, 3))):  # a 2/4/8-byte field in the header set to an extreme value
        width = draw(st.sampled_from([2, 4, 8]))
        pos = draw(st.integers(0, max(0, min(header, len(data)) - width)))
        value = draw(st.sampled_from([0, 1, (1 << (8 * width)) - 1, 1 << (8 * width - 1), 0x7FFF, 4096]))
        data[pos:pos + width] = value.to_bytes(width, "little")
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


# --- BTF ----------------------------------------------------------------------------------------------

def _btf_seed() -> bytes:
    b = BtfBuilder()
    u32, u64, ch = b.int("unsigned int", 4), b.int("long unsigned int", 8), b.int("char", 1, signed=True)
    arr = b.array(ch, u32, 16)
    fwd = b.ref(Kind.FWD, 0, "list_head")
    ptr = b.ref(Kind.PTR, fwd)
    lst2 = b.struct("list_head", 16, [("next", ptr, 0, 0), ("prev", ptr, 64, 0)])
    b.struct("task_struct", 64, [("pid", u32, 0, 0), ("tasks", lst2, 64, 0), ("comm", arr, 192, 0),
                                 ("flags", u64, 320, 0)])
    b.struct("anon", 8, [("a", u32, 0, 0), ("b", u32, 0, 0)], union=True)
    b.enum("state", 4, [("RUNNING", 0), ("SLEEPING", 1)])
    b.enum64("big", [("X", 1 << 40)])
    return b.blob()


BTF_SEED = _btf_seed()


def _use_btf(blob: bytes) -> None:
    btf = Btf.parse(blob)
    for t in btf.iter_types():
        btf.sizeof(t.id)
    member_offsets(btf, {"task_struct": ["pid", "tasks.next", "comm"]}, kernel="fuzz")


def test_btf_seed_parses() -> None:
    layout = member_offsets(Btf.parse(BTF_SEED), {"task_struct": ["pid", "comm"]}, kernel="seed")
    assert layout["task_struct"]["comm"].offset == 24


@FUZZ
@given(mutated(BTF_SEED, header=24 + 64))
def test_btf_reader_survives_mutations(blob: bytes) -> None:
    _bounded(lambda: _use_btf(blob))


# --- ELF binaries (code-page DB ingest) -----------------------------------------------------------------

def _elf_seed() -> bytes:
    for candidate in ("/usr/bin/true", "/bin/true"):
        if Path(candidate).exists():
            return Path(candidate).read_bytes()
    pytest.skip("no /usr/bin/true on this host")
    return b""


@FUZZ
@given(data=st.data())
def test_elf_page_hashing_survives_mutations(data: st.DataObject) -> None:
    seed = _elf_seed()
    blob = data.draw(mutated(seed, header=64 + 56 * 13))
    _bounded(lambda: exec_pages(blob))


# --- memory images: ELF core and LiME headers ---------------------------------------------------------

def _core_seed(segments: int = 3) -> bytes:
    """Return a small QEMU-like ELF64 core: PT_NOTE then PT_LOADs of 4 KiB each, data after the headers."""
    phoff, phnum = 64, segments + 1
    data_off = phoff + 56 * phnum
    head = bytearray(b"\x7fELF\x02\x01\x01" + bytes(9))
    head += struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, phoff, 0, 0, 64, 56, phnum, 0, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", 4, 0, data_off, 0, 0, 0, 0, 0)
    for i in range(segments):
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, data_off + i * 4096, 0, i * 0x100000, 4096, 4096, 0)
    return bytes(head + phdrs) + bytes(range(256)) * 16 * segments


def _lime_seed() -> bytes:
    out = b""
    for start in (0, 0x100000):
        out += struct.pack("<IIQQQ", 0x4C694D45, 1, start, start + 4095, 0) + b"\xab" * 4096
    return out


def _open_and_read(blob: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"image{suffix}"
        path.write_bytes(blob)
        mem = open_memory(path)
        try:
            for start, end in mem.ranges[:64]:
                mem.read(start, min(64, end - start))
                mem.read(max(start, end - 8), min(8, end - start))
        finally:
            mem.close()


@FUZZ
@given(mutated(_core_seed(), header=64 + 56 * 4))
def test_elf_core_headers_survive_mutations(blob: bytes) -> None:
    _bounded(lambda: _open_and_read(blob, ".elf"))


@FUZZ
@given(mutated(_lime_seed(), header=32))
def test_lime_headers_survive_mutations(blob: bytes) -> None:
    _bounded(lambda: _open_and_read(blob, ".lime"))


# --- page tables ----------------------------------------------------------------------------------------

RAM_PAGES = 64


@st.composite
def page_tables(draw: st.DrawFn) -> bytes:
    """Return 256 KiB of RAM whose first pages hold page-table-like entries pointing around the RAM (and out)."""
    ram = bytearray(RAM_PAGES * 4096)
    for table in range(draw(st.integers(1, 8))):
        for _ in range(draw(st.integers(1, 24))):
            slot = draw(st.integers(0, 511))
            target = draw(st.one_of(st.integers(0, RAM_PAGES - 1), st.integers(0, 1 << 40)))
            flags = draw(st.sampled_from([0x1, 0x3, 0x7, 0x67, 0x87, 0xE7, 0x8000000000000067, 0x7FF]))
            entry = (target << 12) | flags if target < (1 << 40) else target
            struct.pack_into("<Q", ram, table * 4096 + slot * 8, entry & ((1 << 64) - 1))
    return bytes(ram)


@FUZZ
@given(page_tables(), st.sampled_from([4, 5]), st.integers(0, RAM_PAGES - 1))
def test_page_table_walks_survive_garbage(ram: bytes, levels: int, root: int) -> None:
    phys = BufferMemory(ram)

    def walk() -> None:
        space = AddressSpace(phys, root * 4096, levels)
        for _ in space.iter_mappings(budget=Budget(4096, 1 << 16)):
            pass
        for gva in (0, 0x400000, 0xFFFF_FFFF_8100_0000, 0x7FFF_FFFF_F000):
            space.find_translation(gva)
            with contextlib.suppress(NephoscopeError):
                space.read(gva, 64)

    _bounded(walk)


def test_the_fuzz_inputs_really_reach_the_parsers(tmp_path: Path) -> None:
    """The seeds are valid inputs (so mutations start from real paths, not from a rejected header)."""
    assert exec_pages(_elf_seed()).pages
    (tmp_path / "c.elf").write_bytes(_core_seed())
    mem = open_memory(tmp_path / "c.elf")
    assert len(mem.ranges) == 3
    mem.close()
    (tmp_path / "l.lime").write_bytes(_lime_seed())
    mem = open_memory(tmp_path / "l.lime")
    assert mem.read(0x100000, 4) == b"\xab" * 4
    mem.close()
    assert shutil.which("true")
