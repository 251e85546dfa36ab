"""Physical memory: raw, ELF core and LiME images, format detection, bounds and hostile files."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from nephoscope.core.errors import ConnectorError, MemoryAccessError
from nephoscope.memory.physical import (
    LIME_MAGIC,
    BufferMemory,
    ElfCoreMemory,
    LimeMemory,
    PhysicalMemory,
    RawMemory,
    open_memory,
)


def _elf_core(segments: list[tuple[int, bytes]], phnum: int | None = None) -> bytes:
    """Return a minimal ELF64 core with one PT_LOAD per (paddr, data), data after the headers."""
    phoff, n = 64, len(segments)
    data_off = phoff + 56 * n
    head = bytearray(b"\x7fELF\x02\x01\x01" + bytes(9))
    head += struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, phoff, 0, 0, 64, 56, n if phnum is None else phnum, 64, 0, 0)
    body = b""
    for paddr, data in segments:
        head += struct.pack("<IIQQQQQQ", 1, 0, data_off + len(body), 0xFFFF_8880_0000_0000 + paddr, paddr,
                            len(data), len(data), 0)
        body += data
    return bytes(head) + body


def _lime(segments: list[tuple[int, bytes]]) -> bytes:
    out = b""
    for start, data in segments:
        out += struct.pack("<IIQQ8x", LIME_MAGIC, 1, start, start + len(data) - 1) + data
    return out


def test_raw(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    path.write_bytes(bytes(range(256)) * 64)
    with open_memory(path) as mem:
        assert isinstance(mem, RawMemory) and isinstance(mem, PhysicalMemory)
        assert mem.ranges == [(0, 16384)]
        assert mem.read(0x101, 3) == b"\x01\x02\x03"
        assert bytes(mem.view(0x10, 2)) == b"\x10\x11"
        assert mem.pages(0x1000, 2).shape == (2, 4096)
        with pytest.raises(MemoryAccessError, match="outside RAM"):
            mem.read(16384, 1)
        with pytest.raises(MemoryAccessError):
            mem.read(16380, 8)
        with pytest.raises(MemoryAccessError):
            mem.read(0, -5)
        with pytest.raises(MemoryAccessError):
            mem.read(0, 1 << 40)


def test_elf_core_segments_and_spanning_read(tmp_path: Path) -> None:
    path = tmp_path / "core"
    path.write_bytes(_elf_core([(0, b"A" * 4096), (4096, b"B" * 4096), (1 << 20, b"C" * 8192)]))
    with open_memory(path) as mem:
        assert isinstance(mem, ElfCoreMemory)
        assert mem.ranges == [(0, 8192), ((1 << 20), (1 << 20) + 8192)]
        assert mem.read(4094, 4) == b"AABB"  # spans two PT_LOADs
        assert mem.read((1 << 20) + 5, 2) == b"CC"
        with pytest.raises(MemoryAccessError):
            mem.read(8192, 1)  # the gap
        with pytest.raises(MemoryAccessError):
            mem.view(4094, 4)  # zero-copy views do not span segments


def test_lime(tmp_path: Path) -> None:
    path = tmp_path / "lime"
    path.write_bytes(_lime([(0x1000, b"x" * 4096), (0x100000, b"y" * 4096)]) + b"trailing junk")
    with open_memory(path) as mem:
        assert isinstance(mem, LimeMemory)
        assert mem.ranges == [(0x1000, 0x2000), (0x100000, 0x101000)]
        assert mem.read(0x100FFF, 1) == b"y"


def test_truncated_dumps_keep_what_they_have(tmp_path: Path) -> None:
    core = _elf_core([(0, b"A" * 8192)])
    (tmp_path / "core").write_bytes(core[:-4096])
    with ElfCoreMemory(tmp_path / "core") as mem:
        assert mem.ranges == [(0, 4096)]
    lime = _lime([(0, b"x" * 8192)])
    (tmp_path / "lime").write_bytes(lime[:-100])
    with LimeMemory(tmp_path / "lime") as mem:
        assert mem.ranges == [(0, 8092)]


@pytest.mark.parametrize("blob", [
    b"\x7fELF" + os.urandom(60),
    b"\x7fELF\x02\x01" + bytes(58),
    _elf_core([(0, b"A" * 4096)], phnum=60000),
    _elf_core([]),
    struct.pack("<IIQQ8x", LIME_MAGIC, 1, 100, 5),
])
def test_hostile_headers_fail_clearly(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "bad"
    path.write_bytes(blob)
    with pytest.raises(ConnectorError):
        open_memory(path)


def test_empty_and_missing(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ConnectorError, match="empty"):
        open_memory(tmp_path / "empty")
    with pytest.raises(ConnectorError):
        open_memory(tmp_path / "missing")


def test_overlapping_segments_are_dropped() -> None:
    from nephoscope.memory.physical import SegmentedMemory
    mem = SegmentedMemory(bytearray(8192), [(0, 4096, 0), (2048, 6144, 4096), (4096, 8192, 4096)])
    assert mem.ranges == [(0, 8192)]
    assert BufferMemory(bytearray(16), base=0x1000).read(0x100F, 1) == b"\0"


def test_elf_pn_xnum_takes_the_count_from_section_zero(tmp_path: Path) -> None:
    core = bytearray(_elf_core([(0, b"A" * 4096), (8192, b"B" * 4096)], phnum=0xFFFF))
    shoff = len(core)
    core += bytes(44) + struct.pack("<I", 2) + bytes(16)  # section header 0: sh_info = the real count
    struct.pack_into("<Q", core, 40, shoff)
    (tmp_path / "core").write_bytes(core)
    with open_memory(tmp_path / "core") as mem:
        assert mem.ranges == [(0, 4096), (8192, 12288)]
