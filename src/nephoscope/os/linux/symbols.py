"""Kernel type information from any source: the guest's BTF, a Volatility 3 ISF, or a vmlinux (BTF or DWARF).

The kernel model asks four questions of its types (`TypeSource`): does struct X exist, how big is it,
where are these members, how big is this member. The guest's own BTF answers them with zero
configuration; `--symbols FILE` answers them for kernels without BTF in RAM, from a Volatility 3 ISF
(JSON or .json.xz: `user_types` and `symbols`) or a vmlinux (its .BTF section, else its DWARF).
A file's symbols are link-time addresses; detection slides them to the guest's KASLR base.
"""

from __future__ import annotations

import bz2
import io
import json
import lzma
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from nephoscope.core.errors import DetectionError, GuestDataError

if TYPE_CHECKING:
    from nephoscope.os.btf.reader import Btf
    from nephoscope.os.linux.kallsyms import Kallsyms, Phys
    from nephoscope.os.linux.model import LinuxKernel

MAX_DEPTH = 64  # nested anonymous members / array-of-array chains followed before calling it a cycle
MAX_ISF_BYTES = 1 << 30
MAX_VMLINUX = 1 << 30
@dataclass(frozen=True, slots=True)
class MemberInfo:
    """Where one struct member lies and how big it is (offsets from the start of the outermost struct)."""

    offset: int  # bytes: the byte holding the first bit, for bitfields
    size: int  # bytes of the member's type (an array: all of it; a bitfield: its storage type)
    count: int | None = None  # element count when the member is an array
    bit_offset: int = 0
    bitfield_size: int = 0


Layout = dict[str, dict[str, MemberInfo]]


class TypeSource(Protocol):
    """What the kernel model needs to know about the kernel's types."""

    label: str

    def has_struct(self, name: str) -> bool:
        """Return whether the kernel defines struct (or union) `name`."""
        ...

    def struct_size(self, name: str) -> int:
        """Return sizeof(struct name); raise GuestDataError if there is no such struct."""
        ...

    def members(self, wanted: Mapping[str, Iterable[str]], kernel: str = "") -> Layout:
        """Return {struct: {member path: MemberInfo}}; a path ending in "?" is optional.

        Raise GuestDataError naming the kernel and every missing struct and member.
        """
        ...

    def enum_values(self, name: str) -> dict[str, int] | None:
        """Return the constants of enum `name`, or None if the kernel has no such enum."""
        ...


def resolve_members(wanted: Mapping[str, Iterable[str]], find: Callable[[str, str], MemberInfo | None],
                    has_struct: Callable[[str], bool], where: str) -> Layout:
    """Return {struct: {path: MemberInfo}} using `find(struct, path)`; raise one GuestDataError naming all missing."""
    layout: Layout = {}
    missing: list[str] = []
    for struct_name, paths in wanted.items():
        if not has_struct(struct_name):
            missing.append(f"struct {struct_name}")
            continue
        members = layout.setdefault(struct_name, {})
        for path in paths:
            optional = path.endswith("?")
            path = path.rstrip("?")
            found = find(struct_name, path)
            if found is not None:
                members[path] = found
            elif not optional:
                missing.append(f"{struct_name}.{path}")
    if missing:
        raise GuestDataError(f"{where}: the type information lacks {', '.join(missing)}; this kernel lays these "
                             "structures out differently — teach the kernel model its variant")
    return layout


class BtfTypes:
    """A TypeSource over parsed BTF (the guest's own, or a vmlinux's .BTF section)."""

    def __init__(self, btf: Btf) -> None:
        self.btf = btf
        self.label = btf.label

    def has_struct(self, name: str) -> bool:
        """Return whether the BTF has a struct or union `name`."""
        return self.btf.find_struct(name) is not None

    def struct_size(self, name: str) -> int:
        """Return sizeof(struct name) from BTF."""
        return self.btf.get_struct(name).size

    def members(self, wanted: Mapping[str, Iterable[str]], kernel: str = "") -> Layout:
        """Return where `wanted` members lie and their sizes (see TypeSource); BTF's own error names them."""
        from nephoscope.os.btf.layout import member_offsets
        from nephoscope.os.btf.types import Array

        layout: Layout = {}
        for s, found in member_offsets(self.btf, wanted, kernel=kernel).items():
            layout[s] = {}
            for path, m in found.items():
                resolved = self.btf.resolve(m.type_id)
                layout[s][path] = MemberInfo(m.offset, self.btf.sizeof(m.type_id),
                                             resolved.nelems if isinstance(resolved, Array) else None,
                                             m.bit_offset, m.bitfield_size)
        return layout

    def enum_values(self, name: str) -> dict[str, int] | None:
        """Return the constants of BTF enum `name` (ENUM or ENUM64), or None."""
        from nephoscope.os.btf.types import Enum, Kind

        found = self.btf.find_by_name(name, frozenset({Kind.ENUM, Kind.ENUM64}))
        return dict(found.values) if isinstance(found, Enum) else None


class IsfTypes:
    """A TypeSource over ISF-shaped dictionaries (`user_types`, `base_types`, `enums` of a Volatility 3 ISF).

    `user_types` may be any mapping: the DWARF reader fills one lazily. Anonymous members (ISF 6.2
    `"anonymous": true`, or dwarf2json's flattened ones) are looked through like BTF's.
    """

    def __init__(self, user_types: Mapping[str, Any], base_types: Mapping[str, Any] | None = None,
                 enums: Mapping[str, Any] | None = None, label: str = "ISF") -> None:
        self.user_types = user_types
        self.base_types = base_types or {}
        self.enums = enums or {}
        self.label = label

    def _struct(self, name: str) -> Mapping[str, Any] | None:
        t = self.user_types.get(name)
        if not isinstance(t, Mapping) or t.get("kind") not in ("struct", "union"):
            return None
        if not t.get("fields") and not t.get("size"):
            return None  # a forward declaration
        return t

    def has_struct(self, name: str) -> bool:
        """Return whether `user_types` defines struct or union `name` (not just declares it)."""
        return self._struct(name) is not None

    def struct_size(self, name: str) -> int:
        """Return the ISF size of struct `name`."""
        t = self._struct(name)
        if t is None:
            raise GuestDataError(f"{self.label}: no struct {name!r}")
        return _int(t.get("size"), f"{self.label}: size of struct {name}")

    def members(self, wanted: Mapping[str, Iterable[str]], kernel: str = "") -> Layout:
        """Return where `wanted` members lie and their sizes (see TypeSource)."""
        return resolve_members(wanted, self.member, self.has_struct,
                               f"kernel {kernel} ({self.label})" if kernel else self.label)

    def member(self, struct: str, path: str) -> MemberInfo | None:
        """Return where member `path` of `struct` lies and its size, or None if there is no such member."""
        hit = self.find_member(struct, path)
        if hit is None:
            return None
        offset, desc = hit
        bit, width, storage = offset * 8, 0, desc
        if desc.get("kind") == "bitfield":
            bit += _int(desc.get("bit_position"), f"{self.label}: bit position of {path}")
            width = _int(desc.get("bit_length"), f"{self.label}: bit length of {path}")
            storage = _desc(desc.get("type"), self.label)
        count = _int(desc.get("count"), f"{self.label}: count of {path}") if desc.get("kind") == "array" else None
        return MemberInfo(offset, self.sizeof(storage) or 0, count, bit, width)

    def enum_values(self, name: str) -> dict[str, int] | None:
        """Return the constants of ISF enum `name`, or None."""
        found = self.enums.get(name)
        constants = found.get("constants") if isinstance(found, Mapping) else None
        if not isinstance(constants, Mapping):
            return None
        return {str(k): v for k, v in constants.items() if isinstance(v, int) and not isinstance(v, bool)}

    def find_member(self, struct: str, path: str) -> tuple[int, Mapping[str, Any]] | None:
        """Return (byte offset, ISF type descriptor) of dotted member `path` of `struct`, or None."""
        current = self._struct(struct)
        offset = 0
        for depth, part in enumerate(path.split(".")):
            if current is None:
                return None
            hit = self._direct(current, part, 0)
            if hit is None:
                return None
            offset += hit[0]
            desc = hit[1]
            if depth < path.count("."):
                current = self._struct_of(desc)
        return offset, desc

    def _direct(self, t: Mapping[str, Any], name: str, depth: int) -> tuple[int, Mapping[str, Any]] | None:
        if depth > MAX_DEPTH:
            raise GuestDataError(f"{self.label}: anonymous members nest deeper than {MAX_DEPTH} (a cycle?)")
        fields = t.get("fields")
        if not isinstance(fields, Mapping):
            return None
        f = fields.get(name)
        if isinstance(f, Mapping) and not f.get("anonymous"):
            return _int(f.get("offset"), f"{self.label}: offset of {name}"), _desc(f.get("type"), self.label)
        for field_name, f in fields.items():
            if not isinstance(f, Mapping) or not (f.get("anonymous") or str(field_name).startswith("unnamed_field")):
                continue
            nested = self._struct_of(_desc(f.get("type"), self.label))
            if nested is not None:
                hit = self._direct(nested, name, depth + 1)
                if hit is not None:
                    return _int(f.get("offset"), f"{self.label}: offset of {field_name}") + hit[0], hit[1]
        return None

    def _struct_of(self, desc: Mapping[str, Any]) -> Mapping[str, Any] | None:
        if desc.get("kind") in ("struct", "union") and isinstance(desc.get("name"), str):
            return self._struct(desc["name"])
        return None

    def sizeof(self, desc: Mapping[str, Any], depth: int = 0) -> int | None:
        """Return the byte size of an ISF type descriptor, or None when it has none (functions, unknown names)."""
        if depth > MAX_DEPTH:
            raise GuestDataError(f"{self.label}: type descriptors nest deeper than {MAX_DEPTH} (a cycle?)")
        kind = desc.get("kind")
        if kind == "pointer":
            return _int(self.base_types.get("pointer", {"size": 8}).get("size"), f"{self.label}: pointer size")
        if kind == "base":
            base = self.base_types.get(desc.get("name"))
            return _int(base.get("size"), f"{self.label}: base type size") if isinstance(base, Mapping) else None
        if kind == "array":
            inner = self.sizeof(_desc(desc.get("subtype"), self.label), depth + 1)
            return None if inner is None else _int(desc.get("count"), f"{self.label}: array count") * inner
        if kind in ("struct", "union"):
            t = self._struct(str(desc.get("name")))
            return _int(t.get("size"), f"{self.label}: struct size") if t is not None else None
        if kind == "enum":
            e = self.enums.get(desc.get("name"))
            return _int(e.get("size"), f"{self.label}: enum size") if isinstance(e, Mapping) else None
        if kind == "bitfield":
            return self.sizeof(_desc(desc.get("type"), self.label), depth + 1)
        return None


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << 40):
        raise GuestDataError(f"{what}: {value!r} is not a plausible size or offset")
    return value


def _desc(value: Any, label: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise GuestDataError(f"{label}: malformed type descriptor {str(value)[:60]!r}")
    return value


# --- symbol files ------------------------------------------------------------------------------


@dataclass(slots=True)
class SymbolFile:
    """What a `--symbols` file provides: types always, link-time symbols and BTF when it has them."""

    path: Path
    kind: str  # "ISF", "vmlinux (BTF)", "vmlinux (DWARF)", "BTF", "System.map"
    types: TypeSource | None  # None: the guest's BTF in RAM
    symbols: Kallsyms | None = None  # link-time addresses; None: recover kallsyms from guest RAM
    btf: Btf | None = None

    def describe(self) -> str:
        """Return one line saying what the file supplies."""
        syms = f"{len(self.symbols)} symbols" if self.symbols is not None else "kallsyms from RAM"
        types = self.types.label if self.types is not None else "BTF from RAM"
        return f"{self.path.name} ({self.kind}): {types}, {syms}"


def load_symbols(path: str | Path) -> SymbolFile:
    """Load a Volatility 3 ISF (.json, .json.xz), a vmlinux ELF (.BTF or DWARF) or the vmlinuz it ships in,
    a raw BTF blob (/sys/kernel/btf/vmlinux) or a System.map."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(6)
    except OSError as exc:
        raise DetectionError(f"cannot read symbols file {path}: {exc.strerror}") from exc
    if head[:4] == b"\x7fELF":
        return _load_vmlinux(path)
    if _is_bzimage(path):  # a vmlinuz: the vmlinux ELF inside it keeps its .BTF section
        return _load_vmlinux(path, io.BytesIO(extract_vmlinux(path)))
    if head[:2] == b"\x9f\xeb":  # BTF magic 0xEB9F, little-endian
        from nephoscope.os.btf.sources import load_btf

        btf = load_btf(path)
        return SymbolFile(path, "BTF", BtfTypes(btf), None, btf)
    if head[:6] == b"\xfd7zXZ\x00" or head.lstrip()[:1] == b"{":
        return _load_isf(path)
    from nephoscope.os.linux.kallsyms import load_symbol_file as load_map

    return SymbolFile(path, "System.map", None, load_map(path))  # raises unless it has a _text symbol


def read_isf(path: Path) -> dict[str, Any]:
    """Return the parsed ISF JSON at `path` (xz-compressed or plain)."""
    try:
        raw = path.read_bytes()
        if raw[:6] == b"\xfd7zXZ\x00":
            decomp = lzma.LZMADecompressor()
            raw = decomp.decompress(raw, max_length=MAX_ISF_BYTES)
            if not decomp.eof:
                raise DetectionError(f"{path}: decompressed ISF is larger than {MAX_ISF_BYTES} bytes or truncated")
        isf = json.loads(raw)
    except (OSError, lzma.LZMAError, ValueError) as exc:
        raise DetectionError(f"{path}: not a readable Volatility 3 ISF (JSON or .json.xz): {exc}") from exc
    if not isinstance(isf, dict) or not isinstance(isf.get("user_types"), dict):
        raise DetectionError(f"{path}: JSON without ISF user_types; not a Volatility 3 symbol table")
    return isf


def _load_isf(path: Path) -> SymbolFile:
    isf = read_isf(path)
    types = IsfTypes(isf["user_types"], isf.get("base_types") if isinstance(isf.get("base_types"), dict) else {},
                     isf.get("enums") if isinstance(isf.get("enums"), dict) else {}, label=f"ISF {path.name}")
    return SymbolFile(path, "ISF", types, _isf_symbols(isf))


def _isf_symbols(isf: Mapping[str, Any]) -> Kallsyms | None:
    """Return the ISF's symbols as link-time Kallsyms, or None if it has none usable."""
    import numpy as np

    from nephoscope.os.linux.kallsyms import Kallsyms

    rows = []
    symbols = isf.get("symbols")
    for name, sym in (symbols.items() if isinstance(symbols, dict) else ()):
        address = sym.get("address") if isinstance(sym, dict) else None
        if isinstance(name, str) and isinstance(address, int) and 0 < address < (1 << 64):
            rows.append((address, name))
    if not any(name == "_text" for _a, name in rows):
        return None  # types only: kallsyms will come from guest RAM
    rows.sort()
    return Kallsyms(None, [n for _a, n in rows], "?" * len(rows), np.array([a for a, _n in rows], dtype=np.uint64),
                    link_time=True)


def _is_bzimage(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            header = fh.read(0x250)
    except OSError:
        return False
    return len(header) == 0x250 and header[0x202:0x206] == b"HdrS"


def extract_vmlinux(path: str | Path) -> bytes:
    """Return the vmlinux ELF compressed inside a bzImage (vmlinuz), like the kernel's scripts/extract-vmlinux."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", data, 0x206)[0] < 0x208:
        raise DetectionError(f"{path}: not a bzImage with boot protocol 2.08+ (needed to find its payload)")
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start:start + length]
    try:
        if payload[:6] == b"\xfd7zXZ\x00":
            elf = lzma.LZMADecompressor().decompress(payload, max_length=MAX_VMLINUX)
        elif payload[:2] == b"\x1f\x8b":
            elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload, MAX_VMLINUX)
        elif payload[:3] == b"BZh":
            elf = bz2.BZ2Decompressor().decompress(payload, max_length=MAX_VMLINUX)
        elif payload[:4] == b"\x28\xb5\x2f\xfd":
            elf = _unzstd(payload[:-4] if len(payload) > 4 else payload, path)  # the kernel appends the size
        else:
            raise DetectionError(f"{path}: payload compressed in an unsupported format ({payload[:4].hex()})")
    except (lzma.LZMAError, zlib.error, OSError, ValueError) as exc:
        raise DetectionError(f"{path}: cannot decompress the kernel payload: {exc}") from exc
    if elf[:4] != b"\x7fELF":
        raise DetectionError(f"{path}: the decompressed payload is not an ELF vmlinux")
    return elf


def _unzstd(payload: bytes, path: Path) -> bytes:
    import shutil
    import subprocess

    tool = shutil.which("zstd")
    if tool is None:
        raise DetectionError(f"{path}: a zstd-compressed kernel; install zstd (apt-get install zstd)")
    run = subprocess.run([tool, "-dcq"], input=payload, capture_output=True, check=False, timeout=120)
    if run.returncode != 0 or len(run.stdout) > MAX_VMLINUX:
        raise DetectionError(f"{path}: zstd could not decompress the kernel: {run.stderr.decode()[-200:]}")
    return run.stdout


def _load_vmlinux(path: Path, stream: BinaryIO | None = None) -> SymbolFile:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    from nephoscope.os.linux.kallsyms import load_symbol_file as load_elf_symbols

    try:
        with stream if stream is not None else path.open("rb") as fh:
            elf = ELFFile(fh)
            btf_section = elf.get_section_by_name(".BTF")
            btf_blob = bytes(btf_section.data()) if btf_section is not None else None
            has_dwarf = elf.get_section_by_name(".debug_info") is not None
            has_symtab = elf.get_section_by_name(".symtab") is not None
    except (ELFError, OSError) as exc:
        raise DetectionError(f"{path}: not a readable ELF file ({exc})") from exc
    symbols = None
    if has_symtab and stream is None:
        try:
            symbols = load_elf_symbols(path)
        except DetectionError:  # a symbol table without _text (not a vmlinux): kallsyms from RAM
            symbols = None
    if btf_blob is not None:
        from nephoscope.os.btf.reader import Btf

        btf = Btf.parse(btf_blob, label=f"{path.name} .BTF")
        return SymbolFile(path, "vmlinux (BTF)", BtfTypes(btf), symbols, btf)
    if has_dwarf and stream is None:
        from nephoscope.os.linux.dwarf import DwarfTypes

        return SymbolFile(path, "vmlinux (DWARF)", DwarfTypes(path), symbols)
    raise DetectionError(f"{path}: an ELF file with neither a .BTF section nor DWARF (.debug_info); "
                         "use the kernel's -dbg vmlinux or a Volatility 3 ISF")


def open_with_symbols(phys: Phys, path: str | Path, qmp: Any = None) -> LinuxKernel:
    """Return the kernel model of guest-physical `phys` using the types/symbols of file `path` (does not pause)."""
    from nephoscope.os.linux.detect import Stage, detect
    from nephoscope.os.linux.model import LinuxKernel

    source = load_symbols(path)
    det = detect(phys, symbols=source.symbols, want_btf=source.types is None)
    if source.types is not None:
        det.report.stages.append(Stage("types", True, f"from {source.describe()}", 0.0))
    return LinuxKernel(phys, det, qmp=qmp, types=source.types)
