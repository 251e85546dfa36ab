"""The cross-view and the PID idr on a synthetic kernel: a sound one, real DKOM, and damage of every kind.

A damaged view must make the cross-view unverifiable (no claims), never a hidden process; a real
unlink with its neighbours' pointers fixed must still be reported.
"""

from __future__ import annotations

import random
import struct

import pytest
from synth_kernel import BASE, SynthLinux

from nephoscope.core.errors import GuestDataError
from nephoscope.os.btf.build import BtfBuilder
from nephoscope.os.btf.reader import Btf
from nephoscope.os.linux.model import Budget, Limits, Offsets
from nephoscope.os.linux.walkers import cross_view, hidden_processes, iter_pid_idr, walk_list

TASKS = [(1, 1, "init"), (2, 2, "kthreadd"), (70, 70, "sshd"), (71, 71, "nginx"), (72, 71, "nginx"),
         (100, 100, "sleep"), (130, 130, "sh")]


def _kernel(**limits: int) -> SynthLinux:
    return SynthLinux(TASKS, Limits(**limits) if limits else None)


def _claims(k: SynthLinux) -> list[tuple[int, bool, bool, str]]:
    hidden = hidden_processes(k)  # type: ignore[arg-type]
    return [(h.pid, h.in_task_list, h.in_pid_idr, h.comm) for h in hidden]


def test_sound_kernel_views_agree() -> None:
    k = _kernel()
    idr = iter_pid_idr(k)  # type: ignore[arg-type]
    assert idr.complete, idr.problem
    assert sorted(idr.items) == sorted((t.pid, t.gva) for t in k.tasks)
    cv = cross_view(k)  # type: ignore[arg-type]
    assert cv.verified and cv.threads.complete and len(cv.threads) == len(TASKS)
    assert cv.hidden.items == []


def test_proper_unlink_is_still_reported_hidden() -> None:
    k = _kernel()
    k.unlink(100)
    hidden = hidden_processes(k)  # type: ignore[arg-type]
    assert hidden.complete, hidden.problem
    assert _claims(k) == [(100, False, True, "sleep")]


def test_unhashed_pid_is_reported_on_the_list_only() -> None:
    k = _kernel()
    k.put(k.nodes[64] + k.off["xa_node.slots"] + 8 * (100 - 64), 0)  # idr_remove without the unlink
    k.mem[k.nodes[64] - BASE + k.off["xa_node.count"]] -= 1
    allocated = k.ns + k.off["pid_namespace.pid_allocated"]
    k.put32(allocated, k.u32(allocated) - 1)
    assert _claims(k) == [(100, True, False, "sleep")]


def test_next_pointing_back_at_the_head_is_incomplete() -> None:
    k = _kernel()
    # the third leader's tasks.next jumps to &init_task.tasks: the walk ends early at the head
    k.put(k.leaders[2].gva + k.off["task_struct.tasks"], k.init.gva + k.off["task_struct.tasks"])
    listing = walk_list(k, k.init.gva + 0x10, 0x10, 100, "tasks")  # type: ignore[arg-type]
    assert not listing.complete and "head's prev" in listing.problem
    hidden = hidden_processes(k)  # type: ignore[arg-type]
    assert not hidden.complete and not hidden.items and "task list" in hidden.problem


@pytest.mark.parametrize("damage", ["cycle", "self-loop", "garbage", "zeroed"])
def test_damaged_task_list_makes_no_claims(damage: str) -> None:
    k = _kernel()
    link = k.leaders[3].gva + k.off["task_struct.tasks"]
    if damage == "cycle":
        k.put(link, k.leaders[1].gva + k.off["task_struct.tasks"])
    elif damage == "self-loop":
        k.put(link, link, link)
    elif damage == "garbage":
        k.put(link, 0xDEADBEEF00000000)
    else:
        start = k.leaders[3].gva - BASE
        k.mem[start:start + k.off.size["task_struct"]] = bytes(k.off.size["task_struct"])
    hidden = hidden_processes(k)  # type: ignore[arg-type]
    assert not hidden.complete and hidden.items == [] and "unverifiable" in hidden.problem


def _idr_damage(k: SynthLinux, what: str) -> None:
    o = k.off
    leaf = k.nodes[64]
    t = k.task(70)
    if what == "shift":
        k.mem[leaf - BASE + o["xa_node.shift"]] = 3
    elif what == "parent":
        k.put(leaf + o["xa_node.parent"], leaf)
    elif what == "offset":
        k.mem[leaf - BASE + o["xa_node.offset"]] = 5
    elif what == "count":
        k.mem[leaf - BASE + o["xa_node.count"]] = 1
    elif what == "nr":
        k.put32(t.struct_pid + o["pid.numbers"] + o["upid.nr"], 99)
    elif what == "ns":
        k.put(t.struct_pid + o["pid.numbers"] + o["upid.ns"], BASE + 8)
    elif what == "task-pid":
        k.put32(t.gva + o["task_struct.pid"], 7000)
    elif what == "pprev":
        k.put(t.gva + o["task_struct.pid_links"] + o["hlist_node.pprev"], 0)
    elif what == "thread-pid":
        k.put(t.gva + o["task_struct.thread_pid"], k.task(71).struct_pid)
    elif what == "node-loop":
        k.put(k.root + o["xa_node.slots"] + 8 * 2, k.root | 2)
    elif what == "unreadable-node":
        k.put(k.root + o["xa_node.slots"] + 8, 0x1234000 | 2)
    elif what == "emptied":
        k.put(k.ns + o["pid_namespace.idr"] + o["idr.idr_rt"] + o["xarray.xa_head"], 0)
    elif what == "reaper":
        k.put(k.ns + o["pid_namespace.child_reaper"], k.task(2).gva)


@pytest.mark.parametrize("what", ["shift", "parent", "offset", "count", "nr", "ns", "task-pid", "pprev",
                                  "thread-pid", "node-loop", "unreadable-node", "emptied", "reaper"])
def test_idr_that_breaks_its_invariants_is_invalid(what: str) -> None:
    k = _kernel()
    _idr_damage(k, what)
    idr = iter_pid_idr(k)  # type: ignore[arg-type]
    assert not idr.complete and idr.problem.startswith("pid idr")
    hidden = hidden_processes(k)  # type: ignore[arg-type]
    assert not hidden.complete and hidden.items == [] and "PID idr" in hidden.problem


def test_random_or_zeroed_bytes_on_idr_pages_never_yield_wrong_pids_or_claims() -> None:
    truth = {(t.pid, t.gva) for t in _kernel().tasks} | {(t.pid, 0) for t in _kernel().tasks}
    for seed in range(600):
        k = _kernel()
        rng = random.Random(seed)
        target = rng.choice([k.root, k.nodes[0], k.nodes[64], k.task(70).struct_pid, k.task(100).struct_pid,
                             k.ns, k.task(100).gva, k.task(72).gva, k.leaders[2].signal])
        start = target - BASE + rng.randrange(0, 64) * 8
        length = rng.choice([8, 16, 64, 576])
        k.mem[start:start + length] = rng.randbytes(length) if seed % 3 else bytes(length)
        idr = iter_pid_idr(k)  # type: ignore[arg-type]
        assert not idr.complete or set(idr.items) <= truth, (seed, idr.items)
        hidden = hidden_processes(k)  # type: ignore[arg-type]
        assert hidden.items == [], (seed, hidden.items)  # nothing was hidden: damage is never a claim


def test_pid_twice_on_the_task_list_is_unverifiable() -> None:
    k = _kernel()
    k.put32(k.task(100).gva + k.off["task_struct.pid"], 70)
    hidden = hidden_processes(k)  # type: ignore[arg-type]
    assert not hidden.complete and hidden.items == []


def test_listed_task_whose_own_struct_pid_disagrees_is_unverifiable() -> None:
    k = _kernel()
    # remove pid 100 from the idr, and make its task claim another number than its struct pid says
    k.put(k.nodes[64] + k.off["xa_node.slots"] + 8 * (100 - 64), 0)
    k.mem[k.nodes[64] - BASE + k.off["xa_node.count"]] -= 1
    k.put32(k.ns + k.off["pid_namespace.pid_allocated"], (1 << 31) | (len(TASKS) - 1))
    k.put32(k.task(100).gva + k.off["task_struct.pid"], 4242)
    hidden = hidden_processes(k)  # type: ignore[arg-type]
    assert not hidden.complete and hidden.items == [] and "struct pid says 100" in hidden.problem


def test_one_budget_bounds_every_walk_and_is_reported() -> None:
    k = _kernel(max_reads=60)
    hidden = hidden_processes(k)  # type: ignore[arg-type]
    assert not hidden.complete and hidden.items == [] and "budget" in hidden.problem
    assert k.budget.exhausted
    nodes = Budget(Limits(max_nodes=3))
    for _ in range(3):
        nodes.node()
    with pytest.raises(GuestDataError, match="budget"):
        nodes.node()
    with pytest.raises(GuestDataError, match="refusing"):
        Budget(Limits()).read(1 << 30)


def test_budget_caps_a_long_list_walk() -> None:
    k = _kernel(max_nodes=4)
    listing = walk_list(k, k.init.gva + 0x10, 0x10, 100, "tasks")  # type: ignore[arg-type]
    assert not listing.complete and "budget" in listing.problem


# --- BTF numbers checked against bounds ------------------------------------------------------------


def _btf(size: int, members: list[tuple[str, int]], array: int = 16) -> Btf:
    b = BtfBuilder()
    u32 = b.int("unsigned int", 4)
    arr = b.array(u32, u32, array)
    b.struct("thing", size, [(name, arr if name == "table" else u32, off * 8, 0) for name, off in members])
    return Btf.parse(b.blob())


def test_offsets_give_sizes_and_array_lengths() -> None:
    off = Offsets(_btf(72, [("a", 0), ("table", 4)]), {"thing": ["a", "table"]}, "test", ("thing",))
    assert off["thing.table"] == 4 and off.count["thing.table"] == 16 and off.msize["thing.table"] == 64
    assert off.size["thing"] == 72


@pytest.mark.parametrize(("size", "members", "match"), [
    (0, [("a", 0)], "size 0"),
    (8, [("a", 0), ("table", 4)], "ends past"),
    (0x10000000, [("a", 0)], "size 268435456"),
])
def test_impossible_btf_layouts_are_refused(size: int, members: list[tuple[str, int]], match: str) -> None:
    with pytest.raises(GuestDataError, match=match):
        Offsets(_btf(size, members), {"thing": [m for m, _ in members]}, "test", ("thing",))


def test_listing_of_a_corrupt_task_list_is_cheap() -> None:
    k = _kernel()
    link = k.leaders[0].gva + k.off["task_struct.tasks"]
    struct.pack_into("<Q", k.mem, link - BASE, link)
    walk_list(k, k.init.gva + 0x10, 0x10, 1 << 20, "tasks")  # type: ignore[arg-type]
    assert k.budget.reads < 100
