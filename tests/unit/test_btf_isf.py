"""ISF export: schema-valid for Volatility 3, and Volatility reads back the layouts BTF gave."""

from __future__ import annotations

import base64
import contextlib
import json
import lzma
from pathlib import Path
from typing import Any

import pytest

from nephoscope.core.errors import GuestDataError
from nephoscope.os.btf.build import BtfBuilder
from nephoscope.os.btf.reader import Btf
from nephoscope.os.btf.types import Kind
from nephoscope.os.linux.isf import LINK_TEXT, build_isf, export_isf, kaslr_shift_of, write_isf

HOST_BTF = Path("/sys/kernel/btf/vmlinux")
BANNER = "Linux version 6.1.0-test (x@y) (gcc 12) #1 SMP PREEMPT_DYNAMIC Debian 6.1.1-1 (2026-01-01)"
SHIFT = 0x24800000

# Volatility's schema names a draft-04 style "$schema" URL jsonschema does not know; validation still runs.
pytestmark = pytest.mark.filterwarnings("ignore:The metaschema specified by:DeprecationWarning")


def _btf() -> Btf:
    return Btf.parse(_btf_blob())


def _btf_blob() -> bytes:
    b = BtfBuilder()
    integer = b.int("int", 4, signed=True)
    uint = b.int("unsigned int", 4)
    char = b.int("char", 1)
    boolean = b.raw("_Bool", Kind.INT, 0, 1, (4 << 24 | 8).to_bytes(4, "little"))
    comm = b.array(char, integer, 16)
    anon = b.struct("", 8, [("flags", uint, 0, 0), ("cpu", uint, 32, 0)])
    union = b.struct("", 8, [("", anon, 0, 0), ("raw", b.int("long unsigned int", 8), 0, 0)], union=True)
    enum = b.enum("pid_type", 4, [("PIDTYPE_PID", 0), ("PIDTYPE_TGID", 1)])
    pid_t = b.ref(Kind.TYPEDEF, integer, "pid_t")
    ptr = b.ref(Kind.PTR, b.next_id + 1)  # to task_struct, added next
    task = b.struct("task_struct", 48, [
        ("pid", pid_t, 0, 0),
        ("", union, 64, 0),
        ("on_cpu", uint, 128, 1),
        ("state_bits", uint, 161, 3),
        ("kind", enum, 192, 2),
        ("comm", comm, 224, 0),
        ("real_parent", ptr, 256, 0),
        ("exiting", boolean, 352, 0),
    ])
    assert task == ptr + 1
    b.struct("task_struct", 4, [("dup", integer, 0, 0)])  # kernel BTF repeats a few names
    b.raw("files_struct", Kind.FWD, 0, 0)
    proto = b.func_proto(integer, [("t", ptr)])
    b.raw("do_exit", Kind.FUNC, 1, proto)
    var = b.var("runqueues", integer, 1)
    b.datasec(".data..percpu", 4, [(var, 0, 4)])
    return b.blob()


def _symbols() -> dict[str, int]:
    return {"_text": LINK_TEXT + SHIFT, "init_task": 0xFFFFFFFF82A1AA40 + SHIFT, "runqueues": 0x2C000,
            "linux_banner": 0xFFFFFFFF82161900 + SHIFT, "init_files": 0xFFFFFFFF82B6F840 + SHIFT}


def _schema() -> dict[str, Any]:
    schemas = pytest.importorskip("volatility3.schemas", reason="volatility3 not installed (pip install -e .[dev])")
    return json.loads((Path(schemas.__file__).parent / "schema-6.2.0.json").read_text())


def _validate(isf: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed (pip install -e .[dev])")
    jsonschema.validate(isf, _schema())


def test_isf_layout_of_a_small_kernel() -> None:
    isf = build_isf(_btf(), _symbols(), BANNER)
    _validate(isf)
    task = isf["user_types"]["task_struct"]
    assert task["size"] == 48 and task["kind"] == "struct"
    fields = task["fields"]
    assert fields["pid"] == {"type": {"kind": "base", "name": "int"}, "offset": 0}
    assert fields["comm"]["type"] == {"kind": "array", "count": 16, "subtype": {"kind": "base", "name": "char"}}
    assert fields["comm"]["offset"] == 28
    assert fields["on_cpu"] == {"offset": 16, "type": {"kind": "bitfield", "bit_position": 0, "bit_length": 1,
                                                       "type": {"kind": "base", "name": "unsigned int"}}}
    assert fields["state_bits"]["offset"] == 20 and fields["state_bits"]["type"]["bit_position"] == 1
    assert fields["kind"]["type"]["type"] == {"kind": "enum", "name": "pid_type"}
    assert fields["real_parent"] == {"offset": 32, "type": {"kind": "pointer",
                                                            "subtype": {"kind": "struct", "name": "task_struct"}}}
    anonymous = fields["unnamed_field_1"]
    assert anonymous["anonymous"] is True and anonymous["offset"] == 8
    union_name = anonymous["type"]["name"]
    assert isf["user_types"][union_name]["kind"] == "union"
    assert any(name.startswith("task_struct__") for name in isf["user_types"])  # the duplicate, renamed
    assert isf["user_types"]["files_struct"] == {"kind": "struct", "size": 0, "fields": {}}  # forward only
    assert isf["enums"]["pid_type"] == {"size": 4, "base": "unsigned int",
                                        "constants": {"PIDTYPE_PID": 0, "PIDTYPE_TGID": 1}}
    assert isf["base_types"]["_Bool"]["kind"] == "bool" and isf["base_types"]["char"]["kind"] == "char"
    assert isf["base_types"]["pointer"]["size"] == 8


def test_isf_symbols_are_link_time_with_banner() -> None:
    assert kaslr_shift_of(_symbols()) == SHIFT
    isf = build_isf(_btf(), _symbols(), BANNER + "\n")
    symbols = isf["symbols"]
    assert symbols["init_task"] == {"address": 0xFFFFFFFF82A1AA40, "type": {"kind": "struct", "name": "task_struct"}}
    assert symbols["runqueues"]["type"] == {"kind": "base", "name": "int"}  # typed by its BTF VAR
    assert symbols["init_files"]["type"] == {"kind": "struct", "name": "files_struct"}  # forward-declared only
    assert base64.b64decode(symbols["linux_banner"]["constant_data"]) == BANNER.encode() + b"\n\0"
    assert symbols["linux_banner"]["address"] == 0xFFFFFFFF82161900
    explicit = build_isf(_btf(), _symbols(), BANNER, kaslr_shift=0)
    assert explicit["symbols"]["init_task"]["address"] == 0xFFFFFFFF82A1AA40 + SHIFT
    with pytest.raises(GuestDataError, match="Linux version"):
        build_isf(_btf(), _symbols(), "not a banner")


@pytest.mark.parametrize("suffix", [".json", ".json.xz"])
def test_export_writes_json_and_xz(tmp_path: Path, suffix: str) -> None:
    path = export_isf(_btf(), _symbols(), BANNER, tmp_path / f"kernel{suffix}")
    raw = path.read_bytes()
    data = json.loads(lzma.decompress(raw) if suffix.endswith(".xz") else raw)
    assert data["metadata"]["producer"]["name"] == "nephoscope"
    assert "task_struct" in data["user_types"]


def test_pointer_cycles_are_bounded() -> None:
    b = BtfBuilder()
    b.ref(Kind.PTR, 2)
    b.ref(Kind.PTR, 1)  # pointers to each other: no struct name ever stops the descriptor
    b.struct("task_struct", 8, [("p", 1, 0, 0)])
    with pytest.raises(GuestDataError, match="deeper than"):
        build_isf(Btf.parse(b.blob()), {}, BANNER)


@pytest.mark.skipif(not HOST_BTF.exists(), reason="this host has no /sys/kernel/btf/vmlinux")
def test_host_btf_isf_is_valid_and_volatility_reads_it(tmp_path: Path) -> None:
    btf = Btf.parse(HOST_BTF.read_bytes())
    isf = build_isf(btf, _symbols(), BANNER)
    # jsonschema needs ~40 s for all 10k+ user types; every 25th (and the ones Volatility reads) cover the shapes
    names = sorted(isf["user_types"])
    sample = {n for n in names[::25]} | {"task_struct", "mm_struct", "vm_area_struct", "module"}
    _validate({**isf, "user_types": {n: isf["user_types"][n] for n in sample}})
    path = write_isf(isf, tmp_path / "host.json.xz")
    contexts = pytest.importorskip("volatility3.framework.contexts")
    from volatility3.framework.symbols import intermed

    context = contexts.Context()
    table = intermed.IntermediateSymbolTable(context, config_path="nephoscope", name="k", isf_url=path.as_uri())
    context.symbol_space.append(table)
    for struct_name, member in [("task_struct", "pid"), ("task_struct", "comm"), ("task_struct", "tasks"),
                                ("mm_struct", "pgd"), ("vm_area_struct", "vm_start"), ("module", "name")]:
        ours = btf.get_struct(struct_name).member(member).offset
        theirs = context.symbol_space.get_type(f"k!{struct_name}").relative_child_offset(member)
        assert theirs == ours, f"{struct_name}.{member}: volatility reads {theirs}, BTF says {ours}"
    assert context.symbol_space.get_type("k!task_struct").vol.size == btf.get_struct("task_struct").size


def test_corrupt_btf_exports_or_raises_guest_data_error() -> None:
    import random

    blob = _btf_blob()
    rng = random.Random(99)
    for _round in range(150):
        mutated = bytearray(blob)
        for _flip in range(rng.randint(1, 6)):
            mutated[rng.randrange(24, len(mutated))] = rng.randrange(256)
        with contextlib.suppress(GuestDataError):
            json.dumps(build_isf(Btf.parse(bytes(mutated)), _symbols(), BANNER))
