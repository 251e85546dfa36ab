"""A synthetic Linux kernel for walker tests: a bytearray at kernel gva BASE laid out like 6.1.

`FakeKernel` is just enough of LinuxKernel for the walkers (bounded reads charged to a Budget, offsets,
maple and xarray layouts). `SynthLinux` builds init_task, a task list with thread groups, and the PID
idr (an xarray of struct pid) that agree, so a test can damage exactly one thing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nephoscope.core.errors import GuestDataError, MemoryAccessError
from nephoscope.os.linux.model import Budget, Limits, MapleLayout, NodeLayout

BASE = 0xFFFF888000000000
# the 6.1 offsets the walkers read (list_head, hlist_node, xa_node, pid, upid as in the real kernel; a
# compact task_struct)
OFFSETS = {
    "list_head.next": 0, "list_head.prev": 8, "hlist_node.next": 0, "hlist_node.pprev": 8,
    "task_struct.tasks": 0x10, "task_struct.pid": 0x20, "task_struct.tgid": 0x24, "task_struct.pid_links": 0x30,
    "task_struct.thread_pid": 0x50, "task_struct.comm": 0x60, "task_struct.signal": 0x70,
    "task_struct.thread_node": 0x78, "signal_struct.thread_head": 0x10,
    "pid_namespace.idr": 0, "pid_namespace.pid_allocated": 0x28, "pid_namespace.child_reaper": 0x30,
    "idr.idr_rt": 0, "idr.idr_base": 16, "xarray.xa_head": 8,
    "xa_node.shift": 0, "xa_node.offset": 1, "xa_node.count": 2, "xa_node.parent": 8, "xa_node.slots": 40,
    "pid.level": 4, "pid.tasks": 16, "pid.numbers": 96, "upid.nr": 0, "upid.ns": 8,
}
SIZES = {"task_struct": 0x100, "signal_struct": 0x40, "xa_node": 576, "pid": 96, "upid": 16, "maple_node": 256}
COUNTS = {"xa_node.slots": 64, "maple_range_64.pivot": 15, "maple_range_64.slot": 16}
MAPLE_6_1 = MapleLayout(256, 1, 2, 3, NodeLayout(8, 15, 128, 16, 248), NodeLayout(8, 9, 80, 10, 240))


class FakeOffsets(dict[str, int]):
    """`off[...]`, `off.size[...]` and `off.count[...]` like model.Offsets."""

    def __init__(self, offsets: dict[str, int]) -> None:
        super().__init__(offsets)
        self.size = dict(SIZES)
        self.count = dict(COUNTS)


class FakeSymbols(dict[str, int]):
    def get(self, name: str) -> int:  # type: ignore[override]
        if name not in self:
            raise GuestDataError(f"no symbol {name}")
        return self[name]

    def find(self, name: str) -> int | None:
        return dict.get(self, name)


class FakeKernel:
    """Just enough of LinuxKernel for the walkers: bounded reads of a bytearray at kernel gva BASE."""

    def __init__(self, size: int = 1 << 16, limits: Limits | None = None) -> None:
        self.mem = bytearray(size)
        self.limits = limits or Limits()
        self.budget = Budget(self.limits)
        self.off = FakeOffsets(OFFSETS)
        self.maple = True
        self.maple_layout = MAPLE_6_1
        self.xa_slots = 64
        self.symbols = FakeSymbols()
        self.kernel = self  # k.kernel.flush()

    def flush(self) -> None:
        """Forget cached translations (nothing is cached here)."""

    def read(self, gva: int, size: int) -> bytes:
        self.budget.read(size)
        off = gva - BASE
        if off < 0 or off + size > len(self.mem):
            raise MemoryAccessError(f"0x{gva:x} outside fake RAM")
        return bytes(self.mem[off:off + size])

    def u64(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 8), "little")

    def u32(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 4), "little")

    def field(self, blob: bytes, key: str, fmt: str = "Q") -> int:
        return int(struct.unpack_from("<" + fmt, blob, self.off[key])[0])

    def struct(self, name: str, gva: int) -> bytes:
        return self.read(gva, self.off.size[name])

    def put(self, gva: int, *values: int) -> None:
        struct.pack_into(f"<{len(values)}Q", self.mem, gva - BASE, *values)

    def put32(self, gva: int, value: int) -> None:
        struct.pack_into("<I", self.mem, gva - BASE, value)


@dataclass
class SynthTask:
    gva: int
    pid: int
    tgid: int
    comm: str
    signal: int
    struct_pid: int = 0


class SynthLinux(FakeKernel):
    """A synthetic kernel whose task lists and PID idr agree: init_task plus `tasks` (pid, tgid, comm)."""

    def __init__(self, tasks: list[tuple[int, int, str]], limits: Limits | None = None) -> None:
        super().__init__(1 << 20, limits)
        self._next = BASE + 0x1000
        self.ns = self.alloc(0x100)
        self.symbols["init_pid_ns"] = self.ns
        self.init = self._task(0, 0, "swapper/0")
        self.symbols["init_task"] = self.init.gva
        self.tasks = [self._task(pid, tgid, comm) for pid, tgid, comm in tasks]
        self.leaders = [t for t in self.tasks if t.pid == t.tgid]
        o = self.off
        self.ring([self.init.gva + o["task_struct.tasks"]] + [t.gva + o["task_struct.tasks"] for t in self.leaders])
        for t in [self.init, *self.leaders]:
            group = [t] + [x for x in self.tasks if x.tgid == t.pid and x is not t]
            for x in group:
                self.put(x.gva + o["task_struct.signal"], t.signal)
            self.ring([t.signal + o["signal_struct.thread_head"]] +
                      [x.gva + o["task_struct.thread_node"] for x in group])
        self.nodes: dict[int, int] = {}  # first index covered -> leaf node gva
        self._build_idr()

    def alloc(self, size: int) -> int:
        gva = self._next
        self._next += (size + 63) & ~63
        return gva

    def _task(self, pid: int, tgid: int, comm: str) -> SynthTask:
        o = self.off
        gva = self.alloc(self.off.size["task_struct"])
        self.put32(gva + o["task_struct.pid"], pid)
        self.put32(gva + o["task_struct.tgid"], tgid)
        self.mem[gva - BASE + o["task_struct.comm"]:gva - BASE + o["task_struct.comm"] + 16] = \
            comm.encode().ljust(16, b"\0")[:16]
        return SynthTask(gva, pid, tgid, comm, self.alloc(self.off.size["signal_struct"]))

    def ring(self, links: list[int]) -> None:
        """Link list_heads `links` (the first is the head) into one ring with consistent prev pointers."""
        for i, link in enumerate(links):
            self.put(link, links[(i + 1) % len(links)], links[i - 1])

    def _build_idr(self) -> None:
        o = self.off
        leaves: dict[int, list[tuple[int, int]]] = {}
        for t in self.tasks:
            pid = self.alloc(self.off.size["pid"] + self.off.size["upid"])
            t.struct_pid = pid
            self.put32(pid + o["pid.numbers"] + o["upid.nr"], t.pid)
            self.put(pid + o["pid.numbers"] + o["upid.ns"], self.ns)
            links = t.gva + o["task_struct.pid_links"]
            self.put(pid + o["pid.tasks"], links)
            self.put(links + o["hlist_node.pprev"], pid + o["pid.tasks"])
            self.put(t.gva + o["task_struct.thread_pid"], pid)
            leaves.setdefault(t.pid >> 6, []).append((t.pid & 63, pid))
        two_levels = max(leaves) > 0
        root = self.alloc(576) if two_levels else 0
        for high, entries in leaves.items():
            node = self.alloc(576)
            self.nodes[high << 6] = node
            self._node(node, 0, high if two_levels else 0, root, entries)
        if two_levels:
            self._node(root, 6, 0, 0, [(high, self.nodes[high << 6] | 2) for high in leaves])
            self.root = root
        else:
            self.root = self.nodes[0]
        self.put(self.ns + o["pid_namespace.idr"] + o["idr.idr_rt"] + o["xarray.xa_head"], self.root | 2)
        self.put32(self.ns + o["pid_namespace.pid_allocated"], (1 << 31) | len(self.tasks))
        self.put(self.ns + o["pid_namespace.child_reaper"], self.task(1).gva)

    def _node(self, node: int, shift: int, offset: int, parent: int, entries: list[tuple[int, int]]) -> None:
        o = self.off
        self.mem[node - BASE + o["xa_node.shift"]] = shift
        self.mem[node - BASE + o["xa_node.offset"]] = offset
        self.mem[node - BASE + o["xa_node.count"]] = len(entries)
        self.put(node + o["xa_node.parent"], parent)
        for slot, entry in entries:
            self.put(node + o["xa_node.slots"] + 8 * slot, entry)

    def task(self, pid: int) -> SynthTask:
        return next(t for t in self.tasks if t.pid == pid)

    def unlink(self, pid: int) -> None:
        """Do what a DKOM rootkit's list_del() does to a leader: neighbours skip it, it is poisoned."""
        link = self.task(pid).gva + self.off["task_struct.tasks"]
        nxt, prv = self.u64(link), self.u64(link + 8)
        self.put(prv, nxt)
        self.put(nxt + 8, prv)
        self.put(link, 0xDEAD000000000100, 0xDEAD000000000122)
