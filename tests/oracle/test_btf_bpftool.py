"""Oracle: our BTF reader prints exactly what `bpftool btf dump file BLOB format raw` prints, type by type."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nephoscope.memory.physical import RawMemory
from nephoscope.os.btf.locate import get_vmlinux_btf
from nephoscope.os.btf.reader import Btf
from nephoscope.os.btf.types import Array, Datasec, DeclTag, Enum, FuncProto, Int, Kind, Struct, Type, Var

HOST_BTF = Path("/sys/kernel/btf/vmlinux")
BPFTOOL = shutil.which("bpftool") or next((p for p in ("/usr/sbin/bpftool", "/sbin/bpftool") if Path(p).exists()), None)
INT_ENCODING = {0: "(none)", 1: "SIGNED", 2: "CHAR", 4: "BOOL"}
LINKAGE = {0: "static", 1: "global", 2: "extern"}

pytestmark = pytest.mark.skipif(BPFTOOL is None, reason="bpftool is not installed (Debian package bpftool; make setup)")


def _name(t: Type) -> str:
    return t.name or "(anon)"


def _lines(btf: Btf, t: Type) -> Iterator[str]:
    """Yield bpftool's raw-format lines for type `t` (bpftool's btf.c dump_btf_type, re-stated)."""
    head = f"[{t.id}] {t.kind.name} '{_name(t)}'"
    if isinstance(t, Int):
        yield (f"{head} size={t.size} bits_offset={t.bits_offset} nr_bits={t.nr_bits} "
               f"encoding={INT_ENCODING.get(t.encoding, 'UNKN')}")
    elif t.kind in (Kind.PTR, Kind.CONST, Kind.VOLATILE, Kind.RESTRICT, Kind.TYPEDEF, Kind.TYPE_TAG):
        yield f"{head} type_id={t.ref}"
    elif isinstance(t, Array):
        yield f"{head} type_id={t.ref} index_type_id={t.index_type} nr_elems={t.nelems}"
    elif isinstance(t, Struct):
        yield f"{head} size={t.size} vlen={t.vlen}"
        for m in t.members:
            width = f" bitfield_size={m.bitfield_size}" if m.bitfield_size else ""
            yield f"\t'{m.name or '(anon)'}' type_id={m.type_id} bits_offset={m.bit_offset}{width}"
    elif isinstance(t, Enum):
        yield f"{head} encoding={'SIGNED' if t.signed else 'UNSIGNED'} size={t.size} vlen={t.vlen}"
        suffix = ("LL" if t.signed else "ULL") if t.kind == Kind.ENUM64 else ""
        for name, value in t.values:
            yield f"\t'{name}' val={value}{suffix}"
    elif t.kind == Kind.FWD:
        yield f"{head} fwd_kind={'union' if t.kind_flag else 'struct'}"
    elif t.kind == Kind.FUNC:
        yield f"{head} type_id={t.ref} linkage={LINKAGE.get(t.vlen, 'UNKN')}"
    elif isinstance(t, FuncProto):
        yield f"{head} ret_type_id={t.ref} vlen={t.vlen}"
        for p in t.params:
            yield f"\t'{p.name or '(anon)'}' type_id={p.type_id}"
    elif isinstance(t, Var):
        yield f"{head} type_id={t.ref}, linkage={LINKAGE.get(t.linkage, 'UNKN')}"
    elif isinstance(t, Datasec):
        yield f"{head} size={t.size} vlen={t.vlen}"
        for e in t.entries:
            target = btf.type(e.type_id)
            yield f"\ttype_id={e.type_id} offset={e.offset} size={e.size} ({target.kind.name} '{_name(target)}')"
    elif t.kind == Kind.FLOAT:
        yield f"{head} size={t.size}"
    elif isinstance(t, DeclTag):
        yield f"{head} type_id={t.ref} component_idx={t.component_idx}"
    else:
        raise AssertionError(f"no bpftool format for {t}")


def _compare(btf: Btf, blob_path: Path) -> None:
    dump = subprocess.run([str(BPFTOOL), "btf", "dump", "file", str(blob_path), "format", "raw"],
                          capture_output=True, text=True, check=True, timeout=300).stdout.splitlines()
    ours = [line for t in btf.iter_types() for line in _lines(btf, t)]
    assert len(btf) > 1000
    # bpftool prints every kind, name, size, member (name, type id, bit offset, bitfield size), value...
    for index, (theirs, mine) in enumerate(zip(dump, ours, strict=False)):
        assert mine == theirs, f"line {index + 1} differs from bpftool:\n  bpftool: {theirs}\n  ours:    {mine}"
    assert len(ours) == len(dump), f"bpftool printed {len(dump)} lines, we printed {len(ours)}"


@pytest.mark.skipif(not HOST_BTF.exists(), reason="this host has no /sys/kernel/btf/vmlinux")
def test_host_vmlinux_btf_matches_bpftool(tmp_path: Path) -> None:
    blob = tmp_path / "vmlinux.btf"
    blob.write_bytes(HOST_BTF.read_bytes())  # a regular file: bpftool stats it
    _compare(Btf.parse(blob.read_bytes()), blob)


@pytest.mark.guest
def test_lab_guest_btf_from_ram_matches_bpftool(clean_guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with RawMemory(clean_guest.ram_path) as memory:
        located = get_vmlinux_btf(memory)
        blob = memory.read(located.gpa, located.size)
    path = tmp_path / "guest-vmlinux.btf"
    path.write_bytes(blob)
    _compare(Btf.parse(blob), path)
    assert located.btf.get_struct("task_struct").size == Btf.parse(blob).get_struct("task_struct").size
