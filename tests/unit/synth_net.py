"""A synthetic guest network stack for socket-walk tests: processes with file tables holding sockets, and the
kernel's TCP (established, listening), UDP and raw tables holding the same socks, laid out like 6.1.

`SynthNet` builds a consistent picture (every back-pointer and nulls marker right) so a test can damage
exactly one thing. Offsets are compact but every structure is where net.py looks for it.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from synth_kernel import BASE, SynthLinux

from nephoscope.os.linux.model import Limits
from nephoscope.os.linux.net import LISTENING_NULLS_BASE, NetLayout
from nephoscope.os.linux.walkers import Listing, Task

NET_OFFSETS = {
    "task_struct.files": 0x90, "files_struct.fdt": 0x20, "fdtable.max_fds": 0, "fdtable.fd": 8,
    "file.f_op": 0x10, "file.private_data": 0x18,
    "socket.state": 0, "socket.type": 4, "socket.file": 16, "socket.sk": 24,
    "socket_alloc.socket": 0, "socket_alloc.vfs_inode": 128, "inode.i_ino": 64,
    "sock_common.skc_daddr": 0, "sock_common.skc_rcv_saddr": 4, "sock_common.skc_hash": 8,
    "sock_common.skc_dport": 12, "sock_common.skc_num": 14, "sock_common.skc_family": 16,
    "sock_common.skc_state": 18, "sock_common.skc_net": 48, "sock_common.skc_v6_daddr": 56,
    "sock_common.skc_v6_rcv_saddr": 72, "sock_common.skc_node": 104, "sock_common.skc_refcnt": 128,
    "sock.__sk_common": 0, "sock.sk_receive_queue.qlen": 160, "sock.sk_backlog.rmem_alloc": 200,
    "sock.sk_wmem_alloc": 240, "sock.sk_type": 520, "sock.sk_protocol": 522, "sock.sk_socket": 528,
    "sock.sk_ack_backlog": 536, "sock.sk_max_ack_backlog": 540,
    "tcp_sock.write_seq": 800, "tcp_sock.snd_una": 804, "tcp_sock.rcv_nxt": 808, "tcp_sock.copied_seq": 812,
    "unix_sock.sk": 0, "unix_sock.addr": 776, "unix_sock.peer": 784, "unix_address.len": 4, "unix_address.name": 8,
    "inet_hashinfo.ehash": 0, "inet_hashinfo.ehash_mask": 16, "inet_hashinfo.lhash2_mask": 60,
    "inet_hashinfo.lhash2": 64, "inet_ehash_bucket.chain": 0, "inet_listen_hashbucket.nulls_head": 8,
    "udp_table.hash": 0, "udp_table.mask": 16, "udp_hslot.head": 0, "udp_hslot.count": 8, "raw_hashinfo.ht": 64,
}
NET_SIZES = {"sock_common": 136, "sock": 776, "tcp_sock": 1024, "unix_sock": 800, "socket": 128, "file": 64,
             "inet_ehash_bucket": 8, "inet_listen_hashbucket": 16, "udp_hslot": 16}
SOCKET_FILE_OPS = BASE + 0x500
INIT_NET = BASE + 0x600
EHASH, LHASH, UDP = 16, 8, 16  # buckets


class NetOffsets(dict[str, int]):
    def __init__(self) -> None:
        super().__init__(NET_OFFSETS)
        self.size = dict(NET_SIZES)
        self.msize = {k: 8 for k in NET_OFFSETS} | {"raw_hashinfo.ht": 2048}
        self.count: dict[str, int] = {}


@dataclass
class SynthSock:
    sk: int
    socket: int
    file: int
    inode: int
    proto: str
    local: str
    lport: int
    remote: str
    rport: int
    state: int
    bucket: int = -1


def synth_layout() -> NetLayout:
    lay = object.__new__(NetLayout)
    lay.off = NetOffsets()  # type: ignore[assignment]
    lay.socket_file_ops = SOCKET_FILE_OPS
    lay.ipv6 = True
    lay.sock_size = NET_SIZES["sock"]
    lay.tcp_size = NET_SIZES["tcp_sock"]
    return lay


def task_of(gva: int, pid: int, comm: str) -> Task:
    return Task(gva, pid, pid, 1, comm, "S", 0, 0, 0, 0, 0, 0, False, BASE + 0x700, f"/usr/bin/{comm}", [comm])


class SynthNet(SynthLinux):
    """init + three processes (sshd listening, a client with an established TCP connection and a UDP socket,
    a unix socket holder), the kernel's tables holding the same socks."""

    def __init__(self, limits: Limits | None = None) -> None:
        super().__init__([(1, 1, "init"), (70, 70, "sshd"), (100, 100, "client"), (130, 130, "unixd")], limits)
        self.off.update({k: v for k, v in NET_OFFSETS.items() if k.startswith(("task_struct", "files_struct",
                                                                               "fdtable"))})
        self._net_layout = synth_layout()
        self.symbols["socket_file_ops"] = SOCKET_FILE_OPS
        for name in ("tcp_hashinfo", "udp_table", "raw_v4_hashinfo", "raw_v6_hashinfo"):
            self.symbols[name] = self.alloc(2200)
        self.ehash = self.alloc(8 * EHASH)
        self.lhash = self.alloc(16 * LHASH)
        self.udp = self.alloc(16 * UDP)
        hi = self.symbols["tcp_hashinfo"]
        self.put(hi, self.ehash)
        self.put32(hi + 16, EHASH - 1)
        self.put32(hi + 60, LHASH - 1)
        self.put(hi + 64, self.lhash)
        self.put(self.symbols["udp_table"], self.udp)
        self.put32(self.symbols["udp_table"] + 16, UDP - 1)
        for i in range(EHASH):
            self.put(self.ehash + 8 * i, (i << 1) | 1)
        for i in range(LHASH):
            self.put(self.lhash + 16 * i + 8, ((i + LISTENING_NULLS_BASE) << 1) | 1)
        self.fds: dict[int, list[int]] = {70: [], 100: [], 130: []}
        self.socks: list[SynthSock] = []
        self.listen = self.add("tcp", "0.0.0.0", 22, "0.0.0.0", 0, 10, owner=70, bucket=3)
        self.conn = self.add("tcp", "10.0.2.15", 41000, "10.0.2.2", 25, 1, owner=100, bucket=5)
        self.conn2 = self.add("tcp", "10.0.2.15", 41002, "10.0.2.2", 25, 1, owner=100, bucket=5)
        self.dgram = self.add("udp", "0.0.0.0", 5353, "0.0.0.0", 0, 7, owner=100, bucket=9)
        self.unix = self.add("unix", "", 0, "", 0, 1, owner=130)
        for pid in self.fds:
            self._files(pid)

    def add(self, proto: str, local: str, lport: int, remote: str, rport: int, state: int, owner: int | None,
            bucket: int = -1, kernel_socket: bool = False) -> SynthSock:
        o = NET_OFFSETS
        sk = self.alloc(NET_SIZES["tcp_sock"])
        alloc = self.alloc(256)
        file = self.alloc(64)
        inode = 9000 + len(self.socks)
        family = {"unix": 1}.get(proto, 2)
        struct.pack_into("<4s4s", self.mem, sk - BASE, ipaddress.IPv4Address(remote or "0.0.0.0").packed,
                         ipaddress.IPv4Address(local or "0.0.0.0").packed)
        struct.pack_into(">H", self.mem, sk - BASE + 12, rport)
        struct.pack_into("<HH", self.mem, sk - BASE + 14, lport, family)
        self.mem[sk - BASE + 18] = state
        self.put(sk + o["sock_common.skc_net"], INIT_NET)
        struct.pack_into("<HH", self.mem, sk - BASE + 520, 1 if proto in ("tcp", "unix") else 2,
                         {"tcp": 6, "udp": 17}.get(proto, 0))
        self.put32(sk + o["sock.sk_wmem_alloc"], 1)
        self.put(sk + o["sock.sk_socket"], alloc)
        self.put(alloc + o["socket.sk"], sk)
        self.put(alloc + o["socket.file"], 0 if kernel_socket else file)
        self.put(alloc + 128 + 64, inode)
        self.put(file + o["file.f_op"], SOCKET_FILE_OPS)
        self.put(file + o["file.private_data"], alloc)
        s = SynthSock(sk, alloc, 0 if kernel_socket else file, inode, proto, local, lport, remote, rport, state,
                      bucket)
        self.socks.append(s)
        if owner is not None:
            self.fds[owner].append(file)
        if bucket >= 0:
            self.hash_in(s)
        return s

    def chain_head(self, s: SynthSock) -> int:
        if s.proto == "udp":
            return self.udp + 16 * s.bucket
        return self.lhash + 16 * s.bucket + 8 if s.state == 10 else self.ehash + 8 * s.bucket

    def hash_in(self, s: SynthSock) -> None:
        """Add `s` at the head of its chain (hlist_add_head: pprev = &head)."""
        head = self.chain_head(s)
        node = s.sk + NET_OFFSETS["sock_common.skc_node"]
        first = self.u64(head)
        self.put(node, first, head)
        if first and not first & 1:
            self.put(first + 8, node)
        self.put(head, node)

    def _files(self, pid: int) -> None:
        o = self.off
        fs, fdt, array = self.alloc(64), self.alloc(64), self.alloc(64)
        files = [0, 0, 0, *self.fds[pid]]  # stdin..stderr closed
        self.put(self.task(pid).gva + o["task_struct.files"], fs)
        self.put(fs + o["files_struct.fdt"], fdt)
        self.put32(fdt, len(files))
        self.put(fdt + 8, array)
        for i, f in enumerate(files):
            self.put(array + 8 * i, f)

    def process_list(self) -> Listing[Task]:
        return Listing([task_of(t.gva, t.pid, t.comm) for t in self.leaders])
