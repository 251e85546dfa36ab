"""Executable-page layout of synthetic ELF files, including hostile and truncated ones."""

from __future__ import annotations

import hashlib
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from nephoscope.core.errors import GuestDataError
from nephoscope.knowledge.elfpages import MAX_PHNUM, exec_pages, page_at
from nephoscope.knowledge.pagehash import PAGE_SIZE, page_digest

SOURCE = "int answer(int x) { return x * 42; }\nint main(int c, char **v) { return answer(c); }\n"


def _gcc(tmp_path: Path, *flags: str) -> bytes:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    src = tmp_path / "t.c"
    src.write_text(SOURCE)
    out = tmp_path / ("t" + "".join(flags).replace("-", "_"))
    subprocess.run(["gcc", "-O1", *flags, "-o", str(out), str(src)], check=True)
    return out.read_bytes()


def _minimal_elf(phdrs: list[tuple[int, int, int, int, int, int]], size: int = 3 * PAGE_SIZE,
                 e_type: int = 3, phnum: int | None = None) -> bytes:
    """Build a 64-bit little-endian ELF with the given (type, flags, offset, vaddr, filesz, memsz) phdrs."""
    data = bytearray(size)
    for i in range(64, size):
        data[i] = (i * 7 + i // PAGE_SIZE) & 0xFF
    header = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", e_type, 62, 1, 0, 64, 0, 0, 64, 56, len(phdrs) if phnum is None else phnum, 64, 0, 0)
    data[:64] = header
    for i, (p_type, flags, off, vaddr, filesz, memsz) in enumerate(phdrs):
        struct.pack_into("<IIQQQQQQ", data, 64 + 56 * i, p_type, flags, off, vaddr, vaddr, filesz, memsz, PAGE_SIZE)
    return bytes(data)


@pytest.mark.parametrize("flags", [("-pie", "-fPIE"), ("-no-pie", "-fno-pie")])
def test_gcc_binaries_pages_cover_exec_segments(tmp_path: Path, flags: tuple[str, ...]) -> None:
    data = _gcc(tmp_path, *flags)
    elf = exec_pages(data)
    assert elf.elf_type == ("ET_DYN" if "-pie" in flags else "ET_EXEC")
    assert elf.sha256 == hashlib.sha256(data).digest()
    assert elf.build_id is None or len(elf.build_id) == 40
    assert elf.segments
    for seg in elf.segments:
        first = seg.file_offset - seg.file_offset % PAGE_SIZE
        last = seg.file_offset + seg.filesz - 1
        offsets = [p.file_offset for p in elf.pages if first <= p.file_offset <= last]
        assert offsets == list(range(first, last - last % PAGE_SIZE + 1, PAGE_SIZE))
    for page in elf.pages:
        assert page.file_offset % PAGE_SIZE == 0 and page.vaddr % PAGE_SIZE == 0
        assert page.digest == hashlib.sha256(data[page.file_offset:page.file_offset + PAGE_SIZE]
                                             .ljust(PAGE_SIZE, b"\0")).digest()
        seg = next(s for s in elf.segments if s.file_offset - s.file_offset % PAGE_SIZE <= page.file_offset)
        assert page.vaddr - page.file_offset == seg.vaddr - seg.file_offset


def test_unaligned_segment_hashes_whole_pages_including_bytes_outside() -> None:
    data = _minimal_elf([(1, 5, PAGE_SIZE + 0x123, 0x401123, 0x1000, 0x1000)])
    elf = exec_pages(data)
    assert [(p.file_offset, p.vaddr) for p in elf.pages] == [(PAGE_SIZE, 0x401000), (2 * PAGE_SIZE, 0x402000)]
    # the first page starts before p_offset and the last runs past p_offset + p_filesz: file bytes both
    assert elf.pages[0].digest == page_digest(data[PAGE_SIZE:2 * PAGE_SIZE])
    assert elf.pages[1].digest == page_digest(data[2 * PAGE_SIZE:3 * PAGE_SIZE])


def test_last_page_is_zero_filled_past_end_of_file() -> None:
    data = _minimal_elf([(1, 5, 0, 0, 2 * PAGE_SIZE + 100, 2 * PAGE_SIZE + 100)], size=2 * PAGE_SIZE + 100)
    elf = exec_pages(data)
    assert len(elf.pages) == 3
    assert elf.pages[2].digest == page_digest(data[2 * PAGE_SIZE:] + bytes(PAGE_SIZE - 100))
    assert page_at(data, 2 * PAGE_SIZE)[100:] == bytes(PAGE_SIZE - 100)


def test_non_exec_and_non_load_segments_are_ignored() -> None:
    data = _minimal_elf([(1, 4, 0, 0, PAGE_SIZE, PAGE_SIZE), (4, 5, 0, 0, PAGE_SIZE, PAGE_SIZE),
                         (1, 5, PAGE_SIZE, 0x10000 + PAGE_SIZE, 0, 0x100)])
    assert exec_pages(data).pages == ()


@pytest.mark.parametrize("data, message", [
    (b"MZ\x90\x00" + bytes(200), "not an ELF"),
    (b"\x7fELF", "malformed"),
    (_minimal_elf([], phnum=MAX_PHNUM + 1), "absurd program header count"),
    (_minimal_elf([], phnum=500), "outside"),
    (_minimal_elf([(1, 5, 10 * PAGE_SIZE, 0, 16, 16)]), "past the end"),
    (_minimal_elf([(1, 5, 0, 0, 1 << 40, 1 << 40)]), "past the end"),
    (_minimal_elf([(1, 5, 0x10, 0x400000, 16, 16)]), "modulo the page size"),
])
def test_hostile_headers_raise_guest_data_error(data: bytes, message: str) -> None:
    with pytest.raises(GuestDataError, match=message):
        exec_pages(data)


def test_truncated_real_binary_is_rejected(tmp_path: Path) -> None:
    data = _gcc(tmp_path, "-pie", "-fPIE")
    seg = exec_pages(data).segments[0]
    with pytest.raises(GuestDataError):
        exec_pages(data[:seg.file_offset + seg.filesz // 2])
    with pytest.raises(GuestDataError):
        exec_pages(data[:40])


def test_overlapping_segments_hash_each_page_once() -> None:
    data = _minimal_elf([(1, 5, 0, 0, 2 * PAGE_SIZE, 2 * PAGE_SIZE)] * 5)
    assert len(exec_pages(data).pages) == 2


def test_fuzzed_headers_only_raise_guest_data_error(tmp_path: Path) -> None:
    data = _gcc(tmp_path, "-pie", "-fPIE")
    rng = random.Random(3)
    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(1500):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(64 + 56 * 14)] = rng.randrange(256)
        if rng.random() < 0.2:
            mutated = mutated[:rng.randrange(len(mutated))]
        try:
            elf = exec_pages(bytes(mutated))
        except GuestDataError:
            outcomes["rejected"] += 1
            continue
        outcomes["ok"] += 1
        assert all(p.file_offset < len(mutated) and p.file_offset % PAGE_SIZE == 0 for p in elf.pages)
    assert outcomes["ok"] and outcomes["rejected"]
