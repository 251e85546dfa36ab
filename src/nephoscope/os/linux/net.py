"""Sockets from the guest kernel's own structures: per process (file tables) and in the global tables.

Two independent kernel views of the guest's network endpoints:
- per process: task → files → fdtable → struct file whose `f_op` is `socket_file_ops` → struct socket
  (`private_data`) → struct sock, each link proved by its back-pointer (`socket->file`, `sk->sk_socket`);
- the kernel's lookup tables: TCP established (`tcp_hashinfo.ehash`, hlist_nulls chains whose nulls
  marker names the bucket) and listening (`lhash2`) hashes, the UDP and UDP-Lite tables, the raw IPv4
  and IPv6 hashes.
Every member offset comes from the guest's BTF (resolved once, `net_layout`), every walk is bounded
(chain caps, revisit detection, pprev back-pointers, the model's one read budget), and a walk that
had to stop is a `Listing` with `complete=False` and its problem: a socket whose structure does not
hold together is left out and named, never reported with made-up fields.

Addresses are kernel gvas. Nothing here pauses the VM (use `LinuxKernel.paused()` for consistency).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nephoscope.core.errors import GuestDataError, MemoryAccessError
from nephoscope.os.linux.walkers import Listing, Task, fd_table

if TYPE_CHECKING:
    from nephoscope.os.linux.model import LinuxKernel

_BAD = (MemoryAccessError, GuestDataError)
# The members the socket walks read. sock_common is struct sock's first member (__sk_common), the
# IPv6 addresses exist with CONFIG_IPV6; tcp_sock, unix_sock, netlink_sock and packet_sock start with
# their struct sock (checked in net_layout).
NET_WANTED: dict[str, list[str]] = {
    "file": ["f_op", "private_data"],
    "socket": ["state", "type", "file", "sk"],
    "socket_alloc": ["socket", "vfs_inode"],
    "inode": ["i_ino"],
    "sock_common": ["skc_daddr", "skc_rcv_saddr", "skc_hash", "skc_dport", "skc_num", "skc_family", "skc_state",
                    "skc_net", "skc_v6_daddr?", "skc_v6_rcv_saddr?", "skc_node", "skc_refcnt"],
    "sock": ["__sk_common", "sk_type", "sk_protocol", "sk_socket", "sk_backlog.rmem_alloc", "sk_wmem_alloc",
             "sk_ack_backlog", "sk_max_ack_backlog", "sk_receive_queue.qlen"],
    "tcp_sock": ["write_seq", "snd_una", "rcv_nxt", "copied_seq"],
    "unix_sock": ["sk", "addr", "peer"],
    "unix_address": ["len", "name"],
    "netlink_sock": ["sk", "portid", "dst_portid"],
    "packet_sock": ["sk", "ifindex", "num"],
    "inet_hashinfo": ["ehash", "ehash_mask", "lhash2_mask", "lhash2"],
    "inet_ehash_bucket": ["chain"],
    "inet_listen_hashbucket": ["nulls_head"],
    "udp_table": ["hash", "mask"],
    "udp_hslot": ["head", "count"],
    "raw_hashinfo": ["ht"],
}
WIDTHS = {"sock_common.skc_daddr": 4, "sock_common.skc_rcv_saddr": 4, "sock_common.skc_dport": 2,
          "sock_common.skc_num": 2, "sock_common.skc_family": 2, "sock_common.skc_state": 1,
          "sock_common.skc_hash": 4, "sock.sk_type": 2, "sock.sk_protocol": 2, "socket.type": 2,
          "socket.state": 4, "tcp_sock.write_seq": 4, "tcp_sock.snd_una": 4, "tcp_sock.rcv_nxt": 4,
          "tcp_sock.copied_seq": 4, "inet_hashinfo.ehash_mask": 4, "inet_hashinfo.lhash2_mask": 4,
          "udp_table.mask": 4, "sock_common.skc_v6_daddr": 16, "sock_common.skc_v6_rcv_saddr": 16,
          "inode.i_ino": 8, "netlink_sock.portid": 4, "packet_sock.num": 2}
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, AF_PACKET = 1, 2, 10, 16, 17
AF_MAX = 46
FAMILIES = {AF_UNIX: "unix", AF_INET: "inet", AF_INET6: "inet6", AF_NETLINK: "netlink", AF_PACKET: "packet"}
TYPES = {1: "stream", 2: "dgram", 3: "raw", 4: "rdm", 5: "seqpacket", 6: "dccp", 10: "packet"}
TCP_STATES = ("", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT", "CLOSE",
              "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV")
TCP_ESTABLISHED, TCP_TIME_WAIT, TCP_CLOSE, TCP_LISTEN, TCP_NEW_SYN_RECV = 1, 6, 7, 10, 12
IPPROTO = {0: "ip", 1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 136: "udplite", 255: "raw"}
SOCK_ALLOC_CHECK = 1 << 24  # more hash buckets than this in a guest table is absurd
MAX_CHAIN = 1 << 16  # sockets in one hash chain
LISTENING_NULLS_BASE = 1 << 29  # include/net/inet_hashtables.h: lhash2 chains end in nulls i + this
RAW_HTABLE_SIZE = 256
# tables walked independently of the file tables: (name, kallsyms symbol, kind)
TABLES = (("tcp-established", "tcp_hashinfo", "ehash"), ("tcp-listen", "tcp_hashinfo", "lhash2"),
          ("udp", "udp_table", "udp"), ("udplite", "udplite_table", "udp"),
          ("raw", "raw_v4_hashinfo", "raw"), ("raw6", "raw_v6_hashinfo", "raw"))


@dataclass(frozen=True, slots=True)
class Socket:
    """One socket as the guest kernel's struct sock describes it (addresses as text, ports as numbers)."""

    sock_gva: int
    family: str  # inet, inet6, unix, netlink, packet, or "af:N"
    type: str  # stream, dgram, raw, seqpacket, packet, or "type:N"
    protocol: int  # sk_protocol: IPPROTO_* for inet, the netlink protocol, the ethertype for packet
    proto: str  # netstat's column: tcp, tcp6, udp, udp6, raw, raw6, unix, netlink, packet
    state: str
    local: str
    local_port: int
    remote: str
    remote_port: int
    rx_queue: int
    tx_queue: int
    inode: int
    netns_gva: int
    socket_gva: int = 0  # the struct socket (0 for a time-wait or request socket)
    file_gva: int = 0  # the struct file of the socket (0: a kernel socket or none)
    peer_gva: int = 0  # unix: the peer's struct sock

    @property
    def inet(self) -> bool:
        return self.family in ("inet", "inet6")

    def to_dict(self) -> dict[str, object]:
        """Return the socket as a JSON-ready dict."""
        return {"proto": self.proto, "family": self.family, "type": self.type, "protocol": self.protocol,
                "state": self.state, "local": self.local, "local_port": self.local_port, "remote": self.remote,
                "remote_port": self.remote_port, "rx_queue": self.rx_queue, "tx_queue": self.tx_queue,
                "inode": self.inode, "sock": f"0x{self.sock_gva:x}"}


@dataclass(frozen=True, slots=True)
class Owner:
    """A process that holds a socket in its file table (pid, comm, fd)."""

    pid: int
    comm: str
    fd: int
    exe: str = ""


@dataclass(slots=True)
class Endpoint:
    """A socket and who holds it, and which kernel views saw it (`files`, and table names)."""

    socket: Socket
    owners: list[Owner] = field(default_factory=list)
    views: list[str] = field(default_factory=list)


@dataclass(slots=True)
class NetView:
    """Both kernel views of the guest's sockets and the sockets only the tables know (hidden connections).

    `hidden` holds claims only when the process walk and every table walk were complete; otherwise it is
    incomplete and its problem names the view that failed.
    """

    files: Listing[Endpoint]  # sockets found through process file tables (owners filled)
    tables: Listing[Endpoint]  # sockets found in the kernel's hash tables
    hidden: Listing[Endpoint]  # in a table, with a user-space file, held by no listed process
    unowned: list[Endpoint] = field(default_factory=list)  # in a table, no file: kernel, orphaned, time-wait

    def endpoints(self) -> list[Endpoint]:
        """Return every socket seen, once, with the views that saw it (file tables first)."""
        merged: dict[int, Endpoint] = {}
        for e in self.files.items:
            merged[e.socket.sock_gva or -e.socket.socket_gva] = Endpoint(e.socket, list(e.owners), ["files"])
        for e in self.tables.items:
            known = merged.get(e.socket.sock_gva)
            if known is None:
                merged[e.socket.sock_gva] = Endpoint(e.socket, [], list(e.views))
            else:
                known.views.extend(v for v in e.views if v not in known.views)
        return list(merged.values())

    def views(self) -> dict[str, dict[str, object]]:
        """Return each view's completeness (JSON-ready)."""
        return {"files": {"count": len(self.files), "complete": self.files.complete, "problem": self.files.problem},
                "tables": {"count": len(self.tables), "complete": self.tables.complete,
                           "problem": self.tables.problem},
                "cross_view": {"verdict": "verified" if self.hidden.complete else "unverifiable",
                               "problem": self.hidden.problem, "hidden": len(self.hidden)}}


class NetLayout:
    """Member offsets of the socket structures (from the guest's BTF) and the symbols the walks need."""

    def __init__(self, k: LinuxKernel) -> None:
        from nephoscope.os.linux.model import Offsets

        kernel = k.info.release or "unknown kernel"
        wanted = {s: list(m) for s, m in NET_WANTED.items() if s in ("file", "socket", "sock_common", "sock")
                  or k.types.has_struct(s)}
        self.off = Offsets(k.types, wanted, kernel)
        o = self.off
        bad = [f"{key} is {o.msize[key]} bytes" for key, width in WIDTHS.items() if key in o and o.msize[key] != width]
        for s in ("unix_sock", "netlink_sock", "packet_sock"):
            if f"{s}.sk" in o and o[f"{s}.sk"] != 0:
                bad.append(f"{s}.sk at {o[f'{s}.sk']}, not 0")
        if o["sock.__sk_common"] != 0:
            bad.append(f"sock.__sk_common at {o['sock.__sk_common']}, not 0")
        if bad:
            raise GuestDataError(f"kernel {kernel}: BTF socket layouts are impossible ({'; '.join(bad[:5])})")
        self.socket_file_ops = k.symbols.find("socket_file_ops")
        self.ipv6 = "sock_common.skc_v6_daddr" in o
        self.sock_size = o.size["sock"]
        self.tcp_size = o.size.get("tcp_sock", 0)


def net_layout(k: LinuxKernel) -> NetLayout:
    """Return the socket layouts of `k` (resolved on first use, then kept on the model)."""
    layout = getattr(k, "_net_layout", None)
    if layout is None:
        layout = NetLayout(k)
        k._net_layout = layout  # type: ignore[attr-defined]
    return layout


# --- one socket ----------------------------------------------------------------------------------


def _ip4(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw))


def _ip6(raw: bytes) -> str:
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)


def _u(blob: bytes, lay: NetLayout, key: str, fmt: str) -> int:
    try:
        return int(struct.unpack_from("<" + fmt, blob, lay.off[key])[0])
    except struct.error:
        raise GuestDataError(f"{key} does not fit a {len(blob)}-byte struct") from None


def _common(blob: bytes, lay: NetLayout, gva: int) -> dict[str, object]:
    """Decode the sock_common fields of the struct read at `gva` (sock, timewait or request sock)."""
    o = lay.off
    family = _u(blob, lay, "sock_common.skc_family", "H")
    state = blob[o["sock_common.skc_state"]]
    if not 0 < family < AF_MAX:
        raise GuestDataError(f"sock 0x{gva:x}: family {family} is not an address family")
    if family in (AF_INET, AF_INET6) and not 0 < state < len(TCP_STATES):
        raise GuestDataError(f"sock 0x{gva:x}: state {state} is not a TCP state")
    local_port = _u(blob, lay, "sock_common.skc_num", "H")
    remote_port = int.from_bytes(blob[o["sock_common.skc_dport"]:o["sock_common.skc_dport"] + 2], "big")
    if family == AF_INET6 and lay.ipv6:
        v6l, v6r = o["sock_common.skc_v6_rcv_saddr"], o["sock_common.skc_v6_daddr"]
        local, remote = _ip6(blob[v6l:v6l + 16]), _ip6(blob[v6r:v6r + 16])
    elif family in (AF_INET, AF_INET6):
        sl, sr = o["sock_common.skc_rcv_saddr"], o["sock_common.skc_daddr"]
        local, remote = _ip4(blob[sl:sl + 4]), _ip4(blob[sr:sr + 4])
    else:
        local = remote = ""
        local_port = remote_port = 0
    return {"family": family, "state": state, "local": local, "local_port": local_port, "remote": remote,
            "remote_port": remote_port, "netns_gva": _u(blob, lay, "sock_common.skc_net", "Q")}


def _proto_name(family: int, sk_type: int, protocol: int) -> str:
    v6 = "6" if family == AF_INET6 else ""
    if family in (AF_INET, AF_INET6):
        if sk_type == 3:
            return "raw" + v6
        if protocol == 6:
            return "tcp" + v6
        if protocol in (17, 136):
            return ("udp" if protocol == 17 else "udplite") + v6
        if protocol in (1, 58):
            return "icmp" + v6  # ping sockets (SOCK_DGRAM, IPPROTO_ICMP)
        return f"ip{v6}:{protocol}"
    return FAMILIES.get(family, f"af:{family}")


def _state_name(family: int, state: int) -> str:
    if family in (AF_INET, AF_INET6, AF_UNIX) and 0 < state < len(TCP_STATES):
        return TCP_STATES[state]
    return f"{state:02X}" if family not in (AF_NETLINK, AF_PACKET) else ""


def read_sock(k: LinuxKernel, sk: int, socket_gva: int = 0, file_gva: int = 0) -> Socket:
    """Return the socket whose struct sock is at kernel gva `sk`; GuestDataError if it does not hold together.

    A time-wait or request socket (a table entry that is only a sock_common) is decoded from its common
    part. With `socket_gva`, the sock must point back at that struct socket.
    """
    lay = net_layout(k)
    o = lay.off
    head = k.read(sk, o.size["sock_common"])
    common = _common(head, lay, sk)
    family, state = int(common["family"]), int(common["state"])  # type: ignore[call-overload]
    if family in (AF_INET, AF_INET6) and state in (TCP_TIME_WAIT, TCP_NEW_SYN_RECV):
        if socket_gva:
            raise GuestDataError(f"sock 0x{sk:x} of socket 0x{socket_gva:x} claims to be a "
                                 f"{TCP_STATES[state]} mini socket")
        return Socket(sk, FAMILIES[family], "stream", 6, "tcp" + ("6" if family == AF_INET6 else ""),
                      TCP_STATES[state], str(common["local"]), int(common["local_port"]),  # type: ignore[call-overload]
                      str(common["remote"]), int(common["remote_port"]), 0, 0, 0,  # type: ignore[call-overload]
                      int(common["netns_gva"]))  # type: ignore[call-overload]
    blob = k.read(sk, lay.sock_size)
    sk_type, protocol = _u(blob, lay, "sock.sk_type", "H"), _u(blob, lay, "sock.sk_protocol", "H")
    owner = _u(blob, lay, "sock.sk_socket", "Q")
    if sk_type not in TYPES:
        raise GuestDataError(f"sock 0x{sk:x}: type {sk_type} is not a socket type")
    if socket_gva and owner != socket_gva:
        raise GuestDataError(f"sock 0x{sk:x} names socket 0x{owner:x}, not the socket 0x{socket_gva:x} "
                             "that holds it (corrupt or reused)")
    inode = 0
    if owner:
        sock_file = k.u64(owner + o["socket.file"])
        file_gva = file_gva or sock_file
        if file_gva and sock_file != file_gva:
            raise GuestDataError(f"socket 0x{owner:x} names file 0x{sock_file:x}, not 0x{file_gva:x}")
        inode = k.u64(owner - o["socket_alloc.socket"] + o["socket_alloc.vfs_inode"] + o["inode.i_ino"])
    rx = _u(blob, lay, "sock.sk_backlog.rmem_alloc", "i")
    tx = _u(blob, lay, "sock.sk_wmem_alloc", "i") - 1
    local, remote = str(common["local"]), str(common["remote"])
    lport, rport = int(common["local_port"]), int(common["remote_port"])  # type: ignore[call-overload]
    peer = 0
    if family in (AF_INET, AF_INET6) and protocol == 6 and sk_type == 1 and lay.tcp_size:
        if state == TCP_LISTEN:
            rx, tx = _u(blob, lay, "sock.sk_ack_backlog", "I"), _u(blob, lay, "sock.sk_max_ack_backlog", "I")
        else:
            tcp = k.read(sk, lay.tcp_size)
            rx = max(0, (_u(tcp, lay, "tcp_sock.rcv_nxt", "I") - _u(tcp, lay, "tcp_sock.copied_seq", "I")) & 0xFFFFFFFF)
            tx = (_u(tcp, lay, "tcp_sock.write_seq", "I") - _u(tcp, lay, "tcp_sock.snd_una", "I")) & 0xFFFFFFFF
            if rx > 1 << 31:
                rx = 0
            if tx > 1 << 31:
                tx = 0
    elif family == AF_UNIX and "unix_sock.addr" in o:
        local = _unix_path(k, lay, sk)
        peer = k.u64(sk + o["unix_sock.peer"])
        rx, tx = _u(blob, lay, "sock.sk_receive_queue.qlen", "I"), max(tx, 0)
    elif family == AF_NETLINK and "netlink_sock.portid" in o:
        lport, rport = k.u32(sk + o["netlink_sock.portid"]), k.u32(sk + o["netlink_sock.dst_portid"])
    elif family == AF_PACKET and "packet_sock.ifindex" in o:
        lport = int.from_bytes(k.read(sk + o["packet_sock.num"], 2), "big")  # the ethertype
        local = f"ifindex:{k.u32(sk + o['packet_sock.ifindex'])}"
    return Socket(sk, FAMILIES.get(family, f"af:{family}"), TYPES[sk_type], protocol,
                  _proto_name(family, sk_type, protocol), _state_name(family, state), local, lport, remote, rport,
                  max(rx, 0), max(tx, 0), inode, int(common["netns_gva"]),  # type: ignore[call-overload]
                  owner, file_gva, peer)


def _unix_path(k: LinuxKernel, lay: NetLayout, sk: int) -> str:
    """Return a unix socket's bound name like /proc/net/unix: a path, "@name" (abstract) or ""."""
    o = lay.off
    addr = k.u64(sk + o["unix_sock.addr"])
    if not addr:
        return ""
    length = k.u32(addr + o["unix_address.len"])
    if not 2 <= length <= 110:  # sizeof(sa_family_t) .. sizeof(struct sockaddr_un)
        raise GuestDataError(f"unix sock 0x{sk:x}: address length {length} is absurd")
    raw = k.read(addr + o["unix_address.name"] + 2, length - 2)
    if raw[:1] == b"\0":
        return "@" + raw[1:].decode("utf-8", "backslashreplace")
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def socket_of_file(k: LinuxKernel, file: int) -> Socket | None:
    """Return the socket behind `struct file` at kernel gva `file`, or None if it is not a socket file.

    GuestDataError when it claims to be a socket but the socket ↔ file ↔ sock links do not hold.
    """
    lay = net_layout(k)
    if lay.socket_file_ops is None:
        raise GuestDataError("kallsyms lacks socket_file_ops: socket files cannot be told apart")
    if k.u64(file + lay.off["file.f_op"]) != lay.socket_file_ops:
        return None
    sock = k.u64(file + lay.off["file.private_data"])
    if not sock:
        raise GuestDataError(f"socket file 0x{file:x} has no struct socket")
    if k.u64(sock + lay.off["socket.file"]) != file:
        raise GuestDataError(f"socket 0x{sock:x} does not point back at its file 0x{file:x}")
    sk = k.u64(sock + lay.off["socket.sk"])
    if not sk:  # a socket being released, or never given a sock
        raise GuestDataError(f"socket 0x{sock:x} (file 0x{file:x}) has no struct sock")
    return read_sock(k, sk, sock, file)


# --- per-process view ----------------------------------------------------------------------------


def process_sockets(k: LinuxKernel, tasks: Iterable[Task], complete: bool = True, problem: str = ""
                    ) -> Listing[Endpoint]:
    """Return every socket in the file tables of `tasks` (processes), each with the processes holding it.

    `complete`/`problem` carry the completeness of the task walk that produced `tasks`.
    """
    out: Listing[Endpoint] = Listing(complete=complete, problem=problem)
    by_sock: dict[int, Endpoint] = {}
    try:
        net_layout(k)
    except _BAD as exc:
        return out.fail(f"socket layouts unavailable: {exc}")
    for task in tasks:
        if task.kernel_thread:
            continue
        table = fd_table(k, task)
        if not table.complete:
            out.fail(table.problem)
        for fd, file in table:
            try:
                sock = socket_of_file(k, file)
            except _BAD as exc:
                out.fail(f"pid {task.pid} fd {fd}: socket unverifiable ({exc})")
                continue
            if sock is None:
                continue
            owner = Owner(task.pid, task.comm, fd, task.exe or "")
            known = by_sock.get(sock.sock_gva)
            if known is None:
                by_sock[sock.sock_gva] = known = Endpoint(sock, [], ["files"])
                out.items.append(known)
            known.owners.append(owner)
    return out


# --- the kernel's tables -------------------------------------------------------------------------


def _walk_chain(k: LinuxKernel, head: int, link_off: int, nulls: int | None, what: str, out: list[int],
                nulls_ok: bool = True) -> str:
    """Append the container gvas of the hlist (nulls) chain at `head`; return a problem or "".

    Each node's pprev must name the previous link; a nulls chain must end in the marker `nulls` (the
    bucket it belongs to): a chain that ends in another bucket's marker moved or was corrupted.
    """
    seen: set[int] = set()
    prev_next = head  # the address that holds the pointer to the current node
    node = k.u64(head)
    count = 0
    while node and not node & 1:
        if node in seen:
            return f"{what}: the chain revisits 0x{node:x} (a cycle)"
        if count >= MAX_CHAIN:
            return f"{what}: more than {MAX_CHAIN} sockets in one chain; stopped"
        k.budget.node()
        raw = k.read(node, 16)
        nxt, pprev = struct.unpack("<QQ", raw)
        if pprev != prev_next:
            return f"{what}: node 0x{node:x} does not point back at 0x{prev_next:x} (corrupt or changing)"
        seen.add(node)
        out.append(node - link_off)
        prev_next, node, count = node, nxt, count + 1
    if node & 1 and nulls is not None and node >> 1 != nulls:
        return f"{what}: the chain ends in bucket {node >> 1}'s marker, not {nulls} (corrupt or changing)"
    if node & 1 and not nulls_ok:
        return f"{what}: a plain hlist holds the odd pointer 0x{node:x} (corrupt)"
    return ""


def _buckets(k: LinuxKernel, name: str, kind: str, base: int, lay: NetLayout
             ) -> tuple[list[tuple[int, int | None]], str]:
    """Return (head gva, expected nulls marker or None) per bucket of table `name`, and a problem or ""."""
    o = lay.off
    heads: list[tuple[int, int | None]] = []
    if kind == "ehash":
        mask = k.u32(base + o["inet_hashinfo.ehash_mask"])
        array = k.u64(base + o["inet_hashinfo.ehash"])
        stride, first, marker = o.size["inet_ehash_bucket"], o["inet_ehash_bucket.chain"], 0
    elif kind == "lhash2":
        mask = k.u32(base + o["inet_hashinfo.lhash2_mask"])
        array = k.u64(base + o["inet_hashinfo.lhash2"])
        stride, first = o.size["inet_listen_hashbucket"], o["inet_listen_hashbucket.nulls_head"]
        marker = LISTENING_NULLS_BASE
    elif kind == "udp":
        mask = k.u32(base + o["udp_table.mask"])
        array = k.u64(base + o["udp_table.hash"])
        stride, first, marker = o.size["udp_hslot"], o["udp_hslot.head"], -1
    else:  # raw: a fixed array of hlist heads inside the hashinfo
        count = o.msize["raw_hashinfo.ht"] // 8
        if count != RAW_HTABLE_SIZE:
            return heads, f"{name}: BTF says ht[] has {count} heads, not {RAW_HTABLE_SIZE}"
        return [(base + o["raw_hashinfo.ht"] + 8 * i, None) for i in range(count)], ""
    if mask + 1 > SOCK_ALLOC_CHECK or (mask + 1) & mask:
        return heads, f"{name}: mask 0x{mask:x} is not a plausible hash size"
    blob = k.read(array, stride * (mask + 1))
    for i in range(mask + 1):
        head_first = int.from_bytes(blob[i * stride + first:i * stride + first + 8], "little")
        if head_first == 0 or (head_first & 1 and marker >= 0):  # empty (a nulls head holds its marker)
            if head_first & 1 and head_first >> 1 != i + marker:
                return heads, f"{name}: bucket {i} holds the marker of bucket {(head_first >> 1) - marker}"
            continue
        heads.append((array + i * stride + first, i + marker if marker >= 0 else None))
    return heads, ""


def table_sockets(k: LinuxKernel) -> Listing[Endpoint]:
    """Return every socket in the kernel's TCP (established, listening), UDP, UDP-Lite and raw tables."""
    out: Listing[Endpoint] = Listing()
    try:
        lay = net_layout(k)
    except _BAD as exc:
        return out.fail(f"socket layouts unavailable: {exc}")
    by_sock: dict[int, Endpoint] = {}
    link = lay.off["sock_common.skc_node"]
    for name, symbol, kind in TABLES:
        base = k.symbols.find(symbol)
        if base is None:
            if symbol != "udplite_table":
                out.fail(f"{name}: kallsyms lacks {symbol}")
            continue
        if kind == "raw" and "raw_hashinfo.ht" not in lay.off:
            out.fail(f"{name}: this kernel's BTF has no raw_hashinfo")
            continue
        try:
            heads, problem = _buckets(k, name, kind, base, lay)
        except _BAD as exc:
            out.fail(f"{name}: the table is unreadable ({exc})")
            continue
        if problem:
            out.fail(problem)
            continue
        for head, nulls in heads:
            gvas: list[int] = []
            try:
                # udp chains are plain hlists; raw ones are nulls lists on some 6.x kernels, plain on others
                problem = _walk_chain(k, head, link, nulls, f"{name} bucket at 0x{head:x}", gvas,
                                      nulls_ok=kind != "udp")
            except _BAD as exc:
                problem = f"{name}: chain at 0x{head:x} unreadable ({exc})"
            if problem:
                out.fail(problem)
            for sk in gvas:
                try:
                    sock = read_sock(k, sk)
                except _BAD as exc:
                    out.fail(f"{name}: sock 0x{sk:x} unverifiable ({exc})")
                    continue
                known = by_sock.get(sk)
                if known is None:
                    by_sock[sk] = known = Endpoint(sock, [], [])
                    out.items.append(known)
                if name not in known.views:
                    known.views.append(name)
    return out


def net_view(k: LinuxKernel, tasks: Listing[Task] | None = None) -> NetView:
    """Walk both views (the process file tables and the kernel's tables) and compare them.

    A socket in a table that has a user-space file but is in no listed process's file table is a hidden
    connection; one without a file (kernel, orphaned, time-wait) is `unowned`, not a claim. Claims are made
    only when both walks were complete.
    """
    procs = tasks if tasks is not None else k.processes()
    files = process_sockets(k, procs.items, procs.complete, procs.problem)
    tables = table_sockets(k)
    hidden: Listing[Endpoint] = Listing()
    if not files.complete:
        hidden.fail(f"hidden sockets cannot be checked: the process file tables are incomplete ({files.problem})")
    if not tables.complete:
        hidden.fail(f"hidden sockets cannot be checked: the kernel's socket tables are incomplete ({tables.problem})")
    held = {e.socket.sock_gva for e in files.items}
    unowned: list[Endpoint] = []
    for e in tables.items:
        if e.socket.sock_gva in held:
            continue
        if e.socket.file_gva and hidden.complete:
            hidden.items.append(e)
        elif not e.socket.file_gva:
            unowned.append(e)
    if not hidden.complete:
        hidden.items.clear()
    return NetView(files, tables, hidden, unowned)


def confirmed_view(k: LinuxKernel, tasks: Listing[Task] | None = None) -> NetView:
    """Return `net_view`, with every hidden-socket claim confirmed by a second, fresh walk of both views.

    On a running guest a socket opened between the file-table walk and the table walk looks hidden once;
    only a socket hidden in both passes (the second over every thread's file table) is kept.
    """
    view = net_view(k, tasks)
    if view.hidden.items:
        k.kernel.flush()
        # every thread this time: a thread that unshared its file table (unshare(CLONE_FILES)) holds
        # sockets no thread-group leader's table shows
        again = net_view(k, k.threads())
        still = {e.socket.sock_gva for e in again.hidden.items}
        if not again.hidden.complete:
            view.hidden = Listing[Endpoint]().fail(f"the confirming pass failed: {again.hidden.problem}")
        else:
            view.hidden.items = [e for e in view.hidden.items if e.socket.sock_gva in still]
    return view
