"""Type sources for the kernel model: BTF, Volatility 3 ISF, vmlinux DWARF/BTF, System.map (`--symbols FILE`)."""

from __future__ import annotations

import json
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from nephoscope.core.errors import DetectionError, GuestDataError
from nephoscope.os.btf.build import BtfBuilder
from nephoscope.os.btf.reader import Btf
from nephoscope.os.btf.types import Kind
from nephoscope.os.linux.isf import build_isf, write_isf
from nephoscope.os.linux.model import NEW_VMA, OLD_VMA, WANTED, Offsets
from nephoscope.os.linux.symbols import BtfTypes, IsfTypes, load_symbols

HOST_BTF = Path("/sys/kernel/btf/vmlinux")
BANNER = "Linux version 6.1.0-test (x@y) (gcc 12) #1 SMP PREEMPT_DYNAMIC Debian 6.1.1-1 (2026-01-01)"
LINK_TEXT = 0xFFFFFFFF81000000
C_SOURCE = """
struct list_head { struct list_head *next, *prev; };
struct inner { int a; char b[3]; };
typedef struct inner inner_t;
struct task_struct {
    volatile long state;
    union { unsigned int flags; struct { unsigned short lo, hi; }; };
    struct list_head tasks;
    int pid;
    struct { int x; inner_t in; } nested;
    char comm[16];
    struct inner arr[4][2];
    unsigned int bits : 3, more : 5;
    const struct task_struct *parent;
};
struct task_struct t;
enum colour { RED, GREEN = 5, BLUE };
enum colour c;
"""
C_WANTED = {"task_struct": ["state", "flags", "lo", "hi", "tasks", "tasks.prev", "pid", "nested.in.b", "comm",
                            "arr", "parent", "absent?"],
            "list_head": ["next", "prev"], "inner": ["a", "b"]}
C_PROBES = ["state", "flags", "lo", "hi", "tasks", "tasks.prev", "pid", "nested.in.b", "comm", "arr", "parent"]


def _offsets(types: object, wanted: dict[str, list[str]], kernel: str = "") -> dict[str, dict[str, int]]:
    """Return {struct: {path: byte offset}} of `types`.members()."""
    layout = types.members(wanted, kernel)  # type: ignore[attr-defined]
    return {s: {p: m.offset for p, m in members.items()} for s, members in layout.items()}


def _size(types: object, struct_name: str, path: str) -> int | None:
    """Return the byte size of one member, or None if there is no such member."""
    found = types.members({struct_name: [path + "?"]})[struct_name]  # type: ignore[attr-defined]
    return found[path].size if path in found else None


def _small_btf() -> Btf:
    b = BtfBuilder()
    integer = b.int("int", 4, signed=True)
    uint = b.int("unsigned int", 4)
    char = b.int("char", 1)
    long = b.int("long unsigned int", 8)
    comm = b.array(char, integer, 16)
    anon = b.struct("", 8, [("flags", uint, 0, 0), ("cpu", uint, 32, 0)])
    union = b.struct("", 8, [("", anon, 0, 0), ("raw", long, 0, 0)], union=True)
    lh_ptr = b.ref(Kind.PTR, b.next_id + 1)
    list_head = b.struct("list_head", 16, [("next", lh_ptr, 0, 0), ("prev", lh_ptr, 64, 0)])
    layout = b.struct("module_layout", 16, [("base", long, 0, 0), ("size", uint, 64, 0)])
    mems = b.array(layout, integer, 3)
    b.struct("task_struct", 80, [("pid", integer, 0, 0), ("", union, 64, 0), ("tasks", list_head, 128, 0),
                                 ("comm", comm, 256, 0), ("core_layout", layout, 384, 0)])
    b.struct("module", 64, [("list", list_head, 0, 0), ("mem", mems, 128, 0)])
    b.raw("files_struct", Kind.FWD, 0, 0)
    return Btf.parse(b.blob(), label="small")


SMALL_WANTED = {"task_struct": ["pid", "flags", "cpu", "raw", "tasks", "tasks.prev", "comm", "core_layout.size",
                                "missing?"],
                "list_head": ["next", "prev"], "module": ["list", "mem"]}


def _isf_of(btf: Btf) -> dict:
    return build_isf(btf, {"_text": LINK_TEXT + 0x200000, "linux_banner": 0xFFFFFFFF82000000 + 0x200000,
                           "phys_base": 0xFFFFFFFF82100000 + 0x200000}, BANNER)


def _same_answers(a: object, b: object, wanted: dict[str, list[str]]) -> None:
    assert a.members(wanted, "k") == b.members(wanted, "k")  # type: ignore[attr-defined]
    for struct_name in wanted:
        assert a.has_struct(struct_name) and b.has_struct(struct_name)  # type: ignore[attr-defined]
        assert a.struct_size(struct_name) == b.struct_size(struct_name)  # type: ignore[attr-defined]


def test_isf_types_answer_like_btf_through_anonymous_members_and_paths() -> None:
    btf = _small_btf()
    isf = _isf_of(btf)
    btf_types, isf_types = BtfTypes(btf), IsfTypes(isf["user_types"], isf["base_types"], isf["enums"])
    _same_answers(btf_types, isf_types, SMALL_WANTED)
    layout = _offsets(isf_types, SMALL_WANTED)
    assert layout["task_struct"]["flags"] == 8 and layout["task_struct"]["cpu"] == 12
    assert layout["task_struct"]["tasks.prev"] == 24 and layout["task_struct"]["core_layout.size"] == 56
    assert "missing" not in layout["task_struct"]
    assert _size(isf_types, "module", "mem") == _size(btf_types, "module", "mem") == 48
    assert isf_types.members({"module": ["mem"]})["module"]["mem"].count == 3
    assert _size(isf_types, "task_struct", "comm") == 16
    assert _size(isf_types, "task_struct", "nope") is None
    assert not isf_types.has_struct("files_struct")  # a forward declaration is not a definition
    assert not btf_types.has_struct("files_struct")


def test_missing_members_are_named_all_at_once() -> None:
    isf = _isf_of(_small_btf())
    types = IsfTypes(isf["user_types"], isf["base_types"], label="ISF t.json")
    with pytest.raises(GuestDataError) as err:
        types.members({"task_struct": ["pid", "nope", "tasks.nope"], "mm_struct": ["pgd"]}, "6.1-test")
    message = str(err.value)
    assert "6.1-test" in message and "task_struct.nope" in message and "task_struct.tasks.nope" in message
    assert "struct mm_struct" in message


def test_model_offsets_accept_any_type_source() -> None:
    btf = _small_btf()
    isf = _isf_of(btf)
    wanted = {"task_struct": ["pid", "comm", "core_layout.base"], "list_head": ["next"]}
    from_btf, from_isf = Offsets(btf, wanted, "k"), Offsets(IsfTypes(isf["user_types"], isf["base_types"]), wanted, "k")
    assert from_btf._off == from_isf._off and from_btf.size == from_isf.size
    assert from_btf.msize == from_isf.msize and from_btf.count == from_isf.count
    assert from_isf["task_struct.core_layout.base"] == 48 and from_isf.size["task_struct"] == 80


def test_malformed_isf_values_raise_guest_data_error() -> None:
    types = IsfTypes({"task_struct": {"kind": "struct", "size": 8,
                                      "fields": {"pid": {"offset": "zero", "type": {"kind": "base", "name": "int"}},
                                                 "loop": {"offset": 0, "anonymous": True,
                                                          "type": {"kind": "struct", "name": "task_struct"}}}}})
    with pytest.raises(GuestDataError):
        types.members({"task_struct": ["pid"]})
    with pytest.raises(GuestDataError, match="deeper"):
        types.members({"task_struct": ["absent"]})  # a self-nesting anonymous member


@pytest.mark.skipif(not HOST_BTF.exists(), reason="this host has no /sys/kernel/btf/vmlinux")
def test_a_real_kernel_isf_gives_the_btf_layouts_the_model_needs(tmp_path: Path) -> None:
    btf = Btf.parse(HOST_BTF.read_bytes(), label="host")
    wanted = {k: list(v) for k, v in WANTED.items()}
    for name, members in (NEW_VMA if btf.find_struct("maple_tree") else OLD_VMA).items():
        wanted.setdefault(name, []).extend(members)
    path = write_isf(_isf_of(btf), tmp_path / "host.json.xz")
    source = load_symbols(path)
    assert source.kind == "ISF" and source.types is not None and source.btf is None
    _same_answers(BtfTypes(btf), source.types, wanted)
    assert _size(source.types, "module", "mem") == _size(BtfTypes(btf), "module", "mem")
    for name in ("maple_type", "pid_type", "mod_mem_type"):
        assert source.types.enum_values(name) == BtfTypes(btf).enum_values(name)
    assert source.symbols is not None and source.symbols.link_time
    assert source.symbols.get("_text") == LINK_TEXT + 0x200000 - 0x200000  # ISF addresses are link-time


def test_load_symbols_by_kind(tmp_path: Path) -> None:
    btf = _small_btf()
    plain = write_isf(_isf_of(btf), tmp_path / "k.json")
    assert load_symbols(plain).kind == "ISF"
    types_only = _isf_of(btf)
    types_only["symbols"] = {}
    assert load_symbols(write_isf(types_only, tmp_path / "t.json.xz")).symbols is None  # kallsyms from RAM
    raw = tmp_path / "vmlinux.btf"
    raw.write_bytes(HOST_BTF.read_bytes() if HOST_BTF.exists() else _blob_of_small())
    blob_source = load_symbols(raw)
    assert blob_source.kind == "BTF" and blob_source.btf is not None and blob_source.symbols is None
    system_map = tmp_path / "System.map"
    system_map.write_text("ffffffff81000000 T _text\nffffffff82000000 D linux_banner\n")
    map_source = load_symbols(system_map)
    assert map_source.kind == "System.map" and map_source.types is None and len(map_source.symbols or []) == 2
    assert "BTF from RAM" in map_source.describe()


def _blob_of_small() -> bytes:
    b = BtfBuilder()
    b.struct("task_struct", 8, [("pid", b.int("int", 4, signed=True), 0, 0)])
    return b.blob()


@pytest.mark.parametrize("content, message", [
    (b"\xfd7zXZ\x00garbage", "ISF"),
    (b'{"not": "isf"}', "user_types"),
    (b"{broken json", "ISF"),
    (b"not a symbol file at all\n", "_text"),
    (b"\x7fELF\x02\x01\x01" + b"\0" * 9, "ELF"),
])
def test_bad_symbol_files_raise_detection_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(DetectionError, match=message):
        load_symbols(path)
    with pytest.raises(DetectionError, match="cannot read"):
        load_symbols(tmp_path / "absent")


def test_truncated_xz_isf_raises(tmp_path: Path) -> None:
    path = tmp_path / "k.json.xz"
    path.write_bytes(lzma.compress(json.dumps(_isf_of(_small_btf())).encode())[:200])
    with pytest.raises(DetectionError):
        load_symbols(path)


@pytest.mark.skipif(shutil.which("objcopy") is None, reason="needs objcopy")
def test_vmlinux_with_a_btf_section(tmp_path: Path) -> None:
    blob = tmp_path / "btf.bin"
    blob.write_bytes(HOST_BTF.read_bytes() if HOST_BTF.exists() else _blob_of_small())
    elf = tmp_path / "vmlinux"
    shutil.copy("/bin/true", elf)
    subprocess.run(["objcopy", "--add-section", f".BTF={blob}", "--strip-all", str(elf)], check=True)
    source = load_symbols(elf)
    assert source.kind == "vmlinux (BTF)" and source.symbols is None  # stripped: kallsyms from RAM
    assert source.types is not None and source.types.has_struct("task_struct")


def _compile(tmp_path: Path, flag: str) -> Path:
    src = tmp_path / "k.c"
    src.write_text(C_SOURCE)
    out = tmp_path / f"k{flag}.o"
    subprocess.run(["gcc", flag, "-O0", "-c", str(src), "-o", str(out)], check=True, capture_output=True)
    return out


def _offsetof_oracle(tmp_path: Path) -> dict[str, int]:
    """Return what the C compiler says offsetof() each probe is, and sizeof(struct task_struct)."""
    src = tmp_path / "oracle.c"
    probes = "".join(f'    printf("{p} %zu\\n", offsetof(struct task_struct, {p}));\n' for p in C_PROBES)
    src.write_text(f"#include <stdio.h>\n#include <stddef.h>\n{C_SOURCE}\nint main(void) {{\n{probes}"
                   '    printf("sizeof %zu\\n", sizeof(struct task_struct));\n    return 0;\n}\n')
    exe = tmp_path / "oracle"
    subprocess.run(["gcc", str(src), "-o", str(exe)], check=True, capture_output=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    return {name: int(value) for name, value in (line.split() for line in lines if line)}


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_dwarf_layouts_match_the_compiler_and_its_btf(tmp_path: Path) -> None:
    oracle = _offsetof_oracle(tmp_path)
    source = load_symbols(_compile(tmp_path, "-g"))
    assert source.kind == "vmlinux (DWARF)" and source.types is not None
    layout = _offsets(source.types, C_WANTED, "test")
    assert {p: layout["task_struct"][p] for p in C_PROBES} == {p: oracle[p] for p in C_PROBES}
    assert source.types.struct_size("task_struct") == oracle["sizeof"]
    assert _size(source.types, "task_struct", "arr") == 4 * 2 * 8
    assert _size(source.types, "task_struct", "comm") == 16
    assert source.types.enum_values("colour") == {"RED": 0, "GREEN": 5, "BLUE": 6}
    assert not source.types.has_struct("mm_struct")
    with pytest.raises(GuestDataError, match=r"task_struct\.absent_too"):
        source.types.members({"task_struct": ["absent_too"]})
    btf_object = _compile(tmp_path, "-gbtf")  # the same source as GCC's BTF: an independent encoding
    from nephoscope.os.btf.sources import load_btf

    btf_types = BtfTypes(load_btf(btf_object))
    wanted = {k: [p for p in v if not p.endswith("?")] for k, v in C_WANTED.items()}
    from_btf, from_dwarf = btf_types.members(wanted), source.types.members(wanted)
    assert from_dwarf["task_struct"]["arr"].count == 4  # C's outer dimension: sizeof(arr) / sizeof(arr[0])
    # GCC 12's BTF nests a 2-D array the other way round (outer count 2); every other member agrees exactly
    assert from_btf["task_struct"].pop("arr").size == from_dwarf["task_struct"].pop("arr").size
    assert from_btf == from_dwarf  # offsets, sizes, counts, bitfields
    assert btf_types.enum_values("colour") == source.types.enum_values("colour")
