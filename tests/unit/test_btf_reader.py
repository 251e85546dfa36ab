"""BTF reader: every kind, bitfields, anonymous members, split BTF, and hostile blobs."""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from nephoscope.core.errors import GuestDataError
from nephoscope.os.btf.build import BtfBuilder
from nephoscope.os.btf.layout import member_offsets
from nephoscope.os.btf.reader import Btf
from nephoscope.os.btf.sources import extract_elf_btf, load_btf
from nephoscope.os.btf.types import Array, Datasec, DeclTag, Enum, FuncProto, Int, Kind, Struct, Var

HOST_BTF = Path("/sys/kernel/btf/vmlinux")


def _kernelish() -> tuple[BtfBuilder, dict[str, int]]:
    """Build a blob shaped like kernel BTF: typedefs, anonymous unions, bitfields, every kind."""
    b = BtfBuilder()
    ids: dict[str, int] = {}
    ids["int"] = b.int("int", 4, signed=True)
    ids["uint"] = b.int("unsigned int", 4)
    ids["char"] = b.int("char", 1)
    ids["ulong"] = b.int("long unsigned int", 8)
    ids["pid_t"] = b.ref(Kind.TYPEDEF, ids["int"], "pid_t")
    ids["const_pid"] = b.ref(Kind.CONST, ids["pid_t"])
    ids["vol"] = b.ref(Kind.VOLATILE, ids["const_pid"])
    ids["comm"] = b.array(ids["char"], ids["int"], 16)
    ids["list_head"] = b.struct("list_head", 16, [("next", 0, 0, 0), ("prev", 0, 64, 0)])
    ids["anon_inner"] = b.struct("", 8, [("x", ids["uint"], 0, 0), ("y", ids["uint"], 32, 0)])
    ids["anon_union"] = b.struct("", 8, [("flags", ids["ulong"], 0, 0), ("", ids["anon_inner"], 0, 0)], union=True)
    ids["task"] = b.struct("task_struct", 64, [
        ("__state", ids["uint"], 0, 0),
        ("", ids["anon_union"], 64, 0),
        ("tasks", ids["list_head"], 128, 0),
        ("pid", ids["vol"], 256, 0),
        ("on_rq", ids["uint"], 288, 1),
        ("in_iowait", ids["uint"], 289, 3),
        ("comm", ids["comm"], 320, 0),
    ])
    ids["ptr_task"] = b.ref(Kind.PTR, ids["task"])
    ids["fwd"] = b.raw("mm_struct", Kind.FWD, 0, 0)
    ids["enum"] = b.enum("pid_type", 4, [("PIDTYPE_PID", 0), ("PIDTYPE_MAX", 4)])
    ids["senum"] = b.enum("", 4, [("NEG", -1)], signed=True)
    ids["enum64"] = b.enum64("big", [("HUGE", 1 << 40), ("TOP", (1 << 64) - 1)])
    ids["senum64"] = b.enum64("sbig", [("M", -2)], signed=True)
    ids["proto"] = b.func_proto(ids["int"], [("t", ids["ptr_task"]), ("", 0)])
    ids["func"] = b.raw("do_exit", Kind.FUNC, 1, ids["proto"])
    ids["var"] = b.var("runqueues", ids["ulong"], 1)
    ids["sec"] = b.datasec(".data..percpu", 8, [(ids["var"], 0, 8)])
    ids["float"] = b.raw("double", Kind.FLOAT, 0, 8)
    ids["tag"] = b.decl_tag("bpf_kfunc", ids["func"], -1)
    ids["type_tag"] = b.ref(Kind.TYPE_TAG, ids["task"], "user")
    ids["restrict"] = b.ref(Kind.RESTRICT, ids["type_tag"])
    return b, ids


@pytest.fixture(scope="module")
def kernelish() -> tuple[Btf, dict[str, int]]:
    b, ids = _kernelish()
    return Btf.parse(b.blob()), ids


def test_every_kind_decodes(kernelish: tuple[Btf, dict[str, int]]) -> None:
    btf, ids = kernelish
    assert len(btf) == len(ids) and btf.count == len(ids) + 1
    integer = btf.type(ids["int"])
    assert isinstance(integer, Int) and integer.signed and integer.nr_bits == 32 and integer.size == 4
    arr = btf.type(ids["comm"])
    assert isinstance(arr, Array) and arr.nelems == 16 and arr.ref == ids["char"] and arr.index_type == ids["int"]
    assert btf.type(ids["fwd"]).kind == Kind.FWD and btf.type(ids["fwd"]).name == "mm_struct"
    enum = btf.type(ids["enum"])
    assert isinstance(enum, Enum) and enum.values == (("PIDTYPE_PID", 0), ("PIDTYPE_MAX", 4))
    assert btf.type(ids["senum"]).values == (("NEG", -1),)  # type: ignore[attr-defined]
    assert btf.type(ids["enum64"]).values == (("HUGE", 1 << 40), ("TOP", (1 << 64) - 1))  # type: ignore[attr-defined]
    assert btf.type(ids["senum64"]).values == (("M", -2),)  # type: ignore[attr-defined]
    proto = btf.type(ids["proto"])
    assert isinstance(proto, FuncProto) and proto.ref == ids["int"] and [p.name for p in proto.params] == ["t", ""]
    func = btf.type(ids["func"])
    assert func.kind == Kind.FUNC and func.ref == ids["proto"] and func.vlen == 1  # vlen is linkage
    var = btf.type(ids["var"])
    assert isinstance(var, Var) and var.linkage == 1 and var.ref == ids["ulong"]
    sec = btf.type(ids["sec"])
    assert isinstance(sec, Datasec) and sec.entries[0].type_id == ids["var"] and sec.size == 8
    assert btf.type(ids["float"]).size == 8
    tag = btf.type(ids["tag"])
    assert isinstance(tag, DeclTag) and tag.component_idx == -1 and tag.ref == ids["func"]
    assert btf.type(0).kind == Kind.VOID
    assert [t.id for t in btf.iter_types()] == list(range(1, btf.count))


def test_resolve_and_sizeof(kernelish: tuple[Btf, dict[str, int]]) -> None:
    btf, ids = kernelish
    assert btf.resolve(ids["vol"]).id == ids["int"]
    assert btf.resolve(ids["restrict"]).id == ids["task"]
    assert btf.sizeof(ids["vol"]) == 4
    assert btf.sizeof(ids["comm"]) == 16
    assert btf.sizeof(ids["ptr_task"]) == 8
    assert btf.sizeof(ids["task"]) == 64
    assert btf.sizeof(ids["var"]) == 8
    assert btf.sizeof(ids["proto"]) == 0


def test_struct_members_through_anonymous_unions(kernelish: tuple[Btf, dict[str, int]]) -> None:
    btf, _ = kernelish
    task = btf.get_struct("task_struct")
    assert isinstance(task, Struct) and task.size == 64
    assert task.member("pid").offset == 32
    assert task.member("flags").offset == 8  # inside the anonymous union
    assert task.member("y").offset == 12  # inside an anonymous struct inside the anonymous union
    assert task.member("tasks.prev").offset == 24
    on_rq, iowait = task.member("on_rq"), task.member("in_iowait")
    assert (on_rq.bit_offset, on_rq.bitfield_size, on_rq.offset) == (288, 1, 36)
    assert (iowait.bit_offset, iowait.bitfield_size) == (289, 3)
    assert task.find_member("nope") is None and task.find_member("tasks.nope") is None
    assert task.find_member("pid.x") is None  # pid is not a struct
    with pytest.raises(GuestDataError, match=r"task_struct has no member 'tasks\.nope'"):
        task.member("tasks.nope")
    assert btf.find_struct("mm_struct") is None  # a FWD is not a struct
    with pytest.raises(GuestDataError, match="no struct 'mm_struct'"):
        btf.get_struct("mm_struct")
    assert btf.find_by_name("pid_t").kind == Kind.TYPEDEF  # type: ignore[union-attr]


def test_member_offsets_names_every_missing_member(kernelish: tuple[Btf, dict[str, int]]) -> None:
    btf, _ = kernelish
    layout = member_offsets(btf, {"task_struct": ["pid", "comm", "tasks.next", "mm?"], "list_head": ["next"]})
    assert layout["task_struct"]["comm"].offset == 40 and "mm" not in layout["task_struct"]
    with pytest.raises(GuestDataError) as err:
        member_offsets(btf, {"task_struct": ["pid", "mm", "cred"], "vm_area_struct": ["vm_start"]},
                       kernel="6.1.0-test")
    assert "kernel 6.1.0-test" in str(err.value)
    assert "task_struct.mm" in str(err.value) and "task_struct.cred" in str(err.value)
    assert "struct vm_area_struct" in str(err.value)


def test_split_btf_on_a_base(kernelish: tuple[Btf, dict[str, int]]) -> None:
    base, ids = kernelish
    b = BtfBuilder(start_id=base.count, str_base=len(base._strings))
    module = b.struct("e1000_adapter", 16, [("task", ids["ptr_task"], 0, 0), ("id", ids["int"], 64, 0)])
    split = Btf.parse(b.blob(), base=base, label="e1000 BTF")
    assert split.start_id == base.count and split.type(module).name == "e1000_adapter"
    assert split.get_struct("e1000_adapter").member("id").offset == 8
    assert split.get_struct("task_struct").id == ids["task"]  # found in the base
    assert split.type(ids["int"]).name == "int"
    with pytest.raises(GuestDataError, match="must start with an empty string"):
        Btf.parse(b.blob())  # split BTF cannot stand alone


@pytest.mark.parametrize("mutate, message", [
    (lambda blob: blob[:10], "too short"),
    (lambda blob: b"\xeb\x9f" + blob[2:], "big-endian"),
    (lambda blob: b"\x00\x00" + blob[2:], "bad BTF magic"),
    (lambda blob: blob[:2] + b"\x02" + blob[3:], "version 2"),
    (lambda blob: blob[:4] + struct.pack("<I", 1 << 30) + blob[8:], "header length"),
    (lambda blob: blob[:12] + struct.pack("<I", 0xFFFFFFF0) + blob[16:], "sections end"),
    (lambda blob: blob[:-1], "sections end"),
    (lambda blob: blob[:-1] + b"x", "NUL-terminated"),
    (lambda blob: blob[:12] + struct.pack("<I", 14) + blob[16:], "aligned"),
])
def test_hostile_headers(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    blob = _kernelish()[0].blob()
    with pytest.raises(GuestDataError, match=message):
        Btf.parse(mutate(blob))


def test_unknown_kind_and_truncated_record() -> None:
    b = BtfBuilder()
    b.raw("weird", 25, 0, 0)
    with pytest.raises(GuestDataError, match="unknown BTF kind 25"):
        Btf.parse(b.blob())
    b = BtfBuilder()
    b.raw("s", Kind.STRUCT, 3, 8, b"\0" * 12)  # claims 3 members, has 1
    with pytest.raises(GuestDataError, match="past the type section"):
        Btf.parse(b.blob())


def test_absurd_counts_are_bounded() -> None:
    b = BtfBuilder()
    b.raw("s", Kind.STRUCT, 0xFFFF, 8)  # 65535 members claimed, none present
    with pytest.raises(GuestDataError):
        Btf.parse(b.blob())
    b = BtfBuilder()
    arr = b.array(2, 2, 0xFFFFFFFF)
    b.int("int", 4)
    btf = Btf.parse(b.blob())
    assert btf.sizeof(arr) == 4 * 0xFFFFFFFF  # absurd but finite: callers bound their reads


def test_reference_cycles_fail_fast() -> None:
    b = BtfBuilder()
    first = b.ref(Kind.TYPEDEF, 2, "loop_t")
    b.ref(Kind.CONST, first)
    arr = b.array(4, 1, 2)
    b.array(arr, 1, 2)  # arrays of each other
    b.struct("holder", 8, [("a", first, 0, 0), ("", 5, 0, 0)])  # anonymous member that is itself
    btf = Btf.parse(b.blob())
    start = time.perf_counter()
    with pytest.raises(GuestDataError, match="cycle"):
        btf.resolve(first)
    with pytest.raises(GuestDataError, match="cycle"):
        btf.sizeof(arr)
    with pytest.raises(GuestDataError, match="cycle"):
        btf.get_struct("holder").member("a.x")  # resolving the member type hits the typedef loop
    with pytest.raises(GuestDataError, match="deeper than 32 or fan out"):
        btf.get_struct("holder").find_member("missing")  # self-nesting anonymous member
    assert time.perf_counter() - start < 0.5


def test_bad_references_raise() -> None:
    b = BtfBuilder()
    ptr = b.ref(Kind.PTR, 99)
    b.raw("", Kind.TYPEDEF, 0, 0)
    btf = Btf.parse(b.blob())
    with pytest.raises(GuestDataError, match="type id 99 is out of range"):
        btf.resolve(btf.type(ptr).ref)
    b = BtfBuilder()
    b.int("int", 4)
    blob = bytearray(b.blob())
    struct.pack_into("<I", blob, 24, 5000)  # name offset past the strings
    with pytest.raises(GuestDataError, match="string offset 5000"):
        Btf.parse(bytes(blob)).type(1)


@pytest.mark.skipif(not HOST_BTF.exists(), reason="this host has no /sys/kernel/btf/vmlinux")
def test_host_vmlinux_btf_parses() -> None:
    blob = HOST_BTF.read_bytes()
    btf = Btf.parse(blob, label="host")
    task = btf.get_struct("task_struct")  # builds the name index (its speed is measured in bench/, not here)
    layout = member_offsets(btf, {"task_struct": ["pid", "tgid", "comm", "tasks", "mm", "real_parent"],
                                  "mm_struct": ["pgd", "mmap_base"], "module": ["list", "name"]})
    assert layout["task_struct"]["comm"].offset < task.size
    assert btf.sizeof(task.member("comm").type_id) == 16
    assert load_btf(HOST_BTF).count == btf.count


def test_anonymous_member_fan_out_is_bounded() -> None:
    b = BtfBuilder()
    b.struct("bomb", 8, [("", 1, 0, 0)] * 200)  # 200 anonymous members, each the struct itself
    btf = Btf.parse(b.blob())
    start = time.perf_counter()
    with pytest.raises(GuestDataError, match="a cycle"):
        btf.get_struct("bomb").find_member("missing")
    assert time.perf_counter() - start < 0.5


def test_random_corruption_only_raises_guest_data_error() -> None:
    import random

    blob = _kernelish()[0].blob()
    rng = random.Random(1234)
    start = time.perf_counter()
    for _ in range(300):
        mutated = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(24, len(mutated))] = rng.randrange(256)
        try:
            btf = Btf.parse(bytes(mutated))
            for t in btf.iter_types():
                btf.sizeof(t.id)
                if isinstance(t, Struct):
                    t.find_member("pid")
                    t.find_member("tasks.prev")
            btf.find_struct("task_struct")
        except GuestDataError:
            pass
    assert time.perf_counter() - start < 10


@pytest.mark.skipif(shutil.which("objcopy") is None, reason="objcopy (binutils) is not installed")
def test_load_btf_from_an_elf_btf_section(tmp_path: Path) -> None:
    blob = _kernelish()[0].blob()
    (tmp_path / "btf.bin").write_bytes(blob)
    elf = tmp_path / "vmlinux"
    shutil.copy("/bin/true", elf)
    subprocess.run(["objcopy", "--add-section", f".BTF={tmp_path / 'btf.bin'}", str(elf)], check=True)
    assert extract_elf_btf(elf) == blob
    assert load_btf(elf).get_struct("task_struct").size == 64
    with pytest.raises(GuestDataError, match=r"no \.BTF section"):
        extract_elf_btf("/bin/true")
    with pytest.raises(GuestDataError, match="cannot read BTF file"):
        load_btf(tmp_path / "missing")
