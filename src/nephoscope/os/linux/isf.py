"""Export a Volatility 3 Intermediate Symbol Format (ISF) file from a kernel's BTF and its symbols."""

from __future__ import annotations

import base64
import json
import lzma
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nephoscope import __version__
from nephoscope.core.errors import GuestDataError
from nephoscope.os.btf.reader import MAX_CHAIN, Btf
from nephoscope.os.btf.types import INT_BOOL, Array, Enum, Int, Kind, Member, Struct, Type, Var

ISF_FORMAT = "6.2.0"  # the first format with "anonymous" fields, which kernel structs need
POINTER_SIZE = 8
LINK_TEXT = 0xFFFFFFFF81000000  # x86-64 _text with KASLR off (__START_KERNEL_map + CONFIG_PHYSICAL_START)
CHAR_NAMES = frozenset({"char", "signed char", "unsigned char"})
ENUM_BASES = {(1, False): "unsigned char", (1, True): "signed char", (2, False): "short unsigned int",
              (2, True): "short int", (4, False): "unsigned int", (4, True): "int",
              (8, False): "long long unsigned int", (8, True): "long long int"}
# Types of the data symbols Volatility's Linux plugins read (BTF records types of per-CPU variables only).
SYMBOL_TYPES = {"init_task": "task_struct", "init_mm": "mm_struct", "init_files": "files_struct",
                "init_fs": "fs_struct", "init_nsproxy": "nsproxy", "init_pid_ns": "pid_namespace",
                "init_net": "net", "init_uts_ns": "uts_namespace", "modules": "list_head",
                "init_cred": "cred"}
SYMBOL_BASES = {"page_offset_base": "long unsigned int", "vmemmap_base": "long unsigned int",
                "vmalloc_base": "long unsigned int", "jiffies": "long unsigned int",
                "jiffies_64": "long long unsigned int", "nr_cpu_ids": "unsigned int", "cap_last_cap": "int",
                "nr_threads": "int", "max_pfn": "long unsigned int", "phys_base": "long unsigned int"}


class _Namer:
    """Give every struct, union and enum a unique ISF name (kernel BTF repeats some names)."""

    def __init__(self, btf: Btf) -> None:
        self.btf = btf
        self.names: dict[int, str] = {}
        self.fwd_only: dict[str, str] = {}
        best: dict[tuple[str, str], Type] = {}
        aggregates: list[Type] = []
        for t in btf.iter_types():
            group = _group(t)
            if group is None:
                continue
            aggregates.append(t)
            if t.name and t.kind != Kind.FWD:
                key = (group, t.name)
                prior = best.get(key)
                if prior is None or t.vlen > prior.vlen:
                    best[key] = t
        for t in aggregates:
            group = _group(t)
            assert group is not None
            if t.kind == Kind.FWD:
                if (group, t.name) not in best:
                    self.fwd_only[t.name] = "union" if t.kind_flag else "struct"
                continue
            if not t.name:
                self.names[t.id] = f"unnamed_{t.kind.name.lower()}_{t.id}"
            elif best[(group, t.name)].id == t.id:
                self.names[t.id] = t.name
            else:
                self.names[t.id] = f"{t.name}__{t.id}"

    def name(self, t: Type) -> str:
        return self.names.get(t.id, t.name)


def _group(t: Type) -> str | None:
    if t.kind in (Kind.STRUCT, Kind.UNION) or (t.kind == Kind.FWD and t.name):
        return "user"
    if t.kind in (Kind.ENUM, Kind.ENUM64):
        return "enum"
    return None


class _Exporter:
    """Translate BTF types into ISF dictionaries."""

    def __init__(self, btf: Btf) -> None:
        self.btf = btf
        self.namer = _Namer(btf)
        self.base_types: dict[str, dict[str, Any]] = {
            "pointer": {"size": POINTER_SIZE, "signed": False, "kind": "int", "endian": "little"},
            "void": {"size": 0, "signed": False, "kind": "void", "endian": "little"},
        }
        self.user_types: dict[str, dict[str, Any]] = {}
        self.enums: dict[str, dict[str, Any]] = {}

    def run(self) -> None:
        for t in self.btf.iter_types():
            if isinstance(t, Int) or t.kind == Kind.FLOAT:
                self._base(t)
            elif isinstance(t, Struct):
                self.user_types[self.namer.name(t)] = self._user_type(t)
            elif isinstance(t, Enum):
                self.enums[self.namer.name(t)] = self._enum(t)
        for name, kind in self.namer.fwd_only.items():
            self.user_types.setdefault(name, {"kind": kind, "size": 0, "fields": {}})

    def _base(self, t: Type) -> None:
        if not t.name or t.name in self.base_types:
            return
        if isinstance(t, Int):
            kind = "bool" if t.encoding & INT_BOOL or t.name == "_Bool" else "char" if t.name in CHAR_NAMES else "int"
            signed = t.signed or t.name in ("char", "signed char")
        else:
            kind, signed = "float", True
        self.base_types[t.name] = {"size": t.size, "signed": signed, "kind": kind, "endian": "little"}

    def _enum(self, t: Enum) -> dict[str, Any]:
        base = ENUM_BASES.get((t.size, t.signed), "unsigned int")
        self.base_types.setdefault(base, {"size": t.size if (t.size, t.signed) in ENUM_BASES else 4,
                                          "signed": t.signed, "kind": "int", "endian": "little"})
        return {"size": t.size, "base": base, "constants": dict(t.values)}

    def _user_type(self, t: Struct) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for index, member in enumerate(t.members):
            entry = self._field(member)
            if entry is None:
                continue
            if member.name:
                fields[member.name] = entry
            else:
                fields[f"unnamed_field_{index}"] = entry
        return {"kind": "union" if t.is_union else "struct", "size": t.size, "fields": fields}

    def _field(self, member: Member) -> dict[str, Any] | None:
        target = self.btf.resolve(member.type_id)
        if not member.name:
            if not isinstance(target, Struct):
                return None  # only structs and unions can be anonymous members
            return {"type": self.descriptor(member.type_id), "offset": member.offset, "anonymous": True}
        width, bit = member.bitfield_size, member.bit_offset
        if not width and isinstance(target, Int) and (target.bits_offset or target.nr_bits != target.size * 8):
            width, bit = target.nr_bits, bit + target.bits_offset  # bitfield in pre-kind_flag BTF
        if not width:
            return {"type": self.descriptor(member.type_id), "offset": member.offset}
        unit = max(1, self.btf.sizeof(member.type_id))
        offset = bit // (unit * 8) * unit
        if bit - offset * 8 + width > unit * 8:  # straddles its storage unit (packed struct): use bytes
            offset = bit // 8
        inner = self.descriptor(member.type_id)
        if inner["kind"] not in ("base", "enum"):
            return None
        return {"type": {"kind": "bitfield", "bit_position": bit - offset * 8, "bit_length": width, "type": inner},
                "offset": offset}

    def descriptor(self, type_id: int, depth: int = 0) -> dict[str, Any]:
        """Return the ISF type descriptor of BTF type `type_id`."""
        if depth > MAX_CHAIN:
            raise GuestDataError(f"{self.btf.label}: type {type_id} nests pointers/arrays deeper than {MAX_CHAIN}")
        t = self.btf.resolve(type_id)
        if t.kind == Kind.VOID:
            return {"kind": "base", "name": "void"}
        if isinstance(t, Int) or t.kind == Kind.FLOAT:
            return {"kind": "base", "name": t.name or "int"}
        if t.kind == Kind.PTR:
            return {"kind": "pointer", "subtype": self.descriptor(t.ref, depth + 1)}
        if isinstance(t, Array):
            return {"kind": "array", "count": t.nelems, "subtype": self.descriptor(t.ref, depth + 1)}
        if isinstance(t, Struct):
            return {"kind": "union" if t.is_union else "struct", "name": self.namer.name(t)}
        if isinstance(t, Enum):
            return {"kind": "enum", "name": self.namer.name(t)}
        if t.kind == Kind.FWD:
            return {"kind": "union" if t.kind_flag else "struct", "name": t.name}
        return {"kind": "function"}  # FUNC, FUNC_PROTO; VAR/DATASEC/DECL_TAG are never member types


def kaslr_shift_of(symbols: Mapping[str, int]) -> int:
    """Return the KASLR virtual shift implied by `_text` (0 if absent or not 2 MiB aligned)."""
    text = symbols.get("_text")
    if text is None or (text - LINK_TEXT) % (2 << 20):
        return 0
    return (text - LINK_TEXT) % (1 << 64)


def build_isf(btf: Btf, symbols: Mapping[str, int], banner: str, kaslr_shift: int | None = None) -> dict[str, Any]:
    """Return an ISF dict for `btf` with `symbols` (name → kernel virtual address) and `linux_banner`.

    ISF addresses are link-time, as in System.map: `kaslr_shift` (default: inferred from `_text`) is
    subtracted from every runtime address; Volatility adds its own shift from VMCOREINFO or init_task.
    """
    shift = kaslr_shift_of(symbols) if kaslr_shift is None else kaslr_shift
    if not banner.startswith("Linux version "):
        raise GuestDataError(f"linux_banner {banner[:40]!r} does not start with 'Linux version '; "
                             "pass the banner string read from the kernel")
    exporter = _Exporter(btf)
    exporter.run()
    out_symbols: dict[str, dict[str, Any]] = {
        name: {"address": (int(address) - shift) % (1 << 64)} for name, address in symbols.items()}
    _type_symbols(btf, exporter, out_symbols)
    # the bytes of linux_banner in memory, which Volatility scans for: the text, "\n", NUL
    raw_banner = banner.rstrip("\0").rstrip("\n").encode("utf-8", "replace") + b"\n\0"
    out_symbols["linux_banner"] = {
        "address": (int(symbols["linux_banner"]) - shift) % (1 << 64) if "linux_banner" in symbols else 0,
        "type": {"kind": "array", "count": len(raw_banner), "subtype": {"kind": "base", "name": "char"}},
        "constant_data": base64.b64encode(raw_banner).decode("ascii"),
    }
    exporter.base_types.setdefault("char", {"size": 1, "signed": True, "kind": "char", "endian": "little"})
    return {
        "metadata": {
            "format": ISF_FORMAT,
            "producer": {"name": "nephoscope", "version": __version__},
            "linux": {"symbols": [{"kind": "symtab", "name": "kallsyms"}]},
        },
        "base_types": exporter.base_types,
        "user_types": exporter.user_types,
        "enums": exporter.enums,
        "symbols": out_symbols,
    }


def _type_symbols(btf: Btf, exporter: _Exporter, out: dict[str, dict[str, Any]]) -> None:
    for t in btf.iter_types():
        if isinstance(t, Var) and t.name in out:
            out[t.name]["type"] = exporter.descriptor(t.ref)
    for name, struct_name in SYMBOL_TYPES.items():
        if name in out and struct_name in exporter.user_types:
            out[name]["type"] = {"kind": exporter.user_types[struct_name]["kind"], "name": struct_name}
    for name, base in SYMBOL_BASES.items():
        if name in out and base in exporter.base_types:
            out[name].setdefault("type", {"kind": "base", "name": base})


def write_isf(isf: Mapping[str, Any], path: str | Path) -> Path:
    """Write `isf` as JSON to `path` (xz-compressed when it ends in .xz) and return the path."""
    path = Path(path)
    data = json.dumps(isf, separators=(",", ":"), sort_keys=True).encode()
    if path.suffix == ".xz":
        data = lzma.compress(data, preset=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def export_isf(btf: Btf, symbols: Mapping[str, int], banner: str, path: str | Path,
               kaslr_shift: int | None = None) -> Path:
    """Build the ISF for `btf` + `symbols` + `banner` and write it to `path` (.json or .json.xz)."""
    return write_isf(build_isf(btf, symbols, banner, kaslr_shift), path)
