"""Load BTF from a file: a raw blob (/sys/kernel/btf/vmlinux) or a vmlinux ELF's .BTF section."""

from __future__ import annotations

from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from nephoscope.core.errors import GuestDataError
from nephoscope.os.btf.reader import MAX_BLOB, Btf


def extract_elf_btf(path: str | Path) -> bytes:
    """Return the raw .BTF section of the ELF file at `path`; raise GuestDataError if it has none."""
    try:
        with open(path, "rb") as stream:
            section = ELFFile(stream).get_section_by_name(".BTF")
            if section is None:
                raise GuestDataError(f"{path} has no .BTF section; build the kernel with CONFIG_DEBUG_INFO_BTF")
            if section["sh_size"] > MAX_BLOB:
                raise GuestDataError(f"{path}: .BTF section of {section['sh_size']} bytes is implausibly large")
            return bytes(section.data())
    except (ELFError, OSError) as exc:
        raise GuestDataError(f"cannot read ELF {path}: {exc}") from exc


def load_btf(path: str | Path) -> Btf:
    """Parse the BTF in `path`: a raw blob or an ELF file with a .BTF section."""
    try:
        with open(path, "rb") as stream:
            magic = stream.read(4)
    except OSError as exc:
        raise GuestDataError(f"cannot read BTF file {path}: {exc.strerror}") from exc
    if magic == b"\x7fELF":
        return Btf.parse(extract_elf_btf(path), label=str(path))
    return Btf.parse(Path(path).read_bytes(), label=str(path))
