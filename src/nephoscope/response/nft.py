"""nftables rulesets for a VM's filters: one `inet` table per VM, replaced in one `nft -f` transaction.

Inbound filters hook `forward` on packets leaving towards the VM's tap device (`oifname TAP`); the L7 kind
adds a `prerouting` redirect of the VM's port to the host-side haproxy. Applying the same filters twice gives
the same table (idempotent); the transaction either replaces the whole table or changes nothing (atomic).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from nephoscope.core.errors import NephoscopeError

TABLE_PREFIX = "nephoscope_"
FAMILY = "inet"
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
NETNS_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class FilterError(NephoscopeError):
    """A filter could not be planned, applied or removed (nft or haproxy failed, or bad input)."""


@dataclass(frozen=True, slots=True)
class VmNet:
    """Where a VM's traffic passes on this host: its tap device, its address, the network namespace."""

    tap: str
    guest_ip: str = ""  # the VM's IPv4 address on the tap (needed by the haproxy kind's redirect)
    netns: str = ""     # the network namespace holding the tap ("" = the host's own)

    def __post_init__(self) -> None:
        if not IFNAME_RE.match(self.tap):
            raise FilterError(f"tap device name {self.tap!r} is not a valid interface name")
        if self.netns and not NETNS_RE.match(self.netns):
            raise FilterError(f"network namespace {self.netns!r} is not a valid name")
        if self.guest_ip:
            try:
                ipaddress.IPv4Address(self.guest_ip)
            except ValueError as exc:
                raise FilterError(f"guest address {self.guest_ip!r} is not an IPv4 address") from exc

    def to_dict(self) -> dict[str, str]:
        """Return a JSON-ready dict."""
        return {"tap": self.tap, "guest_ip": self.guest_ip, "netns": self.netns}


@dataclass(frozen=True, slots=True)
class NftFilter:
    """One filter as nftables sees it: a mitigation's kind, ports and parameters (and haproxy's port)."""

    mitigation: str
    cve: str
    kind: str
    ports: tuple[int, ...]
    params: dict[str, Any] = field(hash=False, default_factory=dict)
    proxy_ports: tuple[int, ...] = ()  # haproxy-h2: where the host-side haproxy listens, one per port in order


def table_name(vm: str) -> str:
    """Return the nftables table of `vm`: readable, unique per VM name, a valid nft identifier."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", vm)[:32]
    return f"{TABLE_PREFIX}{safe}_{hashlib.sha256(vm.encode()).hexdigest()[:6]}"


def _ports(ports: tuple[int, ...]) -> str:
    return str(ports[0]) if len(ports) == 1 else "{ " + ", ".join(str(p) for p in sorted(ports)) + " }"


def _split(cidrs: list[str]) -> tuple[list[str], list[str]]:
    v4, v6 = [], []
    for c in cidrs:
        try:
            net = ipaddress.ip_network(c, strict=False)
        except ValueError as exc:
            raise FilterError(f"allow-list entry {c!r} is not an address or network") from exc
        (v4 if net.version == 4 else v6).append(str(net))
    return v4, v6


def _set_name(kind: str, mitigation: str, family: str) -> str:
    return f"{kind}_{re.sub(r'[^a-z0-9]', '_', mitigation)[:40]}_{family}"


def _filter_lines(f: NftFilter, tap: str) -> tuple[list[str], list[str]]:
    """Return (set declarations, forward-chain rules) for one filter."""
    head = f'oifname "{tap}" tcp dport {_ports(f.ports)}'
    note = f'comment "{f.mitigation} {f.cve}"'
    sets: list[str] = []
    rules: list[str] = []
    if f.kind == "nft-close":
        rules.append(f"{head} reject with tcp reset {note}")
    elif f.kind == "nft-allow":
        v4, v6 = _split(list(f.params["allow"]))
        rules.append(f"{head} ip saddr != {{ {', '.join(v4)} }} reject with tcp reset {note}" if v4
                     else f"{head} meta nfproto ipv4 reject with tcp reset {note}")
        rules.append(f"{head} ip6 saddr != {{ {', '.join(v6)} }} reject with tcp reset {note}" if v6
                     else f"{head} meta nfproto ipv6 reject with tcp reset {note}")
    elif f.kind == "nft-rate":
        for fam, addr, sel in (("v4", "ipv4_addr", "ip saddr"), ("v6", "ipv6_addr", "ip6 saddr")):
            name = _set_name("rate", f.mitigation, fam)
            sets.append(f"set {name} {{ type {addr}; flags dynamic; timeout 1m; }}")
            rules.append(f"{head} ct state new update @{name} {{ {sel} limit rate over "
                         f"{int(f.params['new_per_second'])}/second burst {int(f.params['burst'])} packets }} "
                         f"drop {note}")
    elif f.kind == "nft-connlimit":
        for fam, addr, sel in (("v4", "ipv4_addr", "ip saddr"), ("v6", "ipv6_addr", "ip6 saddr")):
            name = _set_name("conn", f.mitigation, fam)
            sets.append(f"set {name} {{ type {addr}; flags dynamic; }}")
            rules.append(f"{head} ct state new add @{name} {{ {sel} ct count over "
                         f"{int(f.params['max_per_source'])} }} reject with tcp reset {note}")
            if f.params.get("new_per_minute"):
                rname = _set_name("rate", f.mitigation, fam)
                sets.append(f"set {rname} {{ type {addr}; flags dynamic; timeout 5m; }}")
                rules.append(f"{head} ct state new update @{rname} {{ {sel} limit rate over "
                             f"{int(f.params['new_per_minute'])}/minute burst {int(f.params['new_per_minute'])} "
                             f"packets }} reject with tcp reset {note}")
    elif f.kind != "haproxy-h2":
        raise FilterError(f"unknown filter kind {f.kind!r}")
    return sets, rules


def ruleset(vm: str, net: VmNet, filters: list[NftFilter]) -> str:
    """Return the `inet` table holding every filter of `vm` (nft syntax), deterministic for the same input."""
    sets: list[str] = []
    forward: list[str] = []
    redirects: list[str] = []
    for f in sorted(filters, key=lambda f: f.mitigation):
        s, r = _filter_lines(f, net.tap)
        sets += s
        forward += r
        if f.kind == "haproxy-h2":
            if not net.guest_ip:
                raise FilterError(f"{f.mitigation} steers traffic through haproxy and needs the VM's address "
                                  "(--guest-ip)")
            if len(f.proxy_ports) != len(f.ports):
                raise FilterError(f"{f.mitigation}: a haproxy filter needs one proxy port per port")
            redirects += [f'iifname != "{net.tap}" ip daddr {net.guest_ip} tcp dport {port} '
                          f'redirect to :{proxy} comment "{f.mitigation} {f.cve}"'
                          for port, proxy in zip(f.ports, f.proxy_ports, strict=True)]
    lines = [f"table {FAMILY} {table_name(vm)} {{", f'  comment "nephoscope filters of VM {_quote(vm)}"']
    lines += [f"  {s}" for s in sets]
    lines += ["  chain forward {", "    type filter hook forward priority filter - 10; policy accept;"]
    lines += [f"    {r}" for r in forward] + ["  }"]
    if redirects:
        lines += ["  chain prerouting {", "    type nat hook prerouting priority dstnat - 10; policy accept;"]
        lines += [f"    {r}" for r in redirects] + ["  }"]
    return "\n".join([*lines, "}"]) + "\n"


def _quote(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.:@ -]', "_", text)[:64]


def replace_transaction(vm: str, table: str | None) -> str:
    """Return the nft script that atomically replaces `vm`'s table with `table` (None: removes it)."""
    name = table_name(vm)
    # "table X {}" makes the delete valid whether or not the table exists: one transaction either way
    return f"table {FAMILY} {name} {{}}\ndelete table {FAMILY} {name}\n" + (table or "")


def nft_argv(netns: str, *args: str) -> list[str]:
    """Return the argv running nft with `args`, inside `netns` when one is given."""
    nft = shutil.which("nft") or "/usr/sbin/nft"
    return (["ip", "netns", "exec", netns, nft, *args] if netns else [nft, *args])


def run_nft(netns: str, *args: str, script: str | None = None, timeout: float = 30) -> str:
    """Run nft (in `netns`) and return its stdout; raise FilterError with nft's message when it fails."""
    try:
        proc = subprocess.run(nft_argv(netns, *args), input=script, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FilterError(f"cannot run nft: {exc}; install nftables (scripts/setup.sh)") from exc
    if proc.returncode != 0:
        raise FilterError(f"nft {' '.join(args)} failed: {proc.stderr.strip()[:600]}")
    return proc.stdout


def apply_table(vm: str, net: VmNet, filters: list[NftFilter]) -> str:
    """Replace `vm`'s table with its filters in one nft transaction (no filters: remove it); return the table."""
    table = ruleset(vm, net, filters) if filters else None
    run_nft(net.netns, "-f", "-", script=replace_transaction(vm, table))
    return table or ""


def list_json(netns: str = "") -> dict[str, Any]:
    """Return `nft -j list ruleset` (in `netns`) parsed."""
    return dict(json.loads(run_nft(netns, "-j", "list", "ruleset") or '{"nftables": []}'))


def live_tables(netns: str = "") -> set[str]:
    """Return the names of nephoscope's tables present in `netns`."""
    out = set()
    for item in list_json(netns).get("nftables", []):
        t = item.get("table") if isinstance(item, dict) else None
        if t and t.get("family") == FAMILY and str(t.get("name", "")).startswith(TABLE_PREFIX):
            out.add(str(t["name"]))
    return out


def delete_table_named(netns: str, name: str) -> None:
    """Delete one nephoscope table by name in `netns` (idempotent, one transaction)."""
    if not name.startswith(TABLE_PREFIX) or not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise FilterError(f"refusing to delete table {name!r}: not one of nephoscope's")
    run_nft(netns, "-f", "-", script=f"table {FAMILY} {name} {{}}\ndelete table {FAMILY} {name}\n")
