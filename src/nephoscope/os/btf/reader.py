"""Parse a raw BTF blob: index every type in one pass, decode each type on demand."""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator

from nephoscope.core.errors import GuestDataError
from nephoscope.os.btf.types import (
    MODIFIERS,
    Array,
    Datasec,
    DeclTag,
    Enum,
    FuncProto,
    Int,
    Kind,
    Member,
    Param,
    SecVar,
    Struct,
    Type,
    Var,
)

MAGIC = 0xEB9F
HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
MAX_BLOB = 64 << 20
MAX_HDR_LEN = 4096
MAX_CHAIN = 256  # longest typedef/const/array chain we follow before calling it a cycle

_U32 = struct.Struct("<I")
_TYPE = struct.Struct("<III")
_PAIR = struct.Struct("<Ii")
_TRIPLE = struct.Struct("<III")

# Bytes after the 12-byte common header: (fixed, per vlen entry), indexed by kind; None = unknown kind.
_TRAILER: list[tuple[int, int] | None] = [None] * 32
for _kind, _extra in {
    Kind.INT: (4, 0), Kind.PTR: (0, 0), Kind.ARRAY: (12, 0), Kind.STRUCT: (0, 12), Kind.UNION: (0, 12),
    Kind.ENUM: (0, 8), Kind.FWD: (0, 0), Kind.TYPEDEF: (0, 0), Kind.VOLATILE: (0, 0), Kind.CONST: (0, 0),
    Kind.RESTRICT: (0, 0), Kind.FUNC: (0, 0), Kind.FUNC_PROTO: (0, 8), Kind.VAR: (4, 0),
    Kind.DATASEC: (0, 12), Kind.FLOAT: (0, 0), Kind.DECL_TAG: (4, 0), Kind.TYPE_TAG: (0, 0),
    Kind.ENUM64: (0, 12),
}.items():
    _TRAILER[_kind] = _extra

_VOID = Type(0, Kind.VOID, "void")


class Btf:
    """A parsed BTF blob (vmlinux, or split module BTF on top of a `base`)."""

    def __init__(self, types: bytes, strings: bytes, offsets: array, base: Btf | None, label: str) -> None:
        self._types = types
        self._strings = strings
        self._offsets = offsets
        self._cache: dict[int, Type] = {}
        self._by_name: dict[str, list[int]] | None = None
        self._all: list[Type] | None = None
        self.base = base
        self.label = label
        self.start_id = base.count if base is not None else 1
        self._str_base = base._str_base + len(base._strings) if base is not None else 0

    @classmethod
    def parse(cls, blob: bytes | bytearray | memoryview, base: Btf | None = None, label: str = "BTF") -> Btf:
        """Parse a BTF blob (split BTF needs its `base`); raise GuestDataError if it is malformed."""
        data = bytes(blob)
        if len(data) < HEADER.size:
            raise GuestDataError(f"{label}: {len(data)} bytes is too short for a BTF header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = HEADER.unpack_from(data)
        if magic != MAGIC:
            hint = " (big-endian BTF is not supported)" if magic == 0x9FEB else ""
            raise GuestDataError(f"{label}: bad BTF magic {magic:#06x}{hint}")
        if version != 1:
            raise GuestDataError(f"{label}: unsupported BTF version {version}")
        if not HEADER.size <= hdr_len <= MAX_HDR_LEN or hdr_len % 4:
            raise GuestDataError(f"{label}: implausible BTF header length {hdr_len}")
        total = hdr_len + max(type_off + type_len, str_off + str_len)
        if total > MAX_BLOB or total > len(data):
            raise GuestDataError(f"{label}: BTF sections end at {total} bytes but the blob has {len(data)}")
        if type_off % 4 or type_len % 4:
            raise GuestDataError(f"{label}: BTF type section is not 4-byte aligned")
        if type_off < str_off < type_off + type_len or str_off < type_off < str_off + str_len:
            raise GuestDataError(f"{label}: BTF type and string sections overlap")
        types = data[hdr_len + type_off:hdr_len + type_off + type_len]
        strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        if base is None and (not strings or strings[0] != 0):
            raise GuestDataError(f"{label}: BTF string section must start with an empty string")
        if strings and strings[-1] != 0:
            raise GuestDataError(f"{label}: BTF string section is not NUL-terminated")
        return cls(types, strings, _index(types, label), base, label)

    # -- size and lookup ----------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Return one more than the highest type id (ids start at 1; 0 is void)."""
        return self.start_id + len(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets)

    def type(self, type_id: int) -> Type:
        """Return type `type_id` (0 is void); raise GuestDataError if the id is out of range."""
        if type_id == 0:
            return _VOID
        if type_id < self.start_id:
            assert self.base is not None
            return self.base.type(type_id)
        cached = self._cache.get(type_id)
        if cached is not None:
            return cached
        if type_id >= self.count or type_id < 0:
            raise GuestDataError(f"{self.label}: type id {type_id} is out of range (have {self.count - 1})")
        decoded = self._decode(type_id, self._offsets[type_id - self.start_id])
        self._cache[type_id] = decoded
        return decoded

    def resolve(self, type_id: int) -> Type:
        """Return the type behind typedef/const/volatile/restrict/type_tag chains starting at `type_id`."""
        current = self.type(type_id)
        for _ in range(MAX_CHAIN):
            if current.kind not in MODIFIERS:
                return current
            current = self.type(current.ref)
        raise GuestDataError(f"{self.label}: type {type_id} is a modifier chain longer than {MAX_CHAIN} "
                             "(a cycle in guest BTF)")

    def sizeof(self, type_id: int) -> int:
        """Return the size in bytes of `type_id` (pointers are 8; functions and void are 0)."""
        count = 1
        current = self.resolve(type_id)
        for _ in range(MAX_CHAIN):
            if isinstance(current, Array):
                count *= current.nelems
                current = self.resolve(current.ref)
                continue
            if current.kind == Kind.PTR:
                return count * 8
            if current.kind in (Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.FLOAT,
                                Kind.DATASEC):
                return count * current.size
            if current.kind == Kind.VAR:
                current = self.resolve(current.ref)
                continue
            return 0
        raise GuestDataError(f"{self.label}: type {type_id} nests arrays deeper than {MAX_CHAIN} (a cycle?)")

    def find_by_name(self, name: str, kinds: frozenset[Kind] | None = None) -> Type | None:
        """Return the first type called `name` (of one of `kinds` if given), or None."""
        for type_id in self._names().get(name, ()):
            found = self.type(type_id)
            if kinds is None or found.kind in kinds:
                return found
        if self.base is not None:
            return self.base.find_by_name(name, kinds)
        return None

    def find_struct(self, name: str) -> Struct | None:
        """Return the STRUCT or UNION called `name` with the most members (skipping empty forwards), or None."""
        best: Struct | None = None
        for type_id in self._names().get(name, ()):
            found = self.type(type_id)
            if isinstance(found, Struct) and (best is None or len(found.members) > len(best.members)):
                best = found
        if best is None and self.base is not None:
            return self.base.find_struct(name)
        return best

    def get_struct(self, name: str) -> Struct:
        """Return the STRUCT or UNION called `name`; raise GuestDataError naming it if absent."""
        found = self.find_struct(name)
        if found is None:
            raise GuestDataError(f"{self.label}: no struct {name!r} in the kernel's BTF; this kernel may not "
                                 "have it or the BTF blob is not vmlinux BTF")
        return found

    def iter_types(self) -> Iterator[Type]:
        """Yield every type of this blob (not its base) in id order, decoding each (once)."""
        if self._all is None:
            self._all = [self.type(type_id) for type_id in range(self.start_id, self.count)]
        yield from self._all

    def name_of(self, name_off: int) -> str:
        """Return the string at `name_off` of the (base + own) string section."""
        if name_off < self._str_base:
            assert self.base is not None
            return self.base.name_of(name_off)
        local = name_off - self._str_base
        if local >= len(self._strings):
            raise GuestDataError(f"{self.label}: string offset {name_off} is past the string section")
        end = self._strings.find(b"\0", local)
        return self._strings[local:end].decode("utf-8", "backslashreplace")

    # -- internals ----------------------------------------------------------------------------------

    def _names(self) -> dict[str, list[int]]:
        if self._by_name is None:
            self._by_name = _name_index(self)
        return self._by_name

    def _decode(self, type_id: int, off: int) -> Type:
        name_off, info, size_or_type = _TYPE.unpack_from(self._types, off)
        kind = Kind((info >> 24) & 0x1F)
        vlen = info & 0xFFFF
        flag = bool(info >> 31)
        name = self.name_of(name_off) if name_off else ""
        body = off + 12
        raw = self._types
        if kind == Kind.INT:
            word = _U32.unpack_from(raw, body)[0]
            return Int(type_id, kind, name, size_or_type, 0, flag, vlen,
                       (word >> 24) & 0x0F, (word >> 16) & 0xFF, word & 0xFF)
        if kind == Kind.ARRAY:
            elem, index, nelems = _TRIPLE.unpack_from(raw, body)
            return Array(type_id, kind, name, 0, elem, flag, vlen, index, nelems)
        if kind in (Kind.STRUCT, Kind.UNION):
            members = []
            for i in range(vlen):
                m_name, m_type, m_off = _TRIPLE.unpack_from(raw, body + 12 * i)
                bits, width = (m_off & 0xFFFFFF, m_off >> 24) if flag else (m_off, 0)
                members.append(Member(self.name_of(m_name) if m_name else "", m_type, bits, width))
            return Struct(type_id, kind, name, size_or_type, 0, flag, vlen, tuple(members), self)
        if kind == Kind.ENUM:
            values = []
            for i in range(vlen):
                v_name, v_val = _PAIR.unpack_from(raw, body + 8 * i)
                values.append((self.name_of(v_name), v_val if flag else v_val & 0xFFFFFFFF))
            return Enum(type_id, kind, name, size_or_type, 0, flag, vlen, tuple(values))
        if kind == Kind.ENUM64:
            values = []
            for i in range(vlen):
                v_name, lo, hi = _TRIPLE.unpack_from(raw, body + 12 * i)
                value = (hi << 32) | lo
                if flag and value >> 63:
                    value -= 1 << 64
                values.append((self.name_of(v_name), value))
            return Enum(type_id, kind, name, size_or_type, 0, flag, vlen, tuple(values))
        if kind == Kind.FUNC_PROTO:
            params = tuple(Param(self.name_of(p_name) if p_name else "", p_type)
                           for p_name, p_type in (_PAIR.unpack_from(raw, body + 8 * i) for i in range(vlen)))
            return FuncProto(type_id, kind, name, 0, size_or_type, flag, vlen, params)
        if kind == Kind.VAR:
            return Var(type_id, kind, name, 0, size_or_type, flag, vlen, _U32.unpack_from(raw, body)[0])
        if kind == Kind.DATASEC:
            entries = tuple(SecVar(*_TRIPLE.unpack_from(raw, body + 12 * i)) for i in range(vlen))
            return Datasec(type_id, kind, name, size_or_type, 0, flag, vlen, entries)
        if kind == Kind.DECL_TAG:
            return DeclTag(type_id, kind, name, 0, size_or_type, flag, vlen, struct.unpack_from("<i", raw, body)[0])
        if kind in (Kind.FLOAT,):
            return Type(type_id, kind, name, size_or_type, 0, flag, vlen)
        if kind == Kind.FWD:
            return Type(type_id, kind, name, 0, 0, flag, vlen)
        return Type(type_id, kind, name, 0, size_or_type, flag, vlen)  # PTR, FUNC, modifiers


def _index(types: bytes, label: str) -> array:
    """Return the byte offset of every type record; check each record fits and has a known kind."""
    offsets = array("I")
    append = offsets.append
    unpack = _U32.unpack_from
    trailer = _TRAILER
    end = len(types)
    off = 0
    while off < end:
        if off + 12 > end:
            raise GuestDataError(f"{label}: BTF type record at {off} is truncated")
        info = unpack(types, off + 4)[0]
        extra = trailer[(info >> 24) & 0x1F]
        if extra is None:
            raise GuestDataError(f"{label}: unknown BTF kind {(info >> 24) & 0x1F} at type offset {off}")
        append(off)
        off += 12 + extra[0] + (info & 0xFFFF) * extra[1]
    if off != end:
        raise GuestDataError(f"{label}: last BTF type record runs {off - end} bytes past the type section")
    return offsets


def _name_index(btf: Btf) -> dict[str, list[int]]:
    """Map every non-empty type name of `btf` (not its base) to its type ids."""
    index: dict[str, list[int]] = {}
    raw, strings, str_base = btf._types, btf._strings, btf._str_base
    unpack = _U32.unpack_from
    limit = len(strings)
    for type_id, off in enumerate(btf._offsets, btf.start_id):
        name_off = unpack(raw, off)[0]
        if not name_off:
            continue
        local = name_off - str_base
        if not 0 <= local < limit:
            name = btf.name_of(name_off)  # in the base, or out of range (raises)
        else:
            name = strings[local:strings.find(b"\0", local)].decode("utf-8", "backslashreplace")
        index.setdefault(name, []).append(type_id)
    return index
