"""BTF type records: what one decoded BTF type says, kind by kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from nephoscope.core.errors import GuestDataError

if TYPE_CHECKING:
    from nephoscope.os.btf.reader import Btf


class Kind(IntEnum):
    """BTF_KIND_* numbers from the kernel's include/uapi/linux/btf.h."""

    VOID = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Kinds that only qualify or rename another type; resolve() looks through them.
MODIFIERS = frozenset({Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG})

MAX_ANON_DEPTH = 32  # kernel structs nest anonymous unions/structs a few levels deep
MAX_ANON_VISITS = 4096  # bounds the search when hostile BTF fans anonymous members out
INT_SIGNED = 1
INT_CHAR = 2
INT_BOOL = 4


@dataclass(frozen=True, slots=True)
class Type:
    """A decoded BTF type; `ref` is the referenced type id (PTR, TYPEDEF, FUNC, VAR, ...) or 0."""

    id: int
    kind: Kind
    name: str
    size: int = 0
    ref: int = 0
    kind_flag: bool = False
    vlen: int = 0


@dataclass(frozen=True, slots=True)
class Int(Type):
    """An integer (or char/bool) type with its encoding bits."""

    encoding: int = 0
    bits_offset: int = 0
    nr_bits: int = 0

    @property
    def signed(self) -> bool:
        return bool(self.encoding & INT_SIGNED)


@dataclass(frozen=True, slots=True)
class Array(Type):
    """A fixed-length array; `ref` is the element type."""

    index_type: int = 0
    nelems: int = 0


@dataclass(frozen=True, slots=True)
class Member:
    """A struct/union member; offsets are from the start of the outermost struct looked up."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int = 0

    @property
    def offset(self) -> int:
        """Return the byte offset (the byte holding the first bit, for bitfields)."""
        return self.bit_offset // 8


@dataclass(frozen=True, slots=True)
class Struct(Type):
    """A STRUCT or UNION with its members; `member("a.b")` looks through anonymous members."""

    members: tuple[Member, ...] = ()
    btf: Btf | None = field(default=None, repr=False, compare=False)

    @property
    def is_union(self) -> bool:
        return self.kind == Kind.UNION

    def find_member(self, path: str) -> Member | None:
        """Return the member at dotted `path` (through anonymous structs/unions), or None."""
        current: Struct = self
        base = 0
        found: Member | None = None
        for depth, part in enumerate(path.split(".")):
            if depth:
                assert found is not None
                nested = self._struct_of(found.type_id)
                if nested is None:
                    return None
                current, base = nested, found.bit_offset
            hit = current._find_direct(part, base, 0, [MAX_ANON_VISITS])
            if hit is None:
                return None
            found = hit
        return found

    def member(self, path: str) -> Member:
        """Return the member at dotted `path`; raise GuestDataError naming the struct and member."""
        hit = self.find_member(path)
        if hit is None:
            raise GuestDataError(f"BTF struct {self.name or '(anon)'} has no member {path!r}; "
                                 "the kernel version may lay this structure out differently")
        return hit

    def _find_direct(self, name: str, base: int, depth: int, budget: list[int]) -> Member | None:
        budget[0] -= 1
        if depth > MAX_ANON_DEPTH or budget[0] < 0:
            raise GuestDataError(f"BTF struct {self.name or '(anon)'}: anonymous members nest deeper than "
                                 f"{MAX_ANON_DEPTH} or fan out past {MAX_ANON_VISITS} structs (a cycle?)")
        for m in self.members:
            if m.name == name:
                return Member(m.name, m.type_id, base + m.bit_offset, m.bitfield_size)
        for m in self.members:
            if m.name:
                continue
            nested = self._struct_of(m.type_id)
            if nested is not None:
                hit = nested._find_direct(name, base + m.bit_offset, depth + 1, budget)
                if hit is not None:
                    return hit
        return None

    def _struct_of(self, type_id: int) -> Struct | None:
        if self.btf is None:
            return None
        resolved = self.btf.resolve(type_id)
        return resolved if isinstance(resolved, Struct) else None


@dataclass(frozen=True, slots=True)
class Enum(Type):
    """An ENUM or ENUM64 with its (name, value) pairs; kind_flag set means signed."""

    values: tuple[tuple[str, int], ...] = ()

    @property
    def signed(self) -> bool:
        return self.kind_flag


@dataclass(frozen=True, slots=True)
class Param:
    """A FUNC_PROTO parameter (name may be empty; type 0 with no name means varargs)."""

    name: str
    type_id: int


@dataclass(frozen=True, slots=True)
class FuncProto(Type):
    """A function prototype; `ref` is the return type."""

    params: tuple[Param, ...] = ()


@dataclass(frozen=True, slots=True)
class Var(Type):
    """A global or per-CPU variable; `ref` is its type."""

    linkage: int = 0


@dataclass(frozen=True, slots=True)
class SecVar:
    """One DATASEC entry: a VAR (or FUNC) type id, its offset and size in the section."""

    type_id: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Datasec(Type):
    """A data section (e.g. .data..percpu) listing the variables it holds."""

    entries: tuple[SecVar, ...] = ()


@dataclass(frozen=True, slots=True)
class DeclTag(Type):
    """A declaration tag on `ref` (component_idx -1 means the whole declaration)."""

    component_idx: int = -1
