"""Walker primitives on synthetic kernel memory: good lists and trees, cycles, garbage, absurd sizes."""

from __future__ import annotations

import time

from synth_kernel import BASE, FakeKernel

from nephoscope.os.linux.walkers import _state, iter_maple_leaves, walk_list


def _ring(k: FakeKernel, nodes: list[int], head: int) -> None:
    chain = [head, *nodes]
    for i, node in enumerate(chain):
        k.put(node, chain[(i + 1) % len(chain)], chain[i - 1])


def test_list_walk_returns_containers() -> None:
    k = FakeKernel()
    head, nodes = BASE + 0x100, [BASE + 0x1000 + 0x100 * i for i in range(5)]
    _ring(k, nodes, head)
    out = walk_list(k, head, 0x10, 100, "test")  # type: ignore[arg-type]
    assert out.complete and out.items == [n - 0x10 for n in nodes]


def test_cyclic_list_stops_with_problem() -> None:
    k = FakeKernel()
    head, a, b, c = BASE + 0x100, BASE + 0x200, BASE + 0x300, BASE + 0x400
    _ring(k, [a, b, c], head)
    k.put(c, b, b)  # c -> b: never returns to head, back-pointers consistent for the loop
    k.put(b, c, a)
    t0 = time.perf_counter()
    out = walk_list(k, head, 0, 1 << 20, "cyclic")  # type: ignore[arg-type]
    assert not out.complete and ("cycle" in out.problem or "point back" in out.problem)
    assert time.perf_counter() - t0 < 30  # bounded, not a speed target


def test_garbage_pointer_and_cap() -> None:
    k = FakeKernel()
    head, a = BASE + 0x100, BASE + 0x200
    k.put(head, a, a)
    k.put(a, 0xDEADBEEF00000000, head)
    out = walk_list(k, head, 0, 100, "garbage")  # type: ignore[arg-type]
    assert not out.complete and "unreadable" in out.problem and len(out) == 1
    nodes = [BASE + 0x1000 + 0x10 * i for i in range(50)]
    _ring(k, nodes, head)
    capped = walk_list(k, head, 0, 10, "long")  # type: ignore[arg-type]
    assert not capped.complete and "more than 10" in capped.problem and len(capped) == 10


def _leaf(k: FakeKernel, node: int, entries: list[tuple[int, int]], hi: int) -> None:
    """Write a maple_leaf_64 node: entries are (pivot, slot); unused pivots stay zero, meta end at 248."""
    for i, (pivot, slot) in enumerate(entries):
        if i < 15:
            k.put(node + 8 + 8 * i, pivot)
        k.put(node + 128 + 8 * i, slot)
    if len(entries) < 16:
        k.mem[node - BASE + 248] = len(entries) - 1


def test_maple_tree_walk_and_hostile_nodes() -> None:
    k = FakeKernel()
    root_node, left, right = BASE + 0x1000, BASE + 0x2000, BASE + 0x3000
    # arange_64 root: slot 0 covers [0, 0x4fff], slot 1 covers [0x5000, max]
    k.put(root_node + 8, 0x4FFF)
    k.put(root_node + 80, left | (1 << 3) | 4, right | (1 << 3) | 4)
    k.mem[root_node - BASE + 240] = 1
    _leaf(k, left, [(0x0FFF, 0), (0x1FFF, 0xAAA0), (0x4FFF, 0)], 0x4FFF)
    _leaf(k, right, [(0x6FFF, 0xBBB0), ((1 << 64) - 1, 0)], (1 << 64) - 1)
    root = root_node | (3 << 3) | 4 | 2
    out = iter_maple_leaves(k, root)  # type: ignore[arg-type]
    assert out.complete, out.problem
    assert out.items == [(0xAAA0, 0x1000, 0x1FFF), (0xBBB0, 0x5000, 0x6FFF)]
    # a child that points back at the root node: revisit detected, bounded
    k.put(root_node + 88, root_node | (3 << 3) | 4)
    cyc = iter_maple_leaves(k, root)  # type: ignore[arg-type]
    assert not cyc.complete and "revisited" in cyc.problem
    # a node of an unknown type and a node outside RAM
    k.put(root_node + 88, right | (9 << 3) | 4)
    assert "unexpected type" in iter_maple_leaves(k, root).problem  # type: ignore[arg-type]
    k.put(root_node + 88, 0x1234000 | (1 << 3) | 4)
    assert "unreadable" in iter_maple_leaves(k, root).problem  # type: ignore[arg-type]
    # absurd metadata end
    k.put(root_node + 88, right | (1 << 3) | 4)
    k.mem[root_node - BASE + 240] = 200
    assert "claims" in iter_maple_leaves(k, root).problem  # type: ignore[arg-type]


def test_task_state_letters() -> None:
    assert [_state(s, 0) for s in (0, 1, 2, 4, 8)] == list("RSDTt")
    assert _state(0, 0x20) == "Z" and _state(0x402, 0) == "I"
