"""Event decoding (os.linux.events) on synthetic kernel memory: both module layouts, hostile argv, what is missing."""

from __future__ import annotations

import re
import struct
from types import SimpleNamespace
from typing import Any

import pytest

from nephoscope.core.errors import DetectionError, GuestDataError, MemoryAccessError
from nephoscope.os.btf.build import BtfBuilder
from nephoscope.os.btf.reader import Btf
from nephoscope.os.linux import events
from nephoscope.os.linux.model import Limits

BASE = 0xFFFF888000000000
RELEASE = "6.99.0-synthetic"
BINPRM = ["filename", "interp", "file", "mm", "p", "argc"]


class Off(dict):
    """Resolved offsets like model.Offsets: `off[key]`, `key in off`, `off.get(key)`, `off.size[struct]`."""

    def __init__(self, offsets: dict[str, int], size: dict[str, int]) -> None:
        super().__init__(offsets)
        self.size = size


class FakeKernel:
    """Just enough of LinuxKernel for event decoding: a bytearray at kernel gva BASE, user memory the same."""

    def __init__(self, btf: Btf, off: Off, symbols: dict[str, int], mem_types: int = 0) -> None:
        self.mem = bytearray(1 << 16)
        self.btf, self.off, self.module_mem_types, self.limits = btf, off, mem_types, Limits()
        self.symbols = SimpleNamespace(find=symbols.get)
        self.info = SimpleNamespace(release=RELEASE)

    def read(self, gva: int, size: int) -> bytes:
        off = gva - BASE
        if off < 0 or off + size > len(self.mem):
            raise MemoryAccessError(f"0x{gva:x} outside fake RAM")
        return bytes(self.mem[off:off + size])

    def u64(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 8), "little")

    def u32(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 4), "little")

    def cstr(self, gva: int, limit: int = 256) -> str:
        return self.read(gva, limit).split(b"\0", 1)[0].decode()

    def user_space(self, pgd_gva: int) -> FakeKernel:
        return self

    def put(self, gva: int, fmt: str, *values: Any) -> None:
        struct.pack_into("<" + fmt, self.mem, gva - BASE, *values)


def _btf(binprm: list[str] = BINPRM, pcpu_hot: bool = False, mod_mem_type: bool = False) -> Btf:
    b = BtfBuilder()
    u64 = b.int("unsigned long", 8)
    b.struct("linux_binprm", 8 * len(binprm), [(m, u64, 64 * i, 0) for i, m in enumerate(binprm)])
    if pcpu_hot:
        b.struct("pcpu_hot", 64, [("preempt_count", u64, 0, 0), ("current_task", u64, 64, 0)])
    if mod_mem_type:  # 6.4's enum mod_mem_type
        b.enum("mod_mem_type", 4, [("MOD_TEXT", 0), ("MOD_DATA", 1), ("MOD_RODATA", 2), ("MOD_RO_AFTER_INIT", 3),
                                   ("MOD_INIT_TEXT", 4), ("MOD_INIT_DATA", 5), ("MOD_INIT_RODATA", 6),
                                   ("MOD_MEM_NUM_TYPES", 7)])
    return Btf.parse(b.blob())


def _kernel(btf: Btf | None = None, symbols: dict[str, int] | None = None, mem_types: int = 0,
            offsets: dict[str, int] | None = None) -> FakeKernel:
    syms = {"begin_new_exec": 0xFFFFFFFF81000000, "do_exit": 0xFFFFFFFF81000100, "do_init_module": 0xFFFFFFFF81000200,
            "current_task": 0x1FB80, "total_forks": BASE + 0x10}
    return FakeKernel(btf or _btf(), Off(offsets or {}, {"module_memory": 24}), syms if symbols is None else symbols,
                      mem_types)


def test_decoder_resolves_hooks_and_members_only_for_the_events_asked() -> None:
    k = _kernel()
    d = events.EventDecoder(k, ["exec", "module"])  # type: ignore[arg-type]
    assert d.hooks == {0xFFFFFFFF81000000: "exec", 0xFFFFFFFF81000200: "module"}
    assert d.off["linux_binprm.argc"] == 40 and d.current_task == 0x1FB80
    k.put(BASE + 0x10, "Q", 1234)
    assert d.forks() == 1234
    no_binprm = _kernel(_btf(binprm=["filename"]))
    assert events.EventDecoder(no_binprm, ["exit"]).off.get("linux_binprm.mm") is None  # type: ignore[arg-type]


def test_decoder_names_kernel_struct_and_member_it_lacks() -> None:
    with pytest.raises(GuestDataError) as exc:
        events.EventDecoder(_kernel(_btf(binprm=["filename", "file"])), ["exec"])  # type: ignore[arg-type]
    assert all(word in str(exc.value) for word in (RELEASE, "linux_binprm.interp", "linux_binprm.argc"))
    syms = {"do_exit": 1, "current_task": 2}
    with pytest.raises(DetectionError, match=re.escape(f"kernel {RELEASE}: kallsyms lacks begin_new_exec")):
        events.EventDecoder(_kernel(symbols=syms), ["exec"])  # type: ignore[arg-type]
    with pytest.raises(DetectionError, match=re.escape("pcpu_hot.current_task")):
        events.EventDecoder(_kernel(symbols={"do_exit": 1}), ["exit"])  # type: ignore[arg-type]


def test_current_task_through_pcpu_hot_on_6_2_and_later() -> None:
    k = _kernel(_btf(pcpu_hot=True), symbols={"do_exit": 1, "pcpu_hot": 0x22000})
    d = events.EventDecoder(k, ["exit"])  # type: ignore[arg-type]
    assert d.current_task == 0x22000 + 8
    gs_base = BASE + 0x100 - d.current_task  # the per-CPU area of the stopped vCPU
    k.put(BASE + 0x100, "Q", 0xFFFF888000ABC000)
    assert d.current(gs_base) == 0xFFFF888000ABC000


def _module(k: FakeKernel, mod: int, name: bytes) -> None:
    k.put(mod + k.off["module.name"], f"{len(name)}s", name)


def test_module_sizes_with_core_layout_up_to_6_3() -> None:
    k = _kernel(offsets={"module.name": 0x18, "module.core_layout.base": 0x100, "module.core_layout.size": 0x108,
                         "module.init_layout.size": 0x148})
    mod = BASE + 0x1000
    _module(k, mod, b"crc7")
    k.put(mod + 0x100, "Q", 0xFFFFFFFFC0001000)
    k.put(mod + 0x108, "I", 8192)
    k.put(mod + 0x148, "I", 4096)
    d = events.EventDecoder(k, ["module"])  # type: ignore[arg-type]
    assert d.module(mod) == events.ModuleLoad("crc7", mod, 0xFFFFFFFFC0001000, 8192, 4096)


def test_module_sizes_with_mem_array_from_6_4() -> None:
    k = _kernel(_btf(mod_mem_type=True), mem_types=7,
                offsets={"module.name": 0x18, "module.mem": 0x200, "module_memory.base": 0, "module_memory.size": 8})
    mod = BASE + 0x2000
    _module(k, mod, b"crc7")
    sizes = [4096, 8192, 4096, 4096, 1024, 512, 256]  # text, data, rodata, ro_after_init, then the init ones
    for i, size in enumerate(sizes):
        k.put(mod + 0x200 + 24 * i, "QI", 0xFFFFFFFFC0002000 + 0x10000 * i, size)
    d = events.EventDecoder(k, ["module"])  # type: ignore[arg-type]
    assert d.init_mem_types == (4, 5, 6)
    got = d.module(mod)
    assert (got.core_base, got.core_size, got.init_size) == (0xFFFFFFFFC0002000, sum(sizes[:4]), sum(sizes[4:]))
    no_enum = _kernel(mem_types=7, offsets={"module.name": 0x18, "module.mem": 0x200})
    with pytest.raises(GuestDataError, match="mod_mem_type"):
        events.EventDecoder(no_enum, ["module"])  # type: ignore[arg-type]


def _exec_kernel() -> tuple[FakeKernel, events.EventDecoder, int]:
    k = _kernel(offsets={"mm_struct.pgd": 0x50, "file.f_path": 0x10, "path.mnt": 0, "path.dentry": 8})
    d = events.EventDecoder(k, ["exec"])  # type: ignore[arg-type]
    bprm, o = BASE + 0x3000, d.off
    k.put(BASE + 0x3800, "12s", b"/bin/true\0")
    k.put(bprm + o["linux_binprm.filename"], "Q", BASE + 0x3800)
    k.put(bprm + o["linux_binprm.mm"], "Q", BASE + 0x4000)
    k.put(bprm + o["linux_binprm.file"], "Q", 0xDEAD000000000000)  # garbage: the path is a problem, not a crash
    return k, d, bprm


def test_exec_decodes_what_it_can_and_names_what_it_cannot() -> None:
    k, d, bprm = _exec_kernel()
    args = b"/bin/true\0--help\0"
    k.put(BASE + 0x5000, f"{len(args)}s", args)
    k.put(bprm + d.off["linux_binprm.p"], "Q", BASE + 0x5000)
    k.put(bprm + d.off["linux_binprm.argc"], "I", 2)
    got = d.exec(bprm)
    assert (got.path, got.interp, got.argv, got.new_mm_gva) == ("/bin/true", "", ("/bin/true", "--help"), BASE + 0x4000)
    assert got.file is None and [what for what, _ in got.problems] == ["file"]
    assert d.exec_mm(bprm) == BASE + 0x4000 and d.exec_mm(0x10) is None


def test_hostile_argc_is_bounded() -> None:
    k, d, bprm = _exec_kernel()
    k.mem[0x5000:0x5000 + 8192] = b"A" * 8192  # no NUL at all
    k.put(bprm + d.off["linux_binprm.p"], "Q", BASE + 0x5000)
    k.put(bprm + d.off["linux_binprm.argc"], "I", 0xFFFFFFFF)
    got = d.exec(bprm)
    assert got.argv is not None and len(got.argv) == 1 and len(got.argv[0]) == events.MAX_ARGV_BYTES
    k.put(bprm + d.off["linux_binprm.p"], "Q", BASE + 0xFFF0)  # runs off the end of memory
    assert "argv" in dict(d.exec(bprm).problems)


def test_exit_code_fields() -> None:
    assert events.decode_exit(0x0100) == events.Exit(0x100, 1, 0)
    assert events.decode_exit(9) == events.Exit(9, 0, 9)

