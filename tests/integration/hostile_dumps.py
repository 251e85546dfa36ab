"""Deterministic corruptions of a copy of a real clean-guest QEMU ELF core (shared by the hostile tests).

Each function takes the path of a writable copy and damages it in place the way issue 11 describes:
program headers that misplace RAM, a PT_LOAD that wraps past 2^64, the same RAM as 65,535 segments, a
region filled with copies of a page-table root, and page tables mapping vdso look-alikes.
"""

from __future__ import annotations

import mmap
import shutil
import struct
from pathlib import Path

from nephoscope.memory.paging import NX, PS, US, AddressSpace, P
from nephoscope.memory.physical import ElfCoreMemory
from nephoscope.memory.roots import scan_roots

PHDR = struct.Struct("<IIQQQQQQ")  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
PAGE = 4096


def copy_dump(src: Path, dst: Path) -> Path:
    """Copy the clean dump to `dst` (writable) and return it."""
    shutil.copyfile(src, dst)
    dst.chmod(0o600)
    return dst


def _phdrs(data: bytearray | mmap.mmap) -> tuple[int, int, list[list[int]]]:
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    return phoff, phentsize, [list(PHDR.unpack_from(data, phoff + i * phentsize)) for i in range(phnum)]


def _edit_phdrs(path: Path, edit: object) -> None:
    with path.open("r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
        phoff, size, headers = _phdrs(mm)
        for i, h in enumerate(headers):
            edit(i, h)  # type: ignore[operator]
            PHDR.pack_into(mm, phoff + i * size, *h)


def shift_ram(path: Path, delta: int = PAGE) -> None:
    """Misplace RAM by `delta` bytes in the headers: every PT_LOAD's p_paddr moves, the data stays."""
    def edit(_i: int, h: list[int]) -> None:
        if h[0] == 1:
            h[4] += delta
            h[3] += delta
    _edit_phdrs(path, edit)


def shift_offsets(path: Path, delta: int = PAGE) -> None:
    """Point every PT_LOAD's file offset one page further: gpa X reads the bytes of gpa X + delta."""
    def edit(_i: int, h: list[int]) -> None:
        if h[0] == 1:
            h[2] += delta
            h[5] -= delta
            h[6] -= delta
    _edit_phdrs(path, edit)


def overflow_load(path: Path) -> None:
    """Make the last PT_LOAD start 4 KiB below 2^64 so p_paddr + p_filesz passes 2^64."""
    loads: list[int] = []
    _edit_phdrs(path, lambda i, h: loads.append(i) if h[0] == 1 else None)

    def edit(i: int, h: list[int]) -> None:
        if i == loads[-1]:
            h[4] = h[3] = (1 << 64) - PAGE
    _edit_phdrs(path, edit)


def many_segments(path: Path, count: int = 65535) -> None:
    """Describe the first PT_LOAD's RAM as `count` adjacent PT_LOADs (PN_XNUM program headers at the end)."""
    with path.open("r+b") as fh:
        data = bytearray(fh.read(4096))
        _, _, headers = _phdrs(data)
        note = [h for h in headers if h[0] != 1]
        ram = next(h for h in headers if h[0] == 1)
        pieces = count - len(note)
        step = (ram[5] // pieces) & ~(PAGE - 1)
        new = [list(h) for h in note]
        for k in range(pieces):
            start = k * step
            size = step if k < pieces - 1 else ram[5] - start
            new.append([1, ram[1], ram[2] + start, ram[3] + start, ram[4] + start, size, size, 0])
        fh.seek(0, 2)
        phoff = fh.tell()
        fh.write(b"".join(PHDR.pack(*h) for h in new))
        shoff = fh.tell()
        fh.write(bytes(44) + struct.pack("<I", len(new)) + bytes(16))  # section 0: sh_info = the real count
        fh.seek(32)
        fh.write(struct.pack("<QQ", phoff, shoff))
        fh.seek(56)
        fh.write(struct.pack("<HHH", 0xFFFF, 64, 1))  # e_phnum = PN_XNUM, e_shentsize, e_shnum


def _ram_view(path: Path) -> tuple[ElfCoreMemory, int]:
    mem = ElfCoreMemory(path)
    start, _view = next(mem.iter_segments())
    return mem, start


def pgd_flood(path: Path, nbytes: int = 64 << 20, at: int | None = None) -> None:
    """Fill `nbytes` of RAM from gpa `at` with copies of one process's real top-level page table.

    Without `at`, the flood goes where it destroys the least of what the guest runs: the `nbytes`-aligned
    window holding the fewest page-table roots and user executable pages (where those lie depends on the
    moment the dump was taken; the test is about the flood of fake roots, not about lost code)."""
    mem = ElfCoreMemory(path)
    roots = scan_roots(mem).process_roots
    root = roots[0]
    pgd = mem.read(root.gpa, PAGE)
    if at is None:
        used: dict[int, int] = {}
        for r in roots:
            for gpa in (r.gpa, r.user_gpa):
                used[gpa // nbytes] = used.get(gpa // nbytes, 0) + 1
            for m in AddressSpace(mem, r.user_gpa).iter_mappings(user_only=True, exec_only=True, end=1 << 47):
                used[m.gpa // nbytes] = used.get(m.gpa // nbytes, 0) + 1
        windows = [w for w in range(1, max(e for _, e in mem.ranges) // nbytes)
                   if any(s <= w * nbytes and (w + 1) * nbytes <= e for s, e in mem.ranges)]
        at = min(windows, key=lambda w: (used.get(w, 0), w)) * nbytes
    offset = _file_offset(mem, at)
    mem.close()
    with path.open("r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
        mm[offset: offset + nbytes] = pgd * (nbytes // PAGE)


def _file_offset(mem: ElfCoreMemory, gpa: int) -> int:
    for start, end, offset in mem._segments:  # test helper: where a gpa's byte lives in the file
        if start <= gpa < end:
            return offset + gpa - start
    raise AssertionError(f"gpa {gpa:#x} not in the dump")


VDSO = b"\x7fELF\x02\x01\x01" + bytes(100) + b"linux-vdso.so.1\0"


FAKE_VDSO_GPA = 0x1400_0000  # somewhere in RAM: the look-alike's content


def fake_vdsos(path: Path, tables: int = 4) -> int:
    """In one process, turn `tables` of its user page tables (PTs) into vdso look-alikes at every other slot.

    Returns the number of fake vdso pages mapped."""
    mem = ElfCoreMemory(path)
    roots = scan_roots(mem).process_roots
    root = max(roots, key=lambda r: r.user_entries)
    asp = AddressSpace(mem, root.user_gpa)
    # the PTs holding this process's user executable 4 KiB pages, found by walking down to each leaf
    pts: list[int] = []
    for m in asp.iter_mappings(user_only=True, exec_only=True, end=1 << 47):
        if m.size != PAGE:
            continue
        table = asp.cr3
        for shift in (39, 30, 21):
            entry = int.from_bytes(mem.read(table + ((m.gva >> shift) & 511) * 8, 8), "little")
            if entry & PS:
                break
            table = entry & 0x000F_FFFF_FFFF_F000
        else:
            if table not in pts:
                pts.append(table)
        if len(pts) >= tables:
            break
    page_gpa = FAKE_VDSO_GPA
    writes = [(_file_offset(mem, page_gpa), VDSO.ljust(PAGE, b"\0"))]
    count = 0
    for pt in pts:
        entries = b"".join(struct.pack("<Q", (page_gpa | P | US) if i % 2 == 0 else 0) for i in range(512))
        writes.append((_file_offset(mem, pt), entries))
        count += 256
    mem.close()
    with path.open("r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
        for offset, blob in writes:
            mm[offset: offset + len(blob)] = blob
    assert not NX & (page_gpa | P | US)
    return count
