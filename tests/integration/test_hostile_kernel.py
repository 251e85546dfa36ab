"""Deterministic corruptions of a real clean-guest dump (issue 11): no crash, no hang, no false finding.

Each case copies the clean 6.1 ELF core (the shared dump, or one made by the `clean_dump` fixture),
damages kernel structures the way a bad dump or hostile guest would, and runs the merged scan path
(`run_scan` with inspect and arch). A corrupted-but-not-tampered dump must yield no hidden-process and
no masquerading finding, raise nothing but NephoscopeError, and end in bounded time. The real DKOM
case (a task unlinked with its neighbours fixed) must still be reported hidden.
"""

from __future__ import annotations

import json
import mmap
import random
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nephoscope.cli.main import app
from nephoscope.hypervisor.target import VmTarget
from nephoscope.memory.physical import open_memory, parse_elf_segments
from nephoscope.os.linux.model import LinuxKernel
from nephoscope.service.scan import ScanResult, run_scan

pytestmark = pytest.mark.guest  # clean_dump boots the clean guest when no shared dump exists
PAGE = 4096
FALSE_KINDS = {"hidden-process", "masquerading", "hidden-module", "syscall-hook", "idt-hook", "inline-hook",
               "ftrace-hook", "kprobe-hook", "ops-hook"}
BOUND_S = 120  # generous: a hang shows as minutes, not seconds (no speed target)
# BTF type record trailer sizes by kind (INT, PTR, ARRAY, STRUCT, UNION, ENUM, ... ENUM64); vlen-scaled ones
_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}
_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}


@dataclass
class Facts:
    """What the clean dump looks like: where things are, to damage exactly one of them."""

    path: Path
    kernel: LinuxKernel
    segments: list[tuple[int, int, int]]
    leaders: list[tuple[int, int, str, bool]]  # (task gva, pid, comm, kernel thread) in task-list order
    victim: tuple[int, int, str]  # a single-threaded user process: (gva, pid, comm)

    def file_offset(self, gva: int) -> int:
        gpa = self.kernel.kernel.translate(gva)
        for start, end, offset in self.segments:
            if start <= gpa < end:
                return offset + gpa - start
        raise AssertionError(f"gva 0x{gva:x} (gpa 0x{gpa:x}) is not in the dump")

    def link(self, gva: int) -> int:
        return gva + self.kernel.off["task_struct.tasks"]

    def btf_member(self, struct_name: str, member: str) -> int:
        """Return the kernel gva of the 32-bit offset field of `struct_name.member`'s BTF record."""
        return self._btf_record(struct_name) + 12 + 12 * self._member_index(struct_name, member) + 8

    def btf_size(self, struct_name: str) -> int:
        """Return the kernel gva of the size field of struct `struct_name`'s BTF record."""
        return self._btf_record(struct_name) + 8

    def _member_index(self, struct_name: str, member: str) -> int:
        members = self.kernel.btf.get_struct(struct_name).members
        return next(i for i, m in enumerate(members) if m.name == member)

    def _btf_record(self, struct_name: str) -> int:
        k = self.kernel
        start = k.symbols.get("__start_BTF")
        hdr_len, type_off, type_len = struct.unpack("<III", k.read(start + 4, 12))
        types = k.read(start + hdr_len + type_off, type_len)
        want, pos, type_id = k.btf.get_struct(struct_name).id, 0, 1
        while type_id < want:
            info = struct.unpack_from("<I", types, pos + 4)[0]
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            pos += 12 + _FIXED.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen
            type_id += 1
        return start + hdr_len + type_off + pos


@pytest.fixture(scope="session")
def facts(clean_dump: Path) -> Iterator[Facts]:
    phys = open_memory(clean_dump)
    k = LinuxKernel.open(phys)
    procs = k.processes()
    assert procs.complete, procs.problem
    threads = {}
    for t in k.threads():
        threads[t.tgid] = threads.get(t.tgid, 0) + 1
    leaders = [(p.gva, p.pid, p.comm, p.kernel_thread) for p in procs]
    victim = next((p.gva, p.pid, p.comm) for p in reversed(procs.items)
                  if not p.kernel_thread and p.pid > 1 and threads.get(p.pid) == 1 and p.exe)
    with clean_dump.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        segments = parse_elf_segments(mm, str(clean_dump))
    try:
        yield Facts(clean_dump, k, segments, leaders, victim)
    finally:
        phys.close()


class Copy:
    """A private copy of the clean dump to damage, written through the clean kernel's translations."""

    def __init__(self, facts: Facts, path: Path) -> None:
        self.facts, self.path = facts, path
        shutil.copyfile(facts.path, path)

    def write(self, gva: int, data: bytes) -> None:
        with self.path.open("r+b") as fh:
            for i in range(0, len(data), PAGE - gva % PAGE or PAGE):  # page by page: translate each page
                chunk = data[i:i + PAGE - (gva + i) % PAGE]
                fh.seek(self.facts.file_offset(gva + i))
                fh.write(chunk)

    def u64(self, gva: int, value: int) -> None:
        self.write(gva, struct.pack("<Q", value % (1 << 64)))

    def u32(self, gva: int, value: int) -> None:
        self.write(gva, struct.pack("<I", value % (1 << 32)))

    def page(self, gva: int, data: bytes) -> None:
        self.write(gva & ~(PAGE - 1), data)


def _user(f: Facts, n: int) -> int:
    """Return the task gva of the n-th user process on the task list (deterministic)."""
    return [gva for gva, pid, _c, kthread in f.leaders if not kthread and pid > 1][n]


def _rand(seed: int, size: int = PAGE) -> bytes:
    return random.Random(seed).randbytes(size)


def _xa_root(f: Facts) -> int:
    k = f.kernel
    o = k.off
    return k.u64(k.symbols.get("init_pid_ns") + o["pid_namespace.idr"] + o["idr.idr_rt"] + o["xarray.xa_head"]) - 2


def _xa_head(f: Facts) -> int:
    o = f.kernel.off
    return f.kernel.symbols.get("init_pid_ns") + o["pid_namespace.idr"] + o["idr.idr_rt"] + o["xarray.xa_head"]


def _struct_pid(f: Facts, task: int) -> int:
    return f.kernel.u64(task + f.kernel.off["task_struct.thread_pid"])


def _btf_shift(member: str, bits: int) -> Callable[[Facts, Copy], None]:
    def damage(f: Facts, c: Copy) -> None:
        field = f.btf_member("task_struct", member)
        c.u32(field, f.kernel.u32(field) + bits)
    return damage


def _btf_retype(member: str, like: str) -> Callable[[Facts, Copy], None]:
    def damage(f: Facts, c: Copy) -> None:  # the member's type id (4 bytes before its offset field)
        c.u32(f.btf_member("task_struct", member) - 4, f.kernel.btf.get_struct("task_struct").member(like).type_id)
    return damage


def _btf_resize(struct_name: str, size: int) -> Callable[[Facts, Copy], None]:
    return lambda f, c: c.u32(f.btf_size(struct_name), size)


# name -> damage; each leaves the guest untampered: any hidden or masquerading finding is false
CASES: dict[str, Callable[[Facts, Copy], None]] = {
    "next-to-head": lambda f, c: c.u64(f.link(f.leaders[7][0]), f.link(f.kernel.symbols.get("init_task"))),
    "cycle": lambda f, c: c.u64(f.link(f.leaders[9][0]), f.link(f.leaders[3][0])),
    "cycle-consistent": lambda f, c: (c.u64(f.link(f.leaders[9][0]), f.link(f.leaders[3][0])),
                                      c.u64(f.link(f.leaders[3][0]) + 8, f.link(f.leaders[9][0]))),
    "self-loop": lambda f, c: (c.u64(f.link(f.leaders[6][0]), f.link(f.leaders[6][0])),
                               c.u64(f.link(f.leaders[6][0]) + 8, f.link(f.leaders[6][0]))),
    "garbage-next": lambda f, c: c.u64(f.link(f.leaders[4][0]), 0xDEADBEEFDEADB000),
    "zeroed-task-page": lambda f, c: c.page(f.link(_user(f, 2)), bytes(PAGE)),
    "random-task-page": lambda f, c: c.page(f.link(_user(f, 3)), _rand(1)),
    "task-pid-changed": lambda f, c: c.u32(_user(f, 4) + f.kernel.off["task_struct.pid"], 31337),
    "random-init-pid-ns-page": lambda f, c: c.page(f.kernel.symbols.get("init_pid_ns"), _rand(2)),
    "zeroed-init-pid-ns-page": lambda f, c: c.page(f.kernel.symbols.get("init_pid_ns"), bytes(PAGE)),
    "idr-head-into-garbage": lambda f, c: c.u64(_xa_head(f), (f.kernel.symbols.get("linux_banner") & ~0xFFF) | 2),
    "idr-root-random": lambda f, c: c.write(_xa_root(f), _rand(3, f.kernel.off.size["xa_node"])),
    "idr-root-zeroed": lambda f, c: c.write(_xa_root(f), bytes(f.kernel.off.size["xa_node"])),
    "struct-pid-random": lambda f, c: c.write(_struct_pid(f, _user(f, 1)), _rand(4, 112)),
    "btf-comm+1": _btf_shift("comm", 8),
    "btf-comm-1": _btf_shift("comm", -8),
    "btf-pid+8": _btf_shift("pid", 64),
    "btf-pid+4": _btf_shift("pid", 32),
    "btf-tasks+8": _btf_shift("tasks", 64),
    "btf-pid-typed-as-pointer": _btf_retype("pid", "mm"),
    "btf-mm_struct-size-0": _btf_resize("mm_struct", 0),
    "btf-task_struct-huge": _btf_resize("task_struct", 0x10000000),
    "btf-task_struct-1g": _btf_resize("task_struct", 0x3FFFFFFF),
}


def _scan(path: Path, name: str) -> tuple[ScanResult, float]:
    t0 = time.monotonic()
    result = run_scan(VmTarget(name, ram_path=path, live=False), ["inspect", "arch"])  # only NephoscopeError
    return result, time.monotonic() - t0                                           # is caught inside


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupted_dump_makes_no_false_finding(case: str, facts: Facts, tmp_path: Path) -> None:
    copy = Copy(facts, tmp_path / "corrupt.elf")
    try:
        CASES[case](facts, copy)
        result, elapsed = _scan(copy.path, case)
    finally:
        copy.path.unlink()
    false = [f"{f.kind}: {f.title}" for f in result.view.findings if f.kind in FALSE_KINDS]
    assert not false, f"{case}: {len(false)} false findings, e.g. {false[:3]}"
    assert elapsed < BOUND_S, f"{case} took {elapsed:.0f}s"
    doubts = {u["what"] for u in result.view.unverifiable if u["method"] == "inspect"}
    assert doubts & {"kernel", "processes", "pid-idr", "cross-view"}, f"{case}: the damage went unnoticed"


def test_dkom_unlinked_task_is_still_hidden(facts: Facts, tmp_path: Path) -> None:
    gva, pid, comm = facts.victim
    copy = Copy(facts, tmp_path / "dkom.elf")
    try:
        link = facts.link(gva)
        nxt, prv = facts.kernel.u64(link), facts.kernel.u64(link + 8)
        copy.u64(prv, nxt)  # what a rootkit's list_del() does: prev->next = next, next->prev = prev
        copy.u64(nxt + 8, prv)
        copy.u64(link, 0xDEAD000000000100)  # LIST_POISON1/2
        copy.u64(link + 8, 0xDEAD000000000122)
        result, _elapsed = _scan(copy.path, "dkom")
    finally:
        copy.path.unlink()
    hidden = [f for f in result.view.findings if f.kind == "hidden-process"]
    assert [(f.severity, f.evidence[0]["pid"], f.evidence[0]["in_pid_idr"]) for f in hidden] == \
        [("critical", pid, True)], [f.title for f in hidden]
    assert comm in hidden[0].title and "DKOM" in hidden[0].title


def _truncated_copy(facts: Facts, path: Path, *, kernel_first: bool) -> Path:
    """Write an ELF core cut short. kernel_first: the file lists RAM from just above the first user
    task's page to the top before the low part, then is cut after that first part, so the kernel is
    readable but the start of the task list is gone (a dump whose transfer died half-way)."""
    if not kernel_first:
        with facts.path.open("rb") as src, path.open("wb") as out:
            out.write(src.read(100_000_000))  # the first 100 MB of a 512 MiB core
        return path
    (start, end, offset), = [s for s in facts.segments if s[0] == 0]
    lo = (facts.kernel.kernel.translate(facts.leaders[0][0]) & ~(PAGE - 1)) + PAGE
    with facts.path.open("rb") as src, path.open("wb") as out:
        header = bytearray(src.read(64))
        phoff, = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        src.seek(phoff)
        phdrs = [struct.unpack("<IIQQQQQQ", src.read(phentsize)[:56]) for _ in range(phnum)]
        notes = [p for p in phdrs if p[0] == 4]
        count = len(notes) + 2
        pos = 64 + 56 * count
        table, blobs = [], []
        for p in notes:
            src.seek(p[2])
            blobs.append(src.read(p[5]))
            table.append(struct.pack("<IIQQQQQQ", 4, 0, pos, 0, 0, p[5], p[5], 0))
            pos += p[5]
        for s, e in ((lo, end), (start, lo)):
            table.append(struct.pack("<IIQQQQQQ", 1, 0, pos, s, s, e - s, e - s, 0))
            pos += e - s
        struct.pack_into("<QQ", header, 32, 64, 0)
        struct.pack_into("<HHHHHH", header, 52, 64, 56, count, 64, 0, 0)
        out.write(header + b"".join(table) + b"".join(blobs))
        src.seek(offset + lo - start)
        shutil.copyfileobj(src, out, length=1 << 24)  # the high part to the end of RAM, then nothing
        out.truncate(64 + 56 * count + sum(len(b) for b in blobs) + end - lo)
    return path


@pytest.mark.parametrize("kernel_first", [False, True], ids=["first-100MB", "low-RAM-lost"])
def test_ps_on_a_truncated_dump_reports_each_view(facts: Facts, tmp_path: Path, kernel_first: bool) -> None:
    path = _truncated_copy(facts, tmp_path / "cut.elf", kernel_first=kernel_first)
    try:
        result = CliRunner().invoke(app, ["ps", str(path), "--json"])
        scan, _elapsed = _scan(path, "cut")
    finally:
        path.unlink()
    assert not [f for f in scan.view.findings if f.kind in FALSE_KINDS]
    if result.exit_code != 0:  # the kernel itself was cut away: a clean error, no traceback
        assert result.exit_code == 1 and "error:" in result.output and not kernel_first, result.output
        return
    out = json.loads(result.stdout)
    views = out["views"]
    assert set(views) == {"task_list", "threads", "pid_idr", "cross_view"}
    assert not out["complete"] and not views["task_list"]["complete"] and views["task_list"]["problem"]
    assert views["cross_view"]["verdict"] == "unverifiable" and out["hidden"] == []
    assert not any(p["one_view_only"] for p in out["processes"])
    # what the other view saw is shown, marked as such
    assert all(p["views"] == ["pid_idr"] for p in out["processes"] if "task_list" not in p["views"])
