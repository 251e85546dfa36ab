"""Network findings: what each process does on the network, judged by its code identity, as policy data.

The policy (`knowledge/rules/network.toml`, or a provider's file) is validated on load. Inputs are the
JSON-ready rows `introspect.net` builds (sockets with their owning processes and the views that saw
them), the identity of each owning process (`identities`: pid -> path, package, status, verdict) and
the cross-view results (hidden sockets, sockets the guest's /proc/net does not show, host flows no guest
socket explains). A rule is decided on the *identified* binary (the code-page DB's, else the kernel's exe
path), never on the name a process gives itself. Each finding names pid, comm, binary identity and
verdict, and carries the evidence of every view.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nephoscope.core.errors import KnowledgeError
from nephoscope.core.records import Finding

DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "knowledge" / "rules" / "network.toml"
SEVERITIES = ("critical", "high", "medium", "low")
# the finding kinds this module makes (the customer report shows them as network behaviour)
NETWORK_KINDS = ("outbound-smtp", "fanout", "connection-flood", "blocklisted-destination", "unknown-listener",
                 "raw-socket", "hidden-socket", "unexplained-flow")
OUTBOUND_STATES = ("ESTABLISHED", "SYN_SENT")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Policy:
    """The validated network policy."""

    smtp_ports: frozenset[int]
    mail_servers: frozenset[str]
    smtp_severity: str
    fanout_hosts: int
    fanout_severity: str
    flood_connections: int
    flood_ports: frozenset[int]
    flood_severity: str
    blocklist: tuple[Network, ...]
    blocklist_severity: str
    listening_severity: str
    raw_allowed: frozenset[str]
    raw_severity: str
    hidden_severity: str
    flow_severity: str
    source: str = ""


_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "smtp": {"ports": list, "mail_servers": list, "severity": str},
    "fanout": {"min_remote_hosts": int, "severity": str},
    "connections": {"min_connections": int, "ports": list, "severity": str},
    "blocklist": {"file": str, "severity": str},
    "listening": {"severity": str},
    "raw": {"allowed": list, "severity": str},
    "hidden": {"severity": str},
    "unexplained_flow": {"severity": str},
}


def _ports(values: list[Any], where: str) -> frozenset[int]:
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in values):
        raise KnowledgeError(f"{where}: ports must be integers 1-65535, got {values!r}")
    return frozenset(values)


def _paths(values: list[Any], where: str) -> frozenset[str]:
    if not all(isinstance(p, str) and p.startswith("/") for p in values):
        raise KnowledgeError(f"{where}: binaries must be absolute paths, got {values!r}")
    return frozenset(values)


def load_blocklist(path: Path) -> tuple[Network, ...]:
    """Return the networks of a blocklist file (one address or CIDR per line, '#' comments)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise KnowledgeError(f"cannot read the blocklist {path}: {exc}") from exc
    nets: list[Network] = []
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise KnowledgeError(f"{path}:{n}: {text!r} is not an address or network ({exc})") from exc
    return tuple(nets)


def load_policy(path: Path | None = None, blocklist: Path | None = None) -> Policy:
    """Load and validate a network policy (default: the shipped one); KnowledgeError naming what is wrong."""
    source = path or DEFAULT_POLICY
    try:
        data = tomllib.loads(source.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KnowledgeError(f"network policy {source}: {exc}") from exc
    for section, keys in _SCHEMA.items():
        table = data.get(section)
        if not isinstance(table, dict):
            raise KnowledgeError(f"network policy {source}: section [{section}] is missing")
        for key, kind in keys.items():
            if not isinstance(table.get(key), kind) or isinstance(table.get(key), bool):
                raise KnowledgeError(f"network policy {source}: [{section}] {key} must be a {kind.__name__}")  # type: ignore[union-attr]
        if "severity" in keys and table["severity"] not in SEVERITIES:
            raise KnowledgeError(f"network policy {source}: [{section}] severity must be one of {SEVERITIES}")
        unknown = set(table) - set(keys)
        if unknown:
            raise KnowledgeError(f"network policy {source}: [{section}] has unknown keys {sorted(unknown)}")
    extra = set(data) - set(_SCHEMA)
    if extra:
        raise KnowledgeError(f"network policy {source}: unknown sections {sorted(extra)}")
    s, f, c, b = data["smtp"], data["fanout"], data["connections"], data["blocklist"]
    if f["min_remote_hosts"] < 2 or c["min_connections"] < 2:
        raise KnowledgeError(f"network policy {source}: thresholds must be at least 2")
    block_file = blocklist or (Path(b["file"]) if b["file"] else None)
    return Policy(_ports(s["ports"], "[smtp] ports"), _paths(s["mail_servers"], "[smtp] mail_servers"), s["severity"],
                  f["min_remote_hosts"], f["severity"], c["min_connections"],
                  _ports(c["ports"], "[connections] ports"), c["severity"],
                  load_blocklist(block_file) if block_file else (), b["severity"], data["listening"]["severity"],
                  _paths(data["raw"]["allowed"], "[raw] allowed"), data["raw"]["severity"],
                  data["hidden"]["severity"], data["unexplained_flow"]["severity"], str(source))


# --- analysis ------------------------------------------------------------------------------------


@dataclass(slots=True)
class NetworkFacts:
    """What the network findings are decided on (JSON-ready rows, see introspect.net)."""

    sockets: list[dict[str, Any]]  # rows: proto, family, type, state, local, ports, remote, owners, views
    identities: dict[int, dict[str, Any]] = field(default_factory=dict)  # pid -> identity
    hidden: list[dict[str, Any]] = field(default_factory=list)  # in the kernel tables, in no file table
    not_in_guest_view: list[dict[str, Any]] = field(default_factory=list)  # kernel has it, /proc/net does not
    unexplained_flows: list[dict[str, Any]] = field(default_factory=list)  # host flows no guest socket explains


def binary_of(owner: Mapping[str, Any], identities: Mapping[int, Mapping[str, Any]]) -> str:
    """Return the binary a process executes: the identified one, else the kernel's exe path."""
    ident = identities.get(int(owner.get("pid", -1)), {})
    return str(ident.get("path") or owner.get("exe") or "")


def _who(owner: Mapping[str, Any], identities: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    pid = int(owner.get("pid", -1))
    ident = identities.get(pid, {})
    return {"pid": pid, "comm": owner.get("comm", ""), "exe": owner.get("exe", ""),
            "binary": binary_of(owner, identities), "package": ident.get("package"),
            "identity": ident.get("status", "unverifiable"), "verdict": ident.get("verdict", "unverifiable"),
            "identity_reason": ident.get("reason", "")}


def _label(who: Mapping[str, Any]) -> str:
    pkg = f", {who['package']}" if who.get("package") else ""
    return f"pid {who['pid']} ({who['comm']}: {who['binary'] or 'unknown binary'}{pkg}, {who['identity']})"


def _evidence(row: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("proto", "state", "local", "local_port", "remote", "remote_port", "inode", "views", "host_flows")
    return {k: row[k] for k in keys if k in row}


def _by_owner(rows: Iterable[Mapping[str, Any]]) -> dict[int, tuple[Mapping[str, Any], list[Mapping[str, Any]]]]:
    out: dict[int, tuple[Mapping[str, Any], list[Mapping[str, Any]]]] = {}
    for row in rows:
        for owner in row.get("owners", []):
            out.setdefault(int(owner["pid"]), (owner, []))[1].append(row)
    return out


def _in_blocklist(addr: str, nets: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in nets)


def analyze(facts: NetworkFacts, policy: Policy, vm: str) -> list[Finding]:
    """Return the network findings of one VM."""
    ids = facts.identities
    findings: list[Finding] = []
    inet = [r for r in facts.sockets if r.get("family") in ("inet", "inet6")]
    outbound = [r for r in inet if r.get("state") in OUTBOUND_STATES and r.get("remote_port")
                and str(r.get("proto", "")).startswith("tcp")]
    for _pid, (owner, rows) in sorted(_by_owner(outbound).items()):
        who = _who(owner, ids)
        smtp = [r for r in rows if r["remote_port"] in policy.smtp_ports]
        if smtp and who["binary"] not in policy.mail_servers:
            dests = sorted({f"{r['remote']}:{r['remote_port']}" for r in smtp})
            findings.append(Finding("outbound-smtp", policy.smtp_severity,
                                    f"{_label(who)} has {len(smtp)} outbound SMTP connection(s) to "
                                    f"{', '.join(dests[:5])}{' …' if len(dests) > 5 else ''} and is not a known "
                                    "mail server", vm, [{**who, "sockets": [_evidence(r) for r in smtp]}]))
        per_port: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
        for r in rows:
            per_port[int(r["remote_port"])].append(r)
        for port, conns in sorted(per_port.items()):
            hosts = {r["remote"] for r in conns}
            if len(hosts) >= policy.fanout_hosts:
                findings.append(Finding("fanout", policy.fanout_severity,
                                        f"{_label(who)} talks to {len(hosts)} distinct hosts on port {port} "
                                        "(scan, flood or spam run)", vm,
                                        [{**who, "port": port, "hosts": sorted(hosts)[:100]}]))
            elif port in policy.flood_ports and len(conns) >= policy.flood_connections:
                findings.append(Finding("connection-flood", policy.flood_severity,
                                        f"{_label(who)} holds {len(conns)} simultaneous connections to port {port}",
                                        vm, [{**who, "port": port, "sockets": [_evidence(r) for r in conns]}]))
    if policy.blocklist:
        for row in inet:
            if row.get("remote_port") and _in_blocklist(str(row.get("remote", "")), policy.blocklist):
                who = [_who(o, ids) for o in row.get("owners", [])]
                names = ", ".join(_label(w) for w in who) or "no process (kernel, orphaned or hidden)"
                findings.append(Finding("blocklisted-destination", policy.blocklist_severity,
                                        f"a connection to {row['remote']}:{row['remote_port']}, on the provider's "
                                        f"blocklist, from {names}", vm, [{"owners": who, **_evidence(row)}]))
    listening = [r for r in inet if r.get("state") == "LISTEN" or
                 (str(r.get("proto", "")).startswith("udp") and r.get("local_port") and not r.get("remote_port"))]
    for _pid, (owner, rows) in sorted(_by_owner(listening).items()):
        who = _who(owner, ids)
        if who["identity"] == "unknown":
            ports = sorted({f"{r['proto']}/{r['local_port']}" for r in rows})
            findings.append(Finding("unknown-listener", policy.listening_severity,
                                    f"{_label(who)} listens on {', '.join(ports)}, and its code is in no known "
                                    "package", vm, [{**who, "sockets": [_evidence(r) for r in rows]}]))
    raw = [r for r in facts.sockets if r.get("type") == "raw" or r.get("family") == "packet"]
    for _pid, (owner, rows) in sorted(_by_owner(raw).items()):
        who = _who(owner, ids)
        if who["binary"] not in policy.raw_allowed:
            kinds = sorted({f"{r['family']}/{r['type']}" for r in rows})
            findings.append(Finding("raw-socket", policy.raw_severity,
                                    f"{_label(who)} holds {len(rows)} raw/packet socket(s) ({', '.join(kinds)}) "
                                    "and is not a program expected to", vm,
                                    [{**who, "sockets": [_evidence(r) for r in rows]}]))
    for row in facts.hidden:
        findings.append(Finding("hidden-socket", policy.hidden_severity,
                                f"a {row.get('proto')} socket {row.get('local')}:{row.get('local_port')} -> "
                                f"{row.get('remote')}:{row.get('remote_port')} ({row.get('state')}) is in the "
                                "kernel's tables but in no process's file table", vm, [_evidence(row)]))
    for row in facts.not_in_guest_view:
        who = [_who(o, ids) for o in row.get("owners", [])]
        findings.append(Finding("hidden-socket", policy.hidden_severity,
                                f"a {row.get('proto')} socket {row.get('local')}:{row.get('local_port')} -> "
                                f"{row.get('remote')}:{row.get('remote_port')} of "
                                f"{', '.join(_label(w) for w in who) or 'no process'} is in kernel memory but the "
                                "guest's own /proc/net does not show it", vm, [{"owners": who, **_evidence(row)}]))
    for flow in facts.unexplained_flows:
        findings.append(Finding("unexplained-flow", policy.flow_severity,
                                f"the host sees a {flow.get('proto')} flow to {flow.get('remote')}:"
                                f"{flow.get('remote_port')} ({flow.get('source')}) that no guest socket explains "
                                "(a hidden socket, a raw-packet sender, or a lying kernel)", vm, [dict(flow)]))
    return findings


# --- the scan: socket observations merged with the process views ----------------------------------

KERNEL_METHODS = ("inspect", "checkpoint")
UNSOUND_KEYS = frozenset({"sockets", "socket-tables", "budget", "everything", "kernel"})


def _identity_of(view: Any) -> dict[str, Any]:
    """Return a merged process view's code identity from the images arch found in its address space."""
    images = list(getattr(view, "binaries", []) or [])
    exe = str(getattr(view, "exe", "") or "").removesuffix(" (deleted)")
    main = next((im for im in images if im.get("path") and im.get("path") == exe), None)
    if main is None and exe:
        base = exe.rsplit("/", 1)[-1]
        main = next((im for im in images if str(im.get("path", "")).rsplit("/", 1)[-1] == base), None)
    if main is not None:
        return {"path": main.get("path"), "package": main.get("package"), "verdict": "verified",
                "status": "modified" if main.get("status") == "modified" else "identified"}
    if any(im.get("status") == "unknown" for im in images):
        return {"status": "unknown", "verdict": "verified", "package": None}
    return {"status": "unverifiable", "verdict": "unverifiable",
            "reason": "no code identity (arch did not run or found no image of its binary)"}


def scan_findings(sockets: list[tuple[str, Any]], processes: Mapping[int, Any], unverifiable: list[dict[str, str]],
                  vm: str, agent_credible: bool, policy: Policy | None = None) -> list[Finding]:
    """Return the network findings of a scan from its socket observations ((method, payloads.Socket) pairs).

    The kernel view is the inspect (else checkpoint) method's; owners come from the merged process views
    and their identity from the images arch found. A listening socket the kernel's tables hold but the
    guest's /proc/net does not show is a hidden socket only when both views were complete (the methods run
    one after the other: only long-lived listeners are compared). An unsound view makes no claim.
    """
    try:
        policy = policy or load_policy()
    except KnowledgeError as exc:
        unverifiable.append({"method": "analysis", "what": "network policy", "reason": str(exc)})
        return []
    method = next((m for m in KERNEL_METHODS if any(src == m for src, _ in sockets)), None)
    if method is None:
        return []
    unsound = {u["method"] for u in unverifiable if u.get("what") in UNSOUND_KEYS}
    kernel_sound = method not in unsound
    agent_sound = agent_credible and "agent" not in unsound and any(src == "agent" for src, _ in sockets)
    rows: list[dict[str, Any]] = []
    hidden: list[dict[str, Any]] = []
    for src, s in sockets:
        if src != method:
            continue
        owners = [{"pid": pid, "comm": getattr(processes.get(pid), "comm", ""),
                   "exe": getattr(processes.get(pid), "exe", "")} for pid in s.owners]
        row = {"proto": s.proto, "family": s.family, "type": s.type, "state": s.state, "local": s.local,
               "local_port": s.local_port, "remote": s.remote, "remote_port": s.remote_port, "inode": s.inode,
               "views": list(s.views), "owners": owners}
        rows.append(row)
        if s.hidden and kernel_sound:
            hidden.append(row)
    ids = {pid: _identity_of(processes[pid]) for pid in {o["pid"] for r in rows for o in r["owners"]}
           if pid in processes}
    not_shown: list[dict[str, Any]] = []
    if kernel_sound and agent_sound:
        shown = {s.inode for src, s in sockets if src == "agent" and s.inode}
        not_shown = [r for r in rows if r["state"] == "LISTEN" and r["inode"] and r["inode"] not in shown
                     and any(v != "files" for v in r["views"])]
    return analyze(NetworkFacts(rows, ids, hidden, not_shown), policy, vm)
