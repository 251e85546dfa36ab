"""The vDSO against its package's image: the kernel's alternatives accepted, every other change named.

The image is a synthetic ELF64 laid out like vdso64.so (.text with an `rdtsc_ordered` site, .altinstructions
in the 6.1 12-byte layout, .altinstr_replacement); the real one is checked on the lab dumps
(tests/integration/test_server_sync_lab.py and the dump test there)."""

from __future__ import annotations

import struct

import pytest

from nephoscope.introspect.vdso import MAX_VDSO, SONAME, check_vdso, find_vdso_image, load_vdso_image
from nephoscope.knowledge.pagehash import PAGE_SIZE
from nephoscope.os.linux.patchsites import SiteTableError

TEXT, ALT, REPL, DYNSTR, SHSTR, SHDR = 0x100, 0x200, 0x240, 0x280, 0x2A0, 0x1100  # two pages, as 6.1's
SITE = TEXT + 5
RDTSC = bytes.fromhex("0f31909090")  # rdtsc padded to the longest replacement
LFENCE_RDTSC, RDTSCP = bytes.fromhex("0faee80f31"), bytes.fromhex("0f01f9")


def _elf(alt_rel_shift: int = 0, shnum: int = 6) -> bytes:
    img = bytearray(SHDR + 6 * 64)
    img[:4] = b"\x7fELF"
    img[4:7] = b"\x02\x01\x01"
    struct.pack_into("<HHI", img, 16, 3, 0x3E, 1)  # ET_DYN, x86-64
    struct.pack_into("<Q", img, 0x28, SHDR)
    struct.pack_into("<HHHH", img, 0x3A, 64, shnum, 5, 0)
    struct.pack_into("<H", img, 0x3E, 5)
    img[TEXT:TEXT + 0x40] = b"\x55" * 5 + RDTSC + b"\xc3" * 0x36
    for i, (repl, length, cpuid) in enumerate([(REPL, 5, 0x72), (REPL + 5, 3, 0x3B)]):
        at = ALT + 12 * i
        struct.pack_into("<iiHBB", img, at, SITE - at + alt_rel_shift, repl - (at + 4), cpuid, 5, length)
    img[REPL:REPL + 8] = LFENCE_RDTSC + RDTSCP
    img[DYNSTR:DYNSTR + len(SONAME) + 1] = SONAME + b"\0"
    names = b"\0.text\0.altinstructions\0.altinstr_replacement\0.dynstr\0.shstrtab\0"
    img[SHSTR:SHSTR + len(names)] = names
    sections = [(0, 0, 0, 0), (1, TEXT, 0x40, 1), (7, ALT, 24, 1), (24, REPL, 8, 1), (46, DYNSTR, 0x20, 3),
                (54, SHSTR, len(names), 3)]
    for i, (name, off, size, sh_type) in enumerate(sections):
        struct.pack_into("<IIQQQQ", img, SHDR + 64 * i, name, sh_type if i else 0, 2, off, off, size)
    return bytes(img)


def _rodata(image: bytes) -> bytes:
    vdso32 = b"\x7fELF\x01\x01\x01" + bytes(100) + SONAME  # the 32-bit vDSO: not the one x86-64 maps
    return b"junk" * 1024 + vdso32.ljust(PAGE_SIZE, b"\0") + image.ljust(2 * PAGE_SIZE, b"\0") + b"tail"


def _guest(image: bytes, at: int = SITE, code: bytes = RDTSC) -> bytes:
    page = bytearray(image.ljust(2 * PAGE_SIZE, b"\0"))
    page[at:at + len(code)] = code
    return bytes(page)


def test_the_vdso_is_found_in_rodata_with_its_alternative_sites() -> None:
    found = find_vdso_image(_rodata(_elf()), "linux-image-x", "1")
    assert found is not None and found.data == _elf().ljust(2 * PAGE_SIZE, b"\0")
    assert [(s.start, s.length, s.repl) for s in found.sites] == [(SITE, 5, LFENCE_RDTSC), (SITE, 5, RDTSCP)]
    assert find_vdso_image(b"\0" * 3 * PAGE_SIZE + SONAME) is None


@pytest.mark.parametrize("code", [RDTSC, LFENCE_RDTSC, RDTSCP + b"\x90\x90", RDTSCP + b"\x66\x90"])
def test_what_the_kernel_writes_at_a_site_is_accepted(code: bytes) -> None:
    image = find_vdso_image(_rodata(_elf()), "linux-image-x", "1")
    assert image is not None
    assert check_vdso(_guest(_elf(), code=code), image) == ""


@pytest.mark.parametrize(("at", "code"), [(SITE, b"\xcc" + RDTSC[1:]), (SITE, b"\xe9\x00\x10\x00\x00"),
                                          (TEXT + 0x20, b"\x90"), (2 * PAGE_SIZE - 1, b"\x01")])
def test_any_other_change_is_named(at: int, code: bytes) -> None:
    image = find_vdso_image(_rodata(_elf()), "linux-image-x", "1")
    assert image is not None
    why = check_vdso(_guest(_elf(), at, code), image)
    assert why.startswith(("1 vDSO bytes differ", "2 vDSO bytes", "3 vDSO", "4 vDSO", "5 vDSO")), why
    assert "linux-image-x 1" in why and f"0x{at:x}" in why


def test_absent_pages_are_skipped_and_oversized_vdsos_refused() -> None:
    image = find_vdso_image(_rodata(_elf()), "p", "1")
    assert image is not None
    changed = _guest(_elf(), PAGE_SIZE + 8, b"\x01")
    assert check_vdso(changed, image, [True, False]) == ""  # the changed page was not read
    assert check_vdso(changed, image, [False, False]).startswith("no page")
    assert "larger" in check_vdso(bytes(MAX_VDSO + PAGE_SIZE), image)


def test_tables_that_do_not_fit_are_errors_not_crashes() -> None:
    with pytest.raises(SiteTableError):  # an alternative pointing outside .text
        find_vdso_image(_rodata(_elf(alt_rel_shift=0x1000)))
    bad = bytearray(_elf())
    struct.pack_into("<Q", bad, 0x28, 0x7FFF_FFFF)  # section headers far outside the image
    assert find_vdso_image(_rodata(bytes(bad))) is None  # no image of a plausible size there


class _Store:
    def __init__(self, vmlinux: object) -> None:
        self.vmlinux = vmlinux

    def find_vmlinux(self, release: str) -> object:
        return self.vmlinux


def test_reasons_when_the_kb_cannot_give_the_image() -> None:
    assert load_vdso_image(None, "6.1.0-57-amd64")[1] == "no kernel package is open"
    assert "not in KB" in load_vdso_image(_Store(None), "6.1.0-57-amd64")[1]
