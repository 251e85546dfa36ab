"""Encode small BTF blobs (for tests and fuzzing): add types, get their ids, then `blob()`."""

from __future__ import annotations

import struct

from nephoscope.os.btf.types import Kind


class BtfBuilder:
    """Append BTF types one by one; ids start at `start_id` (1, or base count + 1 for split BTF)."""

    def __init__(self, start_id: int = 1, str_base: int = 0) -> None:
        self._types = bytearray()
        self._strings = bytearray() if str_base else bytearray(b"\0")
        self._str_offsets: dict[str, int] = {} if str_base else {"": 0}
        self._str_base = str_base
        self.next_id = start_id

    def string(self, text: str) -> int:
        """Return the string-section offset of `text`, adding it if new."""
        if text not in self._str_offsets:
            self._str_offsets[text] = self._str_base + len(self._strings)
            self._strings += text.encode() + b"\0"
        return self._str_offsets[text]

    def raw(self, name: str, kind: int, vlen: int, size_or_type: int, trailer: bytes = b"",
            kind_flag: bool = False) -> int:
        """Append one type record with its trailing bytes; return its id."""
        info = (vlen & 0xFFFF) | ((kind & 0x1F) << 24) | (int(kind_flag) << 31)
        self._types += struct.pack("<III", self.string(name) if name else 0, info, size_or_type) + trailer
        self.next_id += 1
        return self.next_id - 1

    def int(self, name: str, size: int, signed: bool = False, bits: int | None = None) -> int:
        encoding = 1 if signed else 0
        word = (encoding << 24) | (size * 8 if bits is None else bits)
        return self.raw(name, Kind.INT, 0, size, struct.pack("<I", word))

    def ref(self, kind: Kind, ref: int, name: str = "") -> int:
        """Add a PTR, TYPEDEF, CONST, VOLATILE, RESTRICT, TYPE_TAG or FUNC pointing at `ref`."""
        return self.raw(name, kind, 0, ref)

    def array(self, elem: int, index: int, nelems: int) -> int:
        return self.raw("", Kind.ARRAY, 0, 0, struct.pack("<III", elem, index, nelems))

    def struct(self, name: str, size: int, members: list[tuple[str, int, int, int]], union: bool = False) -> int:
        """Add a STRUCT/UNION; members are (name, type id, bit offset, bitfield size)."""
        flag = any(width for _, _, _, width in members)
        trailer = b"".join(struct.pack("<III", self.string(n) if n else 0, t, (w << 24 | off) if flag else off)
                           for n, t, off, w in members)
        return self.raw(name, Kind.UNION if union else Kind.STRUCT, len(members), size, trailer, flag)

    def enum(self, name: str, size: int, values: list[tuple[str, int]], signed: bool = False) -> int:
        trailer = b"".join(struct.pack("<Ii" if signed else "<II", self.string(n), v) for n, v in values)
        return self.raw(name, Kind.ENUM, len(values), size, trailer, signed)

    def enum64(self, name: str, values: list[tuple[str, int]], signed: bool = False) -> int:
        trailer = b"".join(struct.pack("<IQ", self.string(n), v % (1 << 64)) for n, v in values)
        return self.raw(name, Kind.ENUM64, len(values), 8, trailer, signed)

    def func_proto(self, ret: int, params: list[tuple[str, int]]) -> int:
        trailer = b"".join(struct.pack("<II", self.string(n) if n else 0, t) for n, t in params)
        return self.raw("", Kind.FUNC_PROTO, len(params), ret, trailer)

    def var(self, name: str, type_id: int, linkage: int = 0) -> int:
        return self.raw(name, Kind.VAR, 0, type_id, struct.pack("<I", linkage))

    def datasec(self, name: str, size: int, entries: list[tuple[int, int, int]]) -> int:
        trailer = b"".join(struct.pack("<III", *e) for e in entries)
        return self.raw(name, Kind.DATASEC, len(entries), size, trailer)

    def decl_tag(self, name: str, type_id: int, component_idx: int = -1) -> int:
        return self.raw(name, Kind.DECL_TAG, 0, type_id, struct.pack("<i", component_idx))

    def blob(self) -> bytes:
        """Return the encoded BTF blob (header, types, strings)."""
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self._types), len(self._types),
                             len(self._strings))
        return header + bytes(self._types) + bytes(self._strings)
