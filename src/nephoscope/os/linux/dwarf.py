"""Struct layouts from a vmlinux's DWARF (pyelftools), converted on demand to ISF-shaped records.

Only what the kernel model asks for is converted: the first pass records where each named struct or
union is defined (top-level DIEs of each compile unit, skipping declarations), and a struct's members
are read when the model looks at it. A full distribution vmlinux has thousands of compile units, so the
first pass takes a while in pure Python; a Volatility 3 ISF (`nephoscope isf`, dwarf2json) is faster.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nephoscope.core.errors import DetectionError, GuestDataError
from nephoscope.os.linux.symbols import MAX_DEPTH, IsfTypes

AGGREGATES = {"DW_TAG_structure_type": "struct", "DW_TAG_union_type": "union"}
MODIFIERS = frozenset({"DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type", "DW_TAG_restrict_type",
                       "DW_TAG_atomic_type", "DW_TAG_immutable_type", "DW_TAG_packed_type"})
MAX_FIELDS = 1 << 14


def _name(die: Any) -> str | None:
    attr = die.attributes.get("DW_AT_name")
    if attr is None:
        return None
    value = attr.value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _const(die: Any, name: str) -> int | None:
    attr = die.attributes.get(name)
    if attr is None:
        return None
    value = attr.value
    if isinstance(value, int):
        return value
    if isinstance(value, list) and len(value) == 2 and value[0] == 0x23:  # DW_OP_plus_uconst N (DWARF 2/3)
        return int(value[1])
    return None


class _UserTypes(Mapping[str, Any]):
    """ISF `user_types` read from DWARF: named structs by name, anonymous ones as "unnamed_<DIE offset>"."""

    def __init__(self, dwarf: Any) -> None:
        self._dwarf = dwarf
        self._index: dict[str, Any] | None = None
        self._enum_index: dict[str, Any] = {}
        self._anonymous: dict[str, Any] = {}
        self._done: dict[str, dict[str, Any]] = {}
        self.base_types: dict[str, dict[str, Any]] = {"pointer": {"size": 8, "signed": False, "kind": "int",
                                                                  "endian": "little"}}
        self.enums: dict[str, dict[str, Any]] = {}

    def _names(self) -> dict[str, Any]:
        if self._index is None:
            index: dict[str, Any] = {}
            for cu in self._dwarf.iter_CUs():
                for die in cu.get_top_DIE().iter_children():
                    if "DW_AT_declaration" in die.attributes:
                        continue
                    name = _name(die)
                    if not name:
                        continue
                    if die.tag in AGGREGATES:
                        index.setdefault(name, die)
                    elif die.tag == "DW_TAG_enumeration_type":
                        self._enum_index.setdefault(name, die)
            self._index = index
        return self._index

    def __getitem__(self, name: str) -> dict[str, Any]:
        done = self._done.get(name)
        if done is not None:
            return done
        die = self._anonymous.get(name) or self._names().get(name)
        if die is None:
            raise KeyError(name)
        self._done[name] = converted = self._aggregate(die)
        return converted

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def enum_constants(self, name: str) -> dict[str, int] | None:
        """Return the enumerators of the enum called `name` in some compile unit, or None."""
        self._names()
        die = self._enum_index.get(name)
        if die is None:
            return None
        values: dict[str, int] = {}
        for child in die.iter_children():
            value = child.attributes.get("DW_AT_const_value")
            if child.tag == "DW_TAG_enumerator" and _name(child) and value is not None \
                    and isinstance(value.value, int):
                values[_name(child)] = value.value  # type: ignore[index]
        return values

    def _aggregate(self, die: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for index, child in enumerate(die.iter_children()):
            if child.tag != "DW_TAG_member":
                continue
            if len(fields) >= MAX_FIELDS:
                raise GuestDataError(f"DWARF struct {_name(die)}: more than {MAX_FIELDS} members")
            fields[_name(child) or f"unnamed_field_{index}"] = self._field(child)
        return {"kind": AGGREGATES[die.tag], "size": _const(die, "DW_AT_byte_size") or 0, "fields": fields}

    def _field(self, member: Any) -> dict[str, Any]:
        desc = self.descriptor(member.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in member.attributes
                               else None)
        offset = _const(member, "DW_AT_data_member_location") or 0
        bit_offset = _const(member, "DW_AT_data_bit_offset")
        bits = _const(member, "DW_AT_bit_size")
        entry: dict[str, Any] = {"type": desc, "offset": offset}
        if bits is not None:
            start = bit_offset if bit_offset is not None else offset * 8
            entry = {"offset": start // 8, "type": {"kind": "bitfield", "bit_position": start % 8,
                                                     "bit_length": bits, "type": desc}}
        if _name(member) is None:
            entry["anonymous"] = True
        return entry

    def descriptor(self, die: Any, depth: int = 0) -> dict[str, Any]:
        """Return the ISF type descriptor of type DIE `die` (None: void)."""
        if depth > MAX_DEPTH:
            raise GuestDataError(f"DWARF type chain deeper than {MAX_DEPTH} (a cycle?)")
        while die is not None and die.tag in MODIFIERS:
            die = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None
            depth += 1
            if depth > MAX_DEPTH:
                raise GuestDataError(f"DWARF typedef chain deeper than {MAX_DEPTH} (a cycle?)")
        if die is None:
            return {"kind": "base", "name": "void"}
        tag = die.tag
        if tag == "DW_TAG_pointer_type":
            target = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None
            return {"kind": "pointer", "subtype": self._named_only(target)}
        if tag == "DW_TAG_base_type":
            name = _name(die) or "int"
            self.base_types.setdefault(name, {"size": _const(die, "DW_AT_byte_size") or 0, "signed": True,
                                              "kind": "int", "endian": "little"})
            return {"kind": "base", "name": name}
        if tag == "DW_TAG_array_type":
            inner = self.descriptor(die.get_DIE_from_attribute("DW_AT_type"), depth + 1)
            counts = []
            for sub in die.iter_children():
                if sub.tag != "DW_TAG_subrange_type":
                    continue
                count = _const(sub, "DW_AT_count")
                upper = _const(sub, "DW_AT_upper_bound")
                counts.append(count if count is not None else (upper + 1 if upper is not None else 0))
            for count in reversed(counts or [0]):
                inner = {"kind": "array", "count": count, "subtype": inner}
            return inner
        if tag in AGGREGATES:
            name = _name(die)
            if name is None or "DW_AT_declaration" in die.attributes:
                if name is None:
                    name = f"unnamed_{die.offset}"
                    self._anonymous[name] = die
                else:
                    self._names()  # a declaration: the definition lives in some compile unit
            return {"kind": AGGREGATES[tag], "name": name}
        if tag == "DW_TAG_enumeration_type":
            name = _name(die) or f"unnamed_enum_{die.offset}"
            self.enums.setdefault(name, {"size": _const(die, "DW_AT_byte_size") or 4, "base": "int", "constants": {}})
            return {"kind": "enum", "name": name}
        return {"kind": "function"}

    def _named_only(self, die: Any) -> dict[str, Any]:
        """Return a pointer target's descriptor without converting it (a pointer's size does not depend on it)."""
        while die is not None and die.tag in MODIFIERS:
            die = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None
        if die is None:
            return {"kind": "base", "name": "void"}
        if die.tag in AGGREGATES and _name(die):
            return {"kind": AGGREGATES[die.tag], "name": _name(die)}
        return {"kind": "function"} if die.tag == "DW_TAG_subroutine_type" else {"kind": "base", "name": "void"}


class DwarfTypes(IsfTypes):
    """A TypeSource over the DWARF of an ELF file (a vmlinux with debug info); converts structs on demand."""

    def __init__(self, path: str | Path) -> None:
        from elftools.common.exceptions import DWARFError, ELFError
        from elftools.elf.elffile import ELFFile

        self.path = Path(path)
        try:
            self._stream = self.path.open("rb")
            elf = ELFFile(self._stream)
            if not elf.has_dwarf_info():
                raise DetectionError(f"{path}: no DWARF debug information")
            dwarf = elf.get_dwarf_info()
        except (ELFError, DWARFError, OSError) as exc:
            raise DetectionError(f"{path}: cannot read DWARF ({exc})") from exc
        self._types = user_types = _UserTypes(dwarf)
        super().__init__(user_types, user_types.base_types, user_types.enums, label=f"DWARF of {self.path.name}")

    def has_struct(self, name: str) -> bool:
        """Return whether some compile unit defines struct or union `name`."""
        return self._guard(lambda: super(DwarfTypes, self).has_struct(name))

    def find_member(self, struct: str, path: str) -> tuple[int, Mapping[str, Any]] | None:
        """Return (byte offset, ISF descriptor) of member `path` of `struct`, converting DIEs on first use."""
        return self._guard(lambda: super(DwarfTypes, self).find_member(struct, path))

    def enum_values(self, name: str) -> dict[str, int] | None:
        """Return the constants of enum `name` from DWARF, or None."""
        return self._guard(lambda: self._types.enum_constants(name))  # type: ignore[no-any-return]

    def _guard(self, fn: Any) -> Any:
        from elftools.common.exceptions import DWARFError, ELFError

        try:
            return fn()
        except (DWARFError, ELFError, KeyError, IndexError, ValueError, AttributeError) as exc:
            raise DetectionError(f"{self.path}: malformed DWARF ({type(exc).__name__}: {exc})") from exc
