"""Compute the executable pages of an ELF file exactly as x86-64 Linux maps them into memory.

The kernel (and ld.so) map each PT_LOAD segment from its page-aligned file offset, so the first page
may hold bytes before `p_offset` and the last page holds the file's bytes after `p_offset + p_filesz`
(file-backed mappings map whole page-cache pages). Only bytes past the end of the file read as zero.
Every header value is untrusted: absurd counts, sizes and offsets raise `GuestDataError`.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError, ELFParseError
from elftools.construct.core import ConstructError
from elftools.elf.elffile import ELFFile

from nephoscope.core.errors import GuestDataError
from nephoscope.knowledge.pagehash import PAGE_SIZE, page_digest

ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
PF_X = 0x1
NT_GNU_BUILD_ID = 3
MAX_PHNUM = 1024  # the kernel refuses program header tables above 64 KiB (~1170 entries)
MAX_EXEC_PAGES = 1 << 18  # 1 GiB of code per file is far beyond any real binary
_PAGE_MASK = ~(PAGE_SIZE - 1)
# everything pyelftools raises on hostile bytes (fuzzing found construct errors escaping ELFParseError)
PARSE_ERRORS = (ELFError, ELFParseError, ConstructError, ValueError, OverflowError, struct.error, KeyError,
                IndexError, UnicodeDecodeError)


@dataclass(frozen=True, slots=True)
class ExecSegment:
    """One executable PT_LOAD segment (offsets in the file, addresses in the ELF's virtual space)."""

    file_offset: int
    vaddr: int
    filesz: int
    memsz: int
    flags: int

    @property
    def page_offsets(self) -> range:
        """Return the page-aligned file offsets the kernel maps for this segment."""
        start = self.file_offset & _PAGE_MASK
        end = self.file_offset + self.filesz
        return range(start, (end + PAGE_SIZE - 1) & _PAGE_MASK, PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class PageInfo:
    """One executable page: its file offset, its page-aligned vaddr in the ELF, and its digest."""

    file_offset: int
    vaddr: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class ElfPages:
    """What an ELF file contributes to the code-page DB."""

    sha256: bytes
    size: int
    elf_type: str  # ET_EXEC, ET_DYN, ...
    machine: str
    build_id: str | None
    segments: tuple[ExecSegment, ...]
    pages: tuple[PageInfo, ...]


def is_elf(head: bytes) -> bool:
    """Return whether `head` starts with the ELF magic."""
    return head[:4] == ELF_MAGIC


def _open(data: bytes) -> ELFFile:
    if not is_elf(data):
        raise GuestDataError("not an ELF file (no \\x7fELF magic)")
    try:
        elf = ELFFile(io.BytesIO(data))
    except PARSE_ERRORS as exc:
        raise GuestDataError(f"malformed ELF header: {exc}") from exc
    phnum, phoff, phentsize = elf["e_phnum"], elf["e_phoff"], elf["e_phentsize"]
    if phnum > MAX_PHNUM:
        raise GuestDataError(f"absurd program header count {phnum} (limit {MAX_PHNUM})")
    if phnum and (phentsize < elf.structs.Elf_Phdr.sizeof() or phoff + phnum * phentsize > len(data)):
        raise GuestDataError(f"program header table ({phnum} x {phentsize} at {phoff:#x}) "
                             f"lies outside the {len(data)}-byte file (truncated?)")
    return elf


def iter_segments(elf: ELFFile, size: int) -> list[ExecSegment]:
    """Return the executable PT_LOAD segments, checked against the file size of `size` bytes."""
    out: list[ExecSegment] = []
    try:
        headers = [elf.get_segment(i).header for i in range(elf["e_phnum"])]
    except PARSE_ERRORS as exc:
        raise GuestDataError(f"unreadable program header: {exc}") from exc
    for h in headers:
        if h["p_type"] not in ("PT_LOAD", PT_LOAD) or not h["p_flags"] & PF_X or h["p_filesz"] == 0:
            continue
        seg = ExecSegment(h["p_offset"], h["p_vaddr"], h["p_filesz"], h["p_memsz"], h["p_flags"])
        if seg.file_offset >= size or seg.file_offset + seg.filesz > size:
            raise GuestDataError(f"executable segment at {seg.file_offset:#x}+{seg.filesz:#x} runs past "
                                 f"the end of the {size}-byte file (truncated or hostile)")
        if (seg.vaddr - seg.file_offset) % PAGE_SIZE:
            raise GuestDataError(f"segment vaddr {seg.vaddr:#x} and offset {seg.file_offset:#x} disagree "
                                 "modulo the page size; no loader maps that")
        out.append(seg)
    return out


def find_build_id(elf: ELFFile) -> str | None:
    """Return the NT_GNU_BUILD_ID as hex, or None when the file has none (or it is unreadable)."""
    try:
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_NOTE":
                continue
            for note in seg.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                    desc = note["n_desc"]
                    return desc if isinstance(desc, str) else bytes(desc).hex()
    except PARSE_ERRORS:
        return None
    return None


def page_at(data: bytes, file_offset: int) -> bytes:
    """Return the 4 KiB page at `file_offset` as mapped: file bytes, zero-filled past end of file."""
    page = data[file_offset:file_offset + PAGE_SIZE]
    return page if len(page) == PAGE_SIZE else page.ljust(PAGE_SIZE, b"\0")


def exec_pages(data: bytes) -> ElfPages:
    """Parse an ELF file's bytes and hash every page of its executable segments."""
    elf = _open(data)
    segments = iter_segments(elf, len(data))
    seen: set[tuple[int, int]] = set()
    pages: list[PageInfo] = []
    for seg in segments:
        vaddr0 = (seg.vaddr & _PAGE_MASK) - (seg.file_offset & _PAGE_MASK)
        for off in seg.page_offsets:
            if (off, vaddr0 + off) in seen:
                continue
            if len(seen) >= MAX_EXEC_PAGES:
                raise GuestDataError(f"more than {MAX_EXEC_PAGES} executable pages; refusing a hostile file")
            seen.add((off, vaddr0 + off))
            pages.append(PageInfo(off, (vaddr0 + off) & 0xFFFF_FFFF_FFFF_FFFF, page_digest(page_at(data, off))))
    return ElfPages(
        sha256=hashlib.sha256(data).digest(),
        size=len(data),
        elf_type=str(elf["e_type"]),
        machine=str(elf["e_machine"]),
        build_id=find_build_id(elf),
        segments=tuple(segments),
        pages=tuple(pages),
    )
