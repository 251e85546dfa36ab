"""Socket walks on a synthetic kernel: both views agree on a sound one; a hidden socket is found; damage of
every kind (loops, absurd counts, broken back-pointers, truncated or garbage memory) makes the view
incomplete with its reason, never a made-up connection or a hidden-socket claim."""

from __future__ import annotations

import random

import pytest
from synth_kernel import BASE
from synth_net import EHASH, NET_OFFSETS, SynthNet

from nephoscope.core.errors import NephoscopeError
from nephoscope.os.linux.model import Limits
from nephoscope.os.linux.net import net_view, process_sockets, table_sockets


def _tuples(endpoints) -> set[tuple]:  # type: ignore[no-untyped-def]
    return {(e.socket.proto, e.socket.local, e.socket.local_port, e.socket.remote, e.socket.remote_port,
             e.socket.state) for e in endpoints}


def test_sound_kernel_views_agree() -> None:
    k = SynthNet()
    view = net_view(k, k.process_list())  # type: ignore[arg-type]
    assert view.files.complete and view.tables.complete and view.hidden.complete, view.views()
    assert view.hidden.items == [] and view.unowned == []
    files = {e.socket.sock_gva: e for e in view.files}
    assert set(files) == {s.sk for s in k.socks}
    assert _tuples(view.tables) == {("tcp", "0.0.0.0", 22, "0.0.0.0", 0, "LISTEN"),
                                    ("tcp", "10.0.2.15", 41000, "10.0.2.2", 25, "ESTABLISHED"),
                                    ("tcp", "10.0.2.15", 41002, "10.0.2.2", 25, "ESTABLISHED"),
                                    ("udp", "0.0.0.0", 5353, "0.0.0.0", 0, "CLOSE")}
    conn = files[k.conn.sk]
    assert [(o.pid, o.comm, o.fd) for o in conn.owners] == [(100, "client", 3)]
    assert conn.socket.inode == k.conn.inode and conn.socket.file_gva == k.conn.file
    assert files[k.unix.sk].socket.family == "unix" and files[k.unix.sk].owners[0].pid == 130
    merged = {e.socket.sock_gva: e.views for e in view.endpoints()}
    assert merged[k.conn.sk] == ["files", "tcp-established"] and merged[k.listen.sk] == ["files", "tcp-listen"]
    assert merged[k.unix.sk] == ["files"]


def test_socket_in_no_file_table_is_hidden() -> None:
    k = SynthNet()
    ghost = k.add("tcp", "10.0.2.15", 43000, "203.0.113.9", 6667, 1, owner=None, bucket=7)
    kernel = k.add("udp", "0.0.0.0", 4789, "0.0.0.0", 0, 7, owner=None, bucket=2, kernel_socket=True)
    view = net_view(k, k.process_list())  # type: ignore[arg-type]
    assert view.hidden.complete
    assert [e.socket.sock_gva for e in view.hidden] == [ghost.sk]
    assert view.hidden.items[0].socket.remote == "203.0.113.9" and view.hidden.items[0].socket.remote_port == 6667
    assert [e.socket.sock_gva for e in view.unowned] == [kernel.sk]  # a kernel socket: no file, no claim


def _damage(k: SynthNet, what: str) -> None:
    o = NET_OFFSETS
    node = k.conn2.sk + o["sock_common.skc_node"]  # head of bucket 5: conn2 -> conn -> nulls(5)
    if what == "cycle":
        k.put(k.conn.sk + o["sock_common.skc_node"], node)
    elif what == "self-loop":
        k.put(node, node, k.ehash + 8 * 5)
    elif what == "pprev":
        k.put(k.conn.sk + o["sock_common.skc_node"] + 8, 0xDEAD0000)
    elif what == "wrong-nulls":
        k.put(k.conn.sk + o["sock_common.skc_node"], (9 << 1) | 1)
    elif what == "garbage-chain":
        k.put(node, 0x4141414141414140)
    elif what == "absurd-mask":
        k.put32(k.symbols["tcp_hashinfo"] + 16, 0xFFFFFFFF)
    elif what == "not-power-of-two":
        k.put32(k.symbols["tcp_hashinfo"] + 16, EHASH + 2)
    elif what == "empty-bucket-marker":
        k.put(k.ehash + 8 * 6, (7 << 1) | 1)
    elif what == "unreadable-table":
        k.put(k.symbols["tcp_hashinfo"], 0x1234000)
    elif what == "family":
        k.put32(k.conn.sk + o["sock_common.skc_family"], 0xBEEF)
    elif what == "state":
        k.mem[k.conn.sk - BASE + o["sock_common.skc_state"]] = 99
    elif what == "udp-odd":
        k.put(k.udp + 16 * 9, 0x4141414141414141)


TABLE_DAMAGE = ["cycle", "self-loop", "pprev", "wrong-nulls", "garbage-chain", "absurd-mask", "not-power-of-two",
                "empty-bucket-marker", "unreadable-table", "family", "state", "udp-odd"]


@pytest.mark.parametrize("what", TABLE_DAMAGE)
def test_damaged_tables_are_incomplete_and_make_no_claims(what: str) -> None:
    k = SynthNet()
    k.add("tcp", "10.0.2.15", 43000, "203.0.113.9", 6667, 1, owner=None, bucket=7)  # would be hidden
    _damage(k, what)
    view = net_view(k, k.process_list())  # type: ignore[arg-type]
    assert not view.tables.complete and view.tables.problem, what
    assert not view.hidden.complete and view.hidden.items == [] and "incomplete" in view.hidden.problem
    truth = {(s.proto, s.local, s.lport, s.remote, s.rport) for s in k.socks}
    for e in view.tables.items + view.files.items:  # whatever was kept is real, never garbage
        s = e.socket
        assert s.family == "unix" or (s.proto, s.local, s.local_port, s.remote, s.remote_port) in truth


def _file_damage(k: SynthNet, what: str) -> None:
    o = NET_OFFSETS
    if what == "socket-file":
        k.put(k.conn.socket + o["socket.file"], k.conn2.file)
    elif what == "sk-socket":
        k.put(k.conn.sk + o["sock.sk_socket"], k.conn2.socket)
    elif what == "no-sk":
        k.put(k.conn.socket + o["socket.sk"], 0)
    elif what == "sk-type":
        k.put32(k.conn.sk + o["sock.sk_type"], 0x7777)
    elif what == "max-fds":
        fdt = k.u64(k.u64(k.task(100).gva + o["task_struct.files"]) + o["files_struct.fdt"])
        k.put32(fdt, 1 << 30)
    elif what == "fd-array":
        fdt = k.u64(k.u64(k.task(100).gva + o["task_struct.files"]) + o["files_struct.fdt"])
        k.put(fdt + 8, 0x7000)
    elif what == "private-data":
        k.put(k.conn.file + o["file.private_data"], 0x1230)


@pytest.mark.parametrize("what", ["socket-file", "sk-socket", "no-sk", "sk-type", "max-fds", "fd-array",
                                  "private-data"])
def test_corrupt_socket_structure_is_unverifiable_not_made_up(what: str) -> None:
    k = SynthNet()
    _file_damage(k, what)
    files = process_sockets(k, k.process_list().items)  # type: ignore[arg-type]
    assert not files.complete and files.problem
    assert k.conn.sk not in {e.socket.sock_gva for e in files}  # the damaged socket is left out, named
    view = net_view(k, k.process_list())  # type: ignore[arg-type]
    assert not view.hidden.complete and view.hidden.items == []  # an incomplete view makes no claim


def test_read_budget_bounds_the_walk() -> None:
    k = SynthNet(Limits(max_nodes=2))
    tables = table_sockets(k)  # type: ignore[arg-type]
    assert not tables.complete and "budget" in tables.problem


def test_random_bytes_on_socket_pages_never_crash_or_claim_wrongly() -> None:
    for seed in range(300):
        k = SynthNet()
        rng = random.Random(seed)
        s = rng.choice(k.socks)
        target = rng.choice([s.sk, s.sk + 96, s.socket, s.file, k.ehash, k.lhash, k.udp, k.symbols["tcp_hashinfo"]])
        start = target - BASE + rng.randrange(0, 16) * 8
        length = rng.choice([8, 16, 64])
        k.mem[start:start + length] = (bytes(length) if seed % 3 == 0 else rng.randbytes(length))
        try:
            view = net_view(k, k.process_list())  # type: ignore[arg-type]
        except NephoscopeError:
            continue
        for e in view.hidden.items:  # a claim only from complete views, about a sock a table really holds
            assert view.files.complete and view.tables.complete
            assert e.socket.file_gva
        for e in view.endpoints():
            assert e.socket.family in ("inet", "inet6", "unix", "netlink", "packet") or \
                e.socket.family.startswith("af:")


def test_confirmation_walks_every_thread_before_calling_a_socket_hidden() -> None:
    from synth_net import task_of

    from nephoscope.os.linux.net import confirmed_view
    from nephoscope.os.linux.walkers import Listing

    k = SynthNet()
    ghost = k.add("tcp", "10.0.2.15", 43000, "203.0.113.9", 6667, 1, owner=None, bucket=7)
    k.threads = lambda: k.process_list()  # type: ignore[method-assign]
    view = confirmed_view(k, k.process_list())  # type: ignore[arg-type]
    assert [e.socket.sock_gva for e in view.hidden] == [ghost.sk]  # hidden in both passes
    # a thread of pid 100 that unshared its file table holds it: not hidden
    thread = k._task(101, 100, "client")
    k.tasks.append(thread)
    k.fds[101] = [ghost.file]
    k._files(101)
    k.threads = lambda: Listing([*k.process_list().items, task_of(thread.gva, 101, "client")])  # type: ignore
    view = confirmed_view(k, k.process_list())  # type: ignore[arg-type]
    assert view.hidden.complete and view.hidden.items == []
