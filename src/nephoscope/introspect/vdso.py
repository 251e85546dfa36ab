"""The vDSO against its kernel package: the image inside vmlinux, with the alternatives the kernel applies to it.

The kernel keeps the 64-bit vDSO as a whole ELF file in its read-only data (`vdso_image_64.data`, the
page-aligned `raw_data` array in `.rodata`) and patches it once at boot with the vDSO's own
`.altinstructions` (arch/x86/entry/vdso/vma.c `init_vdso_image`): `rdtsc` becomes `lfence; rdtsc` or
`rdtscp`, `lsl` becomes `rdpid`, depending on the CPU. So its code page matches no page hash of the
package (measured on the lab kernel 6.1.0-57: 12 bytes in three `rdtsc_ordered` sites differ). Here the
guest's vDSO bytes are compared with the package's image, and every differing byte must lie in an
alternative site whose bytes are a variant the kernel writes there (`patchsites.accepts`).

The package's image is trusted file content; the guest's bytes are not. Addresses are offsets in the
vDSO image (it is linked at 0).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nephoscope.core.errors import NephoscopeError
from nephoscope.knowledge.pagehash import PAGE_SIZE
from nephoscope.os.linux import patchsites as ps

SONAME = b"linux-vdso.so.1"
MAX_VDSO = 8 * PAGE_SIZE  # vdso64.so is two pages on 6.1 and 6.12
_NO_TARGETS = ps.Targets(lambda _a: False, lambda _a: False, lambda _a: False)  # vDSO sites branch nowhere


@dataclass(frozen=True, slots=True)
class VdsoImage:
    """The package's vDSO: the ELF bytes, its alternative sites (image offsets), and where it came from."""

    data: bytes
    sites: tuple[ps.Site, ...]
    package: str
    version: str


def _sections(image: bytes) -> dict[str, tuple[int, int, int]]:
    """Return section name -> (addr, file offset, size) of a small ELF64 (raises on anything out of bounds)."""
    shoff, = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)
    if shentsize != 64 or not 0 < shnum <= 64 or shstrndx >= shnum or shoff + shnum * 64 > len(image):
        raise ps.SiteTableError(f"vDSO section headers do not fit the image ({shnum} at 0x{shoff:x})")
    raw = [struct.unpack_from("<IIQQQQ", image, shoff + 64 * i) for i in range(shnum)]
    _n, _t, _f, _a, str_off, str_size = raw[shstrndx]
    if str_off + str_size > len(image):
        raise ps.SiteTableError("vDSO section names lie outside the image")
    names = image[str_off:str_off + str_size]
    out = {}
    for name_off, sh_type, _flags, addr, offset, size in raw:
        end = names.find(b"\0", name_off)
        if name_off >= len(names) or end < 0:
            continue
        if sh_type != 8 and offset + size > len(image):  # SHT_NOBITS has no file bytes
            raise ps.SiteTableError(f"vDSO section at 0x{offset:x} (+{size}) lies outside the image")
        out[names[name_off:end].decode(errors="replace")] = (addr, offset, size)
    return out


def find_vdso_image(rodata: bytes, package: str = "", version: str = "") -> VdsoImage | None:
    """Return the 64-bit vDSO embedded (page-aligned) in a vmlinux `.rodata`, with its alternative sites.

    None when there is none; raises `SiteTableError` when the one found has unreadable tables."""
    at = rodata.find(SONAME)
    while at >= 0:
        start = at - at % PAGE_SIZE
        for off in (start, start - PAGE_SIZE):  # the soname sits in .dynstr, in the image's first page or so
            head = rodata[off:off + 64] if off >= 0 else b""
            if head[:4] == b"\x7fELF" and head[4] == 2 and head[18:20] == b"\x3e\x00":  # ELF64, x86-64
                shoff, = struct.unpack_from("<Q", head, 0x28)
                _entsize, shnum = struct.unpack_from("<HH", head, 0x3A)
                size = shoff + 64 * shnum
                size += -size % PAGE_SIZE  # raw_data is whole pages, zero-padded, and mapped whole
                if 0 < size <= MAX_VDSO and off + size <= len(rodata):
                    return _with_sites(rodata[off:off + size], package, version)
        at = rodata.find(SONAME, at + 1)
    return None


def _with_sites(image: bytes, package: str, version: str) -> VdsoImage:
    sections = _sections(image)
    sites: list[ps.Site] = []
    if ".altinstructions" in sections:
        t_addr, t_off, t_size = sections[".altinstructions"]
        r_addr, r_off, r_size = sections.get(".altinstr_replacement", (0, 0, 0))
        x_addr, _x_off, x_size = sections.get(".text", (0, 0, len(image)))
        sites = ps.decode_alternatives("vDSO .altinstructions", image[t_off:t_off + t_size], t_addr,
                                       (x_addr, x_addr + x_size), (r_addr, image[r_off:r_off + r_size]))
    return VdsoImage(image, tuple(sites), package, version)


def check_vdso(got: bytes, image: VdsoImage, present: list[bool] | None = None) -> str:
    """Return "" when the guest's vDSO bytes `got` (from the mapping's start) are the image with only the
    kernel's alternatives applied, else why not. `present[i]`: page i was read (absent pages are skipped)."""
    expected = image.data + bytes(-len(image.data) % PAGE_SIZE)
    if len(got) > len(expected):
        return f"the guest's vDSO ({len(got)} bytes) is larger than the package's ({len(image.data)})"
    pages = len(got) // PAGE_SIZE
    present = present if present is not None else [True] * pages
    if not any(present):
        return "no page of the guest's vDSO could be read"
    bad: list[int] = []
    for n in range(pages):
        if not present[n]:
            continue
        lo = n * PAGE_SIZE
        bad += [lo + i for i, (a, b) in enumerate(zip(got[lo:lo + PAGE_SIZE], expected[lo:lo + PAGE_SIZE],
                                                      strict=True)) if a != b]
    pending = set(bad)
    for site in image.sites:
        span = range(site.start, site.start + site.length)
        if not pending.intersection(span):
            continue
        orig, here = expected[site.start:site.start + site.length], got[site.start:site.start + site.length]
        if ps.accepts(site, orig, here, 0, _NO_TARGETS):
            pending.difference_update(span)
    if pending:
        first = min(pending)
        return (f"{len(pending)} vDSO bytes differ from {image.package} {image.version} outside the kernel's "
                f"alternatives (first at offset 0x{first:x}: {got[first:first + 8].hex()} instead of "
                f"{expected[first:first + 8].hex()})")
    return ""


def load_vdso_image(store: object, release: str) -> tuple[VdsoImage | None, str]:
    """Return the vDSO of kernel `release` from the KB's kernel store, or (None, why not)."""
    find = getattr(store, "find_vmlinux", None)
    if find is None or not release:
        return None, "no kernel package is open"
    try:
        vmlinux = find(release)
    except NephoscopeError as exc:
        return None, str(exc)
    if vmlinux is None:
        return None, f"package linux-image-{release} not in KB (kernel {release})"
    rodata = vmlinux.sections.get(".rodata")
    if rodata is None:
        return None, f"the KB's vmlinux of {release} keeps no .rodata"
    try:
        image = find_vdso_image(rodata.data, vmlinux.package, vmlinux.version)
    except (ps.SiteTableError, struct.error, IndexError) as exc:
        return None, f"the vDSO in {vmlinux.package} cannot be read: {exc}"
    if image is None:
        return None, f"no 64-bit vDSO found in the .rodata of {vmlinux.package} {vmlinux.version}"
    return image, ""
