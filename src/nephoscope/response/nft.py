"""nftables rulesets for a VM's filters: one table per VM, replaced in one `nft -f` transaction.

A routed tap gets an `inet` table: inbound filters hook `forward` on packets leaving towards the tap
(`oifname TAP`), and the L7 kind adds a `prerouting` redirect of the VM's port to the host-side haproxy.
A tap that is a bridge port gets a `bridge` table instead: its `forward` hook sees every frame the bridge
switches to the port (`oifname TAP`), without br_netfilter; what the bridge family can express depends on
the kernel (reject, conntrack in the bridge: `bridge_caps` asks the kernel with `nft -c`), and a kind it
cannot express is refused (`refusal`), never applied as a rule that would do nothing. The L7 kind on a
bridged tap hands the port's frames up to the host (bridge `prerouting`: `meta pkttype set host`, `ether
daddr set` the tap's own MAC, a local address of the bridge) and an `inet` table of the same name redirects
them to haproxy, both in the one transaction. Applying the same filters twice gives the same table
(idempotent); the transaction either replaces the whole table (in both families) or changes nothing (atomic).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from nephoscope.core.errors import NephoscopeError

TABLE_PREFIX = "nephoscope_"
FAMILY = "inet"  # a routed tap's table
BRIDGE_FAMILY = "bridge"  # a bridged tap's table
FAMILIES = (FAMILY, BRIDGE_FAMILY)
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
NETNS_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class FilterError(NephoscopeError):
    """A filter could not be planned, applied or removed (nft or haproxy failed, or bad input)."""


@dataclass(frozen=True, slots=True)
class VmNet:
    """Where a VM's traffic passes on this host: its tap device, its address, the namespace, its bridge."""

    tap: str
    guest_ip: str = ""  # the VM's IPv4 address on the tap (needed by the haproxy kind's redirect)
    netns: str = ""     # the network namespace holding the tap ("" = the host's own)
    bridge: str = ""    # the bridge the tap is a port of ("" = a routed tap); see `find_bridge`
    domain: str = ""    # UUID of the libvirt domain whose NIC the tap is ("" = not a libvirt domain's, or unknown)

    def __post_init__(self) -> None:
        if self.domain and not UUID_RE.match(self.domain):
            raise FilterError(f"libvirt domain UUID {self.domain!r} is not a UUID")
        if not IFNAME_RE.match(self.tap):
            raise FilterError(f"tap device name {self.tap!r} is not a valid interface name")
        if self.bridge and not IFNAME_RE.match(self.bridge):
            raise FilterError(f"bridge name {self.bridge!r} is not a valid interface name")
        if self.netns and not NETNS_RE.match(self.netns):
            raise FilterError(f"network namespace {self.netns!r} is not a valid name")
        if self.guest_ip:
            try:
                ipaddress.IPv4Address(self.guest_ip)
            except ValueError as exc:
                raise FilterError(f"guest address {self.guest_ip!r} is not an IPv4 address") from exc

    @property
    def family(self) -> str:
        """Return the nftables family of this VM's table: `bridge` for a bridge port, else `inet`."""
        return BRIDGE_FAMILY if self.bridge else FAMILY

    def to_dict(self) -> dict[str, str]:
        """Return a JSON-ready dict (`bridge` and `domain` keys only when set, as stored before they existed)."""
        d = {"tap": self.tap, "guest_ip": self.guest_ip, "netns": self.netns}
        return {**d, **{k: v for k, v in (("bridge", self.bridge), ("domain", self.domain)) if v}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VmNet:
        """Return the VmNet `to_dict` gave (raise FilterError on a bad name)."""
        return cls(str(d["tap"]), str(d.get("guest_ip", "")), str(d.get("netns", "")), str(d.get("bridge", "")),
                   str(d.get("domain", "")))


@dataclass(frozen=True, slots=True)
class BridgeCaps:
    """What the kernel's nftables bridge family can do in one namespace (asked with `nft -c`, never guessed)."""

    reject: bool     # `reject with tcp reset` in a bridge chain (CONFIG_NFT_BRIDGE_REJECT)
    conntrack: bool  # `ct state` / `ct count` in a bridge chain (nf_conntrack_bridge, kernel >= 5.3)

    def to_dict(self) -> dict[str, bool]:
        """Return a JSON-ready dict."""
        return {"reject": self.reject, "conntrack": self.conntrack}


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


@dataclass(frozen=True, slots=True)
class _Dialect:
    """How one family says "refuse", "a new connection" and "an IPv4/IPv6 packet"."""

    refuse: str = "reject with tcp reset"
    new: str = "ct state new"
    is_v4: str = "meta nfproto ipv4"
    is_v6: str = "meta nfproto ipv6"


INET = _Dialect()


def _bridge_dialect(caps: BridgeCaps) -> _Dialect:
    # in the bridge family `meta nfproto` is always "bridge": the frame's protocol says IPv4/IPv6; without
    # conntrack in the bridge a new connection is its first segment, SYN without ACK (retransmits count too)
    return _Dialect("reject with tcp reset" if caps.reject else "drop",
                    "ct state new" if caps.conntrack else "tcp flags & (syn | ack) == syn",
                    "meta protocol ip", "meta protocol ip6")


def _filter_lines(f: NftFilter, tap: str, d: _Dialect = INET) -> tuple[list[str], list[str]]:
    """Return (set declarations, forward-chain rules) for one filter."""
    head = f'oifname "{tap}" tcp dport {_ports(f.ports)}'
    note = f'comment "{f.mitigation} {f.cve}"'
    sets: list[str] = []
    rules: list[str] = []
    if f.kind == "nft-close":
        rules.append(f"{head} {d.refuse} {note}")
    elif f.kind == "nft-allow":
        v4, v6 = _split(list(f.params["allow"]))
        rules.append(f"{head} ip saddr != {{ {', '.join(v4)} }} {d.refuse} {note}" if v4
                     else f"{head} {d.is_v4} {d.refuse} {note}")
        rules.append(f"{head} ip6 saddr != {{ {', '.join(v6)} }} {d.refuse} {note}" if v6
                     else f"{head} {d.is_v6} {d.refuse} {note}")
    elif f.kind == "nft-rate":
        for fam, addr, sel in (("v4", "ipv4_addr", "ip saddr"), ("v6", "ipv6_addr", "ip6 saddr")):
            name = _set_name("rate", f.mitigation, fam)
            sets.append(f"set {name} {{ type {addr}; flags dynamic; timeout 1m; }}")
            rules.append(f"{head} {d.new} update @{name} {{ {sel} limit rate over "
                         f"{int(f.params['new_per_second'])}/second burst {int(f.params['burst'])} packets }} "
                         f"drop {note}")
    elif f.kind == "nft-connlimit":
        for fam, addr, sel in (("v4", "ipv4_addr", "ip saddr"), ("v6", "ipv6_addr", "ip6 saddr")):
            name = _set_name("conn", f.mitigation, fam)
            sets.append(f"set {name} {{ type {addr}; flags dynamic; }}")
            rules.append(f"{head} {d.new} add @{name} {{ {sel} ct count over "
                         f"{int(f.params['max_per_source'])} }} {d.refuse} {note}")
            if f.params.get("new_per_minute"):
                rname = _set_name("rate", f.mitigation, fam)
                sets.append(f"set {rname} {{ type {addr}; flags dynamic; timeout 5m; }}")
                rules.append(f"{head} {d.new} update @{rname} {{ {sel} limit rate over "
                             f"{int(f.params['new_per_minute'])}/minute burst {int(f.params['new_per_minute'])} "
                             f"packets }} {d.refuse} {note}")
    elif f.kind != "haproxy-h2":
        raise FilterError(f"unknown filter kind {f.kind!r}")
    return sets, rules


BRIDGED_CONNLIMIT = ("counting a source's concurrent connections (`ct count`) needs conntrack in the bridge "
                     "family (nf_conntrack_bridge, CONFIG_NF_CONNTRACK_BRIDGE), which this kernel does not "
                     "have (nft -c refuses `ct` in a bridge chain)")


@dataclass(frozen=True, slots=True)
class PortFacts:
    """What the L7 kind needs of a bridged tap: the tap's own MAC and the bridge's IPv4 networks (host side)."""

    mac: str                # the tap's host-side MAC: a local address of the bridge for as long as the tap lives
    nets: tuple[str, ...]   # the IPv4 networks the host has addresses in on the bridge ("10.77.0.1/24")


def _ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    argv = ["ip", *(["-n", netns] if netns else []), "-j", *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return list(json.loads(proc.stdout)) if proc.returncode == 0 and proc.stdout.strip() else []
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return []


def port_facts(net: VmNet) -> PortFacts:
    """Return the tap's MAC and the bridge's host IPv4 networks (in the tap's namespace; empty when unknown)."""
    link = _ip_json(net.netns, "link", "show", "dev", net.tap)
    mac = str(link[0].get("address", "")) if link else ""
    nets = tuple(f"{a['local']}/{a['prefixlen']}" for d in _ip_json(net.netns, "-4", "addr", "show", "dev", net.bridge)
                 for a in d.get("addr_info", []) if a.get("family") == "inet" and "local" in a)
    return PortFacts(mac if re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac) else "", nets)


def _l7_refusal(net: VmNet, port: PortFacts) -> str | None:
    where = f"{net.tap} is a port of bridge {net.bridge}"
    if not net.guest_ip:
        return f"{where}: steering a port to haproxy needs the VM's address (--guest-ip)"
    if not port.mac:
        return f"{where}: cannot read {net.tap}'s MAC address, which the bridge rule delivers the VM's frames to"
    guest = ipaddress.IPv4Address(net.guest_ip)
    if not any(guest in ipaddress.ip_interface(n).network for n in port.nets):
        have = ", ".join(port.nets) or "none"
        return (f"{where}: the host has no address on {net.bridge} in {net.guest_ip}'s subnet (has: {have}); "
                "haproxy could not reach the VM there and a redirect of frames arriving on the bridge has no "
                "local address to land on")
    return None


def refusal(kind: str, net: VmNet, caps: BridgeCaps | None = None, port: PortFacts | None = None) -> str | None:
    """Return why filter `kind` cannot be put in force on `net` here, or None when it can (probes a bridge)."""
    if not net.bridge:
        # a libvirt domain's tap comes without the VM's address: the redirect could not be written
        return (f"steering a port of {net.tap} to haproxy needs the VM's address (--guest-ip)"
                if kind == "haproxy-h2" and not net.guest_ip else None)
    if kind == "haproxy-h2":
        return _l7_refusal(net, port or port_facts(net))
    if kind == "nft-connlimit" and not (caps or bridge_caps(net.netns)).conntrack:
        return f"{net.tap} is a port of bridge {net.bridge}: {BRIDGED_CONNLIMIT}"
    return None


_PROBES = {"base": 'oifname "lo" tcp dport 9 drop', "reject": 'oifname "lo" tcp dport 9 reject with tcp reset',
           "conntrack": 'oifname "lo" ct state new add @s { ip saddr ct count over 1 } drop'}


@lru_cache(maxsize=64)
def _probe(netns: str, what: str) -> str:
    """Return "" when the kernel accepts probe `what` in a bridge chain of `netns`, else nft's message."""
    script = (f"table {BRIDGE_FAMILY} {TABLE_PREFIX}probe {{\n  set s {{ type ipv4_addr; flags dynamic; }}\n"
              "  chain forward {\n    type filter hook forward priority filter - 10; policy accept;\n"
              f"    {_PROBES[what]}\n  }}\n}}\n")
    try:
        run_nft(netns, "-c", "-f", "-", script=script)  # check only: the kernel validates, nothing is committed
    except FilterError as exc:
        return str(exc)
    return ""


def bridge_caps(netns: str = "") -> BridgeCaps:
    """Return what the bridge family can do in `netns`, asking the kernel (`nft -c`, nothing committed)."""
    base = _probe(netns, "base")
    if base:
        _probe.cache_clear()  # a namespace not there yet, or nft missing: ask again next time
        raise FilterError(f"cannot use the nftables bridge family{f' in netns {netns}' if netns else ''}: {base}")
    return BridgeCaps(not _probe(netns, "reject"), not _probe(netns, "conntrack"))


def ruleset(vm: str, net: VmNet, filters: list[NftFilter], caps: BridgeCaps | None = None,
            port: PortFacts | None = None, owner: str = "") -> str:
    """Return the table(s) holding every filter of `vm` (nft syntax), deterministic for the same input.

    A routed tap gets an `inet` table; a bridged one a `bridge` table written for `caps` (probed when not
    given), plus, for the L7 kind, an `inet` table with the redirect (both in the same transaction); a kind
    `refusal` names raises FilterError."""
    if net.bridge:
        return _bridge_ruleset(vm, net, filters, caps or bridge_caps(net.netns), port, owner)
    sets: list[str] = []
    forward: list[str] = []
    for f in sorted(filters, key=lambda f: f.mitigation):
        s, r = _filter_lines(f, net.tap)
        sets += s
        forward += r
    lines = [f"table {FAMILY} {table_name(vm)} {{", f'  comment "nephoscope filters of VM {_quote(vm)}{_tag(owner)}"']
    lines += [f"  {s}" for s in sets]
    lines += ["  chain forward {", "    type filter hook forward priority filter - 10; policy accept;"]
    lines += [f"    {r}" for r in forward] + ["  }"]
    lines += _redirect_chain(net, filters)
    return "\n".join([*lines, "}"]) + "\n"


def _redirect_chain(net: VmNet, filters: list[NftFilter]) -> list[str]:
    """Return the inet `prerouting` nat chain steering the L7 kinds' ports to haproxy ([] when none)."""
    redirects: list[str] = []
    for f in sorted(filters, key=lambda f: f.mitigation):
        if f.kind != "haproxy-h2":
            continue
        if not net.guest_ip:
            raise FilterError(f"{f.mitigation} steers traffic through haproxy and needs the VM's address "
                              "(--guest-ip)")
        if len(f.proxy_ports) != len(f.ports):
            raise FilterError(f"{f.mitigation}: a haproxy filter needs one proxy port per port")
        redirects += [f'iifname != "{net.tap}" ip daddr {net.guest_ip} tcp dport {port} '
                      f'redirect to :{proxy} comment "{f.mitigation} {f.cve}"'
                      for port, proxy in zip(f.ports, f.proxy_ports, strict=True)]
    if not redirects:
        return []
    return ["  chain prerouting {", "    type nat hook prerouting priority dstnat - 10; policy accept;",
            *[f"    {r}" for r in redirects], "  }"]


def _bridge_ruleset(vm: str, net: VmNet, filters: list[NftFilter], caps: BridgeCaps,
                    port: PortFacts | None, owner: str = "") -> str:
    sets: list[str] = []
    forward: list[str] = []
    output: list[str] = []
    deliver: list[str] = []
    l7 = [f for f in filters if f.kind == "haproxy-h2"]
    facts = port or (port_facts(net) if l7 else PortFacts("", ()))
    for f in sorted(filters, key=lambda f: f.mitigation):
        why = refusal(f.kind, net, caps, facts)
        if why:
            raise FilterError(f"{f.mitigation} ({f.kind}) cannot be put in force: {why}")
        s, r = _filter_lines(f, net.tap, _bridge_dialect(caps))
        sets += s
        forward += r
        # the same rules for what the host routes into the bridge (a client outside it, libvirt's NAT network):
        # such frames leave by the bridge's `output` hook, not `forward`; no bridge reject is allowed there
        output += _filter_lines(f, net.tap, replace(_bridge_dialect(caps), refuse="drop"))[1]
        if f.kind == "haproxy-h2":
            # frames for the VM's port from any other port are handed to the host's IP stack (addressed to
            # the tap's own MAC, a local address of the bridge) where the inet redirect takes them to haproxy
            deliver += [f'iifname != "{net.tap}" ether type ip ip daddr {net.guest_ip} tcp dport {p} '
                        f'meta pkttype set host ether daddr set {facts.mac} comment "{f.mitigation} {f.cve}"'
                        for p in sorted(f.ports)]
    name = table_name(vm)
    lines = [f"table {BRIDGE_FAMILY} {name} {{",
             f'  comment "nephoscope filters of VM {_quote(vm)} on bridge {net.bridge}{_tag(owner)}"']
    lines += [f"  {s}" for s in sets]
    lines += ["  chain forward {", "    type filter hook forward priority filter - 10; policy accept;"]
    lines += [f"    {r}" for r in forward] + ["  }"]
    if output:  # the host's own connections to the VM (haproxy's upstream among them) have a socket: not filtered
        lines += ["  chain output {", "    type filter hook output priority filter - 10; policy accept;",
                  "    meta skuid 0-4294967295 accept"]
        lines += [f"    {r}" for r in output] + ["  }"]
    if deliver:
        lines += ["  chain prerouting {", "    type filter hook prerouting priority dstnat - 10; policy accept;"]
        lines += [f"    {r}" for r in deliver] + ["  }"]
    lines.append("}")
    if l7:
        lines += [f"table {FAMILY} {name} {{",
                  f'  comment "nephoscope filters of VM {_quote(vm)}: redirects{_tag(owner)}"',
                  *_redirect_chain(net, l7), "}"]
    return "\n".join(lines) + "\n"


OWNER_RE = re.compile(r'comment "[^"]*\[owner ([0-9a-f]{1,32})\]"')


def _tag(owner: str) -> str:
    """Return the table comment's owner tag: which store put the table there (`table_owner` reads it back)."""
    if owner and not re.fullmatch(r"[0-9a-f]{1,32}", owner):
        raise FilterError(f"owner tag {owner!r} is not a short hex id")
    return f" [owner {owner}]" if owner else ""


def table_owner(netns: str, name: str) -> str | None:
    """Return the owner tag of nephoscope table `name` in `netns` ("" when it has none), None when it is absent.

    nft 1.0.6 leaves table comments out of its JSON, so this reads the text listing of each family."""
    if not name.startswith(TABLE_PREFIX) or not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise FilterError(f"{name!r} is not one of nephoscope's tables")
    seen = False
    for family in FAMILIES:
        try:
            text = run_nft(netns, "list", "table", family, name)
        except FilterError:
            continue  # not in this family
        seen = True
        match = OWNER_RE.search(text)
        if match:
            return match.group(1)
    return "" if seen else None


def _quote(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.:@ -]', "_", text)[:48]  # nft keeps 128 bytes of comment: room for the rest


def replace_transaction(vm: str, table: str | None) -> str:
    """Return the nft script that atomically replaces `vm`'s table with `table` (None: removes it)."""
    # "table X {}" makes the delete valid whether or not the table exists: one transaction either way; both
    # families, so a VM's table never survives in the other one (its tap joined or left a bridge)
    return _drop_both(table_name(vm)) + (table or "")


def _drop_both(name: str) -> str:
    return "".join(f"table {fam} {name} {{}}\ndelete table {fam} {name}\n" for fam in FAMILIES)


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


def apply_table(vm: str, net: VmNet, filters: list[NftFilter], owner: str = "") -> str:
    """Replace `vm`'s table with its filters in one nft transaction (no filters: remove it); return the table.

    `owner` tags the table with the store that put it there, so another store's `gc` leaves it alone."""
    table = ruleset(vm, net, filters, owner=owner) if filters else None
    run_nft(net.netns, "-f", "-", script=replace_transaction(vm, table))
    return table or ""


def list_json(netns: str = "") -> dict[str, Any]:
    """Return `nft -j list ruleset` (in `netns`) parsed."""
    return dict(json.loads(run_nft(netns, "-j", "list", "ruleset") or '{"nftables": []}'))


def comparable_ruleset(netns: str = "") -> list[dict[str, Any]]:
    """Return the whole ruleset of `netns` without metainfo and handles: equal before and after a change
    that was undone (handles are renumbered by every load)."""
    out = []
    for item in list_json(netns).get("nftables", []):
        if isinstance(item, dict) and "metainfo" not in item:
            for body in item.values():
                if isinstance(body, dict):
                    body.pop("handle", None)
            out.append(item)
    return out


def live_tables(netns: str = "") -> set[str]:
    """Return the names of nephoscope's tables present in `netns` (inet or bridge family)."""
    out = set()
    for item in list_json(netns).get("nftables", []):
        t = item.get("table") if isinstance(item, dict) else None
        if t and t.get("family") in FAMILIES and str(t.get("name", "")).startswith(TABLE_PREFIX):
            out.add(str(t["name"]))
    return out


def delete_table_named(netns: str, name: str) -> None:
    """Delete one nephoscope table by name in `netns`, inet and bridge family (idempotent, one transaction)."""
    if not name.startswith(TABLE_PREFIX) or not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise FilterError(f"refusing to delete table {name!r}: not one of nephoscope's")
    run_nft(netns, "-f", "-", script=_drop_both(name))


def find_bridge(tap: str, netns: str = "") -> str | None:
    """Return the bridge `tap` is a port of (in `netns`), "" for a routed tap, None when there is no such device.

    Asks the kernel (`ip -j -d link show`: `master` and the port's `info_slave_kind`), which works inside any
    namespace, unlike /sys/class/net of the caller's. A port of anything but a Linux bridge (Open vSwitch,
    a bond, a VRF) raises FilterError: neither the inet nor the bridge hooks see its traffic reliably."""
    argv = ["ip", *(["-n", netns] if netns else []), "-j", "-d", "link", "show", "dev", tap]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FilterError(f"cannot run ip to find {tap}'s bridge: {exc}") from exc
    if proc.returncode != 0:
        return None
    try:
        link = json.loads(proc.stdout)[0]
    except (ValueError, IndexError, KeyError) as exc:
        raise FilterError(f"cannot read `ip -j link show dev {tap}`: {exc}") from exc
    master = str(link.get("master") or "")
    if not master:
        return ""
    kind = str((link.get("linkinfo") or {}).get("info_slave_kind") or "")
    if kind != "bridge":
        raise FilterError(f"{tap} is a {kind or 'slave'} port of {master}, not of a Linux bridge: nephoscope's "
                          "nft filters cover routed taps and Linux bridge ports only")
    if not IFNAME_RE.match(master):
        raise FilterError(f"{tap}'s bridge {master!r} is not a valid interface name")
    return master
