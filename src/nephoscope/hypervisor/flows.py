"""The VM's network flows as the host sees them: no guest data at all.

User-mode networking (slirp): every TCP connection and UDP flow the guest opens to the outside
becomes a socket of the QEMU process itself, so `/proc/QEMU_PID/fd` (socket inodes) joined with
`/proc/QEMU_PID/net/{tcp,tcp6,udp,udp6}` (the host network namespace QEMU lives in) lists them. The
guest's 10.0.2.2 is the host's loopback, 10.0.2.3 its resolver (`SLIRP_ALIASES`). QEMU's own listening
sockets are its `hostfwd` ports (and the gdbstub): connections accepted on them are inbound.

Tap devices: the host's conntrack table (`/proc/net/nf_conntrack`) holds the VM's flows by the guest's
address; `parse_conntrack` reads it (`conntrack -L` prints the same lines). Which address is the
guest's comes from the operator (libvirt's lease or ARP), never from the guest.

The `/proc/net/*` text parser here is also what the agent method uses on the guest's own tables.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from nephoscope.core.errors import ConnectorError

SLIRP_ALIASES = {"10.0.2.2": "127.0.0.1", "10.0.2.3": ""}  # guest view -> host view ("" = the resolver)
TCP_STATES = ("", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT", "CLOSE",
              "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV")
PROC_NET = ("tcp", "tcp6", "udp", "udp6", "raw", "raw6")
MAX_LINES = 1 << 18
_SOCKET = re.compile(r"socket:\[(\d+)\]")


@dataclass(frozen=True, slots=True)
class NetEntry:
    """One line of /proc/net/{tcp,udp,raw}{,6}: a socket as that table shows it."""

    proto: str  # tcp, tcp6, udp, udp6, raw, raw6
    local: str
    local_port: int
    remote: str
    remote_port: int
    state: str
    tx_queue: int
    rx_queue: int
    uid: int
    inode: int

    def key(self) -> tuple[str, str, int, str, int]:
        """Return (proto, local, port, remote, port): what identifies a socket without its inode."""
        return self.proto, self.local, self.local_port, self.remote, self.remote_port

    def to_dict(self) -> dict[str, object]:
        """Return the entry as a JSON-ready dict."""
        return {"proto": self.proto, "local": self.local, "local_port": self.local_port, "remote": self.remote,
                "remote_port": self.remote_port, "state": self.state, "rx_queue": self.rx_queue,
                "tx_queue": self.tx_queue, "uid": self.uid, "inode": self.inode}


@dataclass(frozen=True, slots=True)
class HostFlow:
    """A flow of the VM seen on the host: one QEMU socket (slirp) or one conntrack entry (tap)."""

    source: str  # "qemu-socket" or "conntrack"
    proto: str  # tcp, udp
    local: str  # the host-side address (slirp) or the guest's address (conntrack: original source)
    local_port: int
    remote: str
    remote_port: int
    state: str
    inbound: bool  # accepted on a hostfwd/listening port, or (conntrack) initiated from outside
    inode: int = 0

    def to_dict(self) -> dict[str, object]:
        """Return the flow as a JSON-ready dict."""
        return {"source": self.source, "proto": self.proto, "local": self.local, "local_port": self.local_port,
                "remote": self.remote, "remote_port": self.remote_port, "state": self.state,
                "inbound": self.inbound, "inode": self.inode}


def _addr(text: str) -> str:
    """Return the address of /proc/net's hex form (each 32-bit word printed in host byte order)."""
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    if len(raw) == 16:
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        addr = ipaddress.IPv6Address(words)
        return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)
    raise ValueError(f"address {text!r} is neither IPv4 nor IPv6")


def parse_proc_net(proto: str, text: str) -> tuple[list[NetEntry], list[str]]:
    """Parse one /proc/net/{tcp,udp,raw}{,6} table; return its entries and the lines that did not parse."""
    entries: list[NetEntry] = []
    bad: list[str] = []
    for line in text.splitlines()[1:MAX_LINES]:
        f = line.split()
        if len(f) < 10:
            if line.strip():
                bad.append(line[:80])
            continue
        try:
            (la, lp), (ra, rp) = f[1].split(":"), f[2].split(":")
            st = int(f[3], 16)
            tx, rx = (int(x, 16) for x in f[4].split(":"))
            state = TCP_STATES[st] if 0 < st < len(TCP_STATES) else f"{st:02X}"
            entries.append(NetEntry(proto, _addr(la), int(lp, 16), _addr(ra), int(rp, 16), state, tx, rx,
                                    int(f[7]), int(f[9])))
        except (ValueError, IndexError):
            bad.append(line[:80])
    return entries, bad


@dataclass(frozen=True, slots=True)
class UnixEntry:
    """One line of /proc/net/unix."""

    inode: int
    type: int
    state: int
    path: str


def parse_proc_unix(text: str) -> tuple[list[UnixEntry], list[str]]:
    """Parse /proc/net/unix (Num RefCount Protocol Flags Type St Inode [Path])."""
    out: list[UnixEntry] = []
    bad: list[str] = []
    for line in text.splitlines()[1:MAX_LINES]:
        f = line.split(None, 7)
        try:
            out.append(UnixEntry(int(f[6]), int(f[4], 16), int(f[5], 16), f[7] if len(f) > 7 else ""))
        except (ValueError, IndexError):
            if line.strip():
                bad.append(line[:80])
    return out, bad


def parse_proc_packet(text: str) -> tuple[list[tuple[int, int, int]], list[str]]:
    """Parse /proc/net/packet into (inode, ethertype, ifindex) entries."""
    out: list[tuple[int, int, int]] = []
    bad: list[str] = []
    for line in text.splitlines()[1:MAX_LINES]:
        f = line.split()
        try:
            out.append((int(f[8]), int(f[3], 16), int(f[4])))
        except (ValueError, IndexError):
            if line.strip():
                bad.append(line[:80])
    return out, bad


def _socket_inodes(pid: int) -> set[int]:
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes: set[int] = set()
    try:
        names = os.listdir(fd_dir)
    except OSError as exc:
        raise ConnectorError(f"cannot list the file descriptors of QEMU pid {pid}: {exc}") from exc
    for name in names:
        with contextlib.suppress(OSError):
            m = _SOCKET.fullmatch(os.readlink(fd_dir / name))
            if m:
                inodes.add(int(m.group(1)))
    return inodes


def qemu_flows(pid: int) -> list[HostFlow]:
    """Return the TCP/UDP sockets the QEMU process `pid` holds (user-mode networking: the guest's flows).

    A connection accepted on one of QEMU's own listening ports (hostfwd, gdbstub) is inbound; every other
    connected socket is a flow the guest opened. Reads host /proc only; does not pause the VM.
    """
    inodes = _socket_inodes(pid)
    entries: list[NetEntry] = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            text = Path(f"/proc/{pid}/net/{proto}").read_text()
        except OSError:
            continue  # no IPv6 on this host
        entries += [e for e in parse_proc_net(proto, text)[0] if e.inode in inodes]
    listening = {e.local_port for e in entries if e.state == "LISTEN"}
    flows = []
    for e in entries:
        if e.state == "LISTEN" or (e.proto.startswith("udp") and not e.remote_port):
            continue  # a hostfwd listener, or an unconnected UDP socket (slirp's, for one guest flow)
        flows.append(HostFlow("qemu-socket", e.proto.rstrip("6"), e.local, e.local_port, e.remote, e.remote_port,
                              e.state, e.local_port in listening, e.inode))
    return flows


_CT_FIELD = re.compile(r"(\w+)=(\S+)")


def parse_conntrack(text: str, guest: str) -> list[HostFlow]:
    """Return the flows of guest address `guest` in /proc/net/nf_conntrack (or `conntrack -L`) text.

    The first src/dst/sport/dport tuple is the original direction: the guest as source is an outbound flow.
    """
    flows: list[HostFlow] = []
    for line in text.splitlines()[:MAX_LINES]:
        words = line.split()
        proto = next((w for w in words if w in ("tcp", "udp")), "")
        if not proto:
            continue
        fields: dict[str, str] = {}
        for m in _CT_FIELD.finditer(line):
            fields.setdefault(m.group(1), m.group(2))  # the first (original) tuple
        state = next((w for w in words if w.isupper() and w.replace("_", "").isalpha()), "")
        try:
            src, dst, sport, dport = fields["src"], fields["dst"], int(fields["sport"]), int(fields["dport"])
        except (KeyError, ValueError):
            continue
        if src == guest:
            flows.append(HostFlow("conntrack", proto, src, sport, dst, dport, state or "ESTABLISHED", False))
        elif dst == guest:
            flows.append(HostFlow("conntrack", proto, dst, dport, src, sport, state or "ESTABLISHED", True))
    return flows


def conntrack_flows(guest: str, path: Path = Path("/proc/net/nf_conntrack")) -> list[HostFlow]:
    """Return the host's conntrack entries of the guest at `guest` (tap networking); ConnectorError if unreadable."""
    try:
        return parse_conntrack(path.read_text(), guest)
    except OSError as exc:
        raise ConnectorError(f"cannot read {path} (nf_conntrack not loaded, or not root): {exc}") from exc
