"""What each process of a VM does on the network: sockets from kernel memory, the guest's own view, host flows.

`collect_net(vm)` gathers, for one VM:
- `inspect`: both kernel views of the sockets (process file tables, the kernel's hash tables;
  os/linux/net.py) with each socket's owning processes and their code identity (`arch`'s page hashing
  of the process's address space against the code-page DB, when there is one);
- `agent`: the guest's own /proc/net tables read through the guest agent (reported, may lie);
- `host`: the flows the host sees — the QEMU process's own sockets under user-mode networking
  (hypervisor/flows.py); no guest data at all;
and compares them. On a live VM every claim is confirmed by a second pass (agent, kernel, agent, kernel):
a socket that only a race between two views hides is never a finding. Reads RAM without pausing the VM.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nephoscope.core.errors import ConnectorError, GuestDataError, MemoryAccessError
from nephoscope.core.records import Finding
from nephoscope.hypervisor.flows import (
    PROC_NET,
    SLIRP_ALIASES,
    HostFlow,
    NetEntry,
    conntrack_flows,
    parse_proc_net,
    parse_proc_unix,
    qemu_flows,
)
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.kernel import open_kernel, task_cr3
from nephoscope.os.linux.model import LinuxKernel
from nephoscope.os.linux.net import Endpoint, NetView, net_view
from nephoscope.os.linux.walkers import Task

AGENT_TABLES = (*PROC_NET, "udplite", "udplite6")
GUEST_ALIAS = {host: guest for guest, host in SLIRP_ALIASES.items() if host}  # host address -> guest's name


def row_of(e: Endpoint) -> dict[str, Any]:
    """Return one socket as a JSON-ready row (with owners and the views that saw it)."""
    return {**e.socket.to_dict(), "views": list(e.views),
            "owners": [{"pid": o.pid, "comm": o.comm, "fd": o.fd, "exe": o.exe} for o in e.owners]}


@dataclass(slots=True)
class AgentNet:
    """The guest's own socket tables (/proc/net/*) as read through the agent."""

    entries: list[NetEntry] = field(default_factory=list)
    unix_inodes: set[int] = field(default_factory=set)
    problem: str = ""  # why the view is missing or incomplete

    @property
    def inodes(self) -> set[int]:
        return {e.inode for e in self.entries if e.inode}


def read_agent_net(vm: VmTarget, timeout: float = 30.0) -> AgentNet:
    """Read the guest's /proc/net tables through its agent (the guest's word: it may lie)."""
    from nephoscope.hypervisor.qga import has_agent, open_agent

    out = AgentNet()
    if not has_agent(vm):
        out.problem = "no guest agent channel for this VM"
        return out
    try:
        with open_agent(vm, timeout=timeout) as agent:
            for name in AGENT_TABLES:
                try:
                    text = agent.read_file(f"/proc/net/{name}").decode("utf-8", "replace")
                except ConnectorError as exc:
                    if name in ("tcp", "udp"):
                        out.problem = f"/proc/net/{name} unreadable: {exc}"
                    continue
                entries, bad = parse_proc_net(name, text)
                out.entries += entries
                if bad and not out.problem:
                    out.problem = f"/proc/net/{name}: {len(bad)} malformed line(s), e.g. {bad[0]!r}"
            text = agent.read_file("/proc/net/unix").decode("utf-8", "replace")
            out.unix_inodes = {u.inode for u in parse_proc_unix(text)[0]}
    except ConnectorError as exc:
        out.problem = f"guest agent failed: {exc}"
    return out


def _identity(k: LinuxKernel, task: Task, identifier: Any) -> dict[str, Any]:
    """Return a process's code identity: path, package, status (identified/modified/unknown/unverifiable)."""
    cr3 = task_cr3(k, task.mm_gva)
    if identifier is None:
        return {"status": "unverifiable", "verdict": "unverifiable", "reason": "identification not asked"}
    if cr3 is None:
        return {"status": "unverifiable", "verdict": "unverifiable", "reason": "no page-table root (mm unreadable)"}
    ident = identifier.identify(cr3, task.exe or "")
    reason = str(ident.get("unverifiable", ""))
    if ident.get("path") and not reason:
        main = next((im for im in ident.get("images", []) if im.get("path") == ident["path"]), {})
        status = "modified" if main.get("modified_pages") else "identified"
        return {"path": ident["path"], "package": ident.get("package"), "version": ident.get("version"),
                "status": status, "verdict": "verified", "reason": ""}
    if ident.get("exec_pages") and ("unknown code" in reason or "no executable page matches" in reason):
        return {"status": "unknown", "verdict": "verified", "reason": reason, "package": None}
    return {"status": "unverifiable", "verdict": "unverifiable", "reason": reason or "not identified"}


def identities(k: LinuxKernel, tasks: list[Task], pids: set[int], kb: Path | None) -> dict[int, dict[str, Any]]:
    """Return pid -> code identity for the processes `pids` (hashes their executable pages; no pause)."""
    from nephoscope.introspect.identify import Identifier, open_kb

    db, why = open_kb(kb)
    identifier = Identifier(k.phys, k.kernel.levels, db, why)  # type: ignore[arg-type]
    out: dict[int, dict[str, Any]] = {}
    try:
        for t in tasks:
            if t.pid in pids:
                try:
                    out[t.pid] = _identity(k, t, identifier)
                except (GuestDataError, MemoryAccessError) as exc:
                    out[t.pid] = {"status": "unverifiable", "verdict": "unverifiable", "reason": str(exc)}
                if not out[t.pid].get("path") and t.exe:
                    out[t.pid]["exe"] = t.exe
    finally:
        if db is not None:
            db.close()  # type: ignore[attr-defined]
    return out


def _kernel_pass(k: LinuxKernel) -> tuple[list[Task], NetView]:
    k.kernel.flush()
    procs = k.processes()
    return procs.items, net_view(k, procs)


def _guest_key(flow: HostFlow) -> tuple[str, int]:
    return GUEST_ALIAS.get(flow.remote, flow.remote), flow.remote_port


def join_flows(flows: list[HostFlow], rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Attribute each outbound host flow to the guest sockets with its destination; return (flows, unexplained).

    N host flows to one destination are explained by up to N guest TCP/UDP sockets to it (any state but
    LISTEN); the rest are unexplained. Inbound (hostfwd) flows are listed, not judged.
    """
    guest: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("family") in ("inet", "inet6") and r.get("remote_port") and r.get("state") != "LISTEN":
            proto = "tcp" if str(r["proto"]).startswith("tcp") else "udp"
            guest.setdefault((proto, r["remote"], r["remote_port"]), []).append(r)
    used: Counter[tuple[str, str, int]] = Counter()
    out: list[dict[str, Any]] = []
    unexplained: list[dict[str, Any]] = []
    for f in flows:
        row = f.to_dict()
        if f.inbound:
            row["attributed"] = []
            out.append(row)
            continue
        key = (f.proto, *_guest_key(f))
        candidates = guest.get(key, [])
        if used[key] < len(candidates):
            match = candidates[used[key]]
            used[key] += 1
            row["attributed"] = match["owners"]
            row["guest_socket"] = {k: match[k] for k in ("proto", "local", "local_port", "remote", "remote_port",
                                                          "state", "inode")}
            match.setdefault("host_flows", []).append(f"{f.source}:{f.local}:{f.local_port}")
        else:
            row["attributed"] = []
            unexplained.append(row)
        out.append(row)
    return out, unexplained


@dataclass(slots=True)
class NetReport:
    """Everything `net` learnt about one VM's network activity (JSON-ready through to_dict)."""

    vm: str
    sockets: list[dict[str, Any]]
    views: dict[str, dict[str, Any]]
    identities: dict[int, dict[str, Any]]
    flows: list[dict[str, Any]]
    unowned: list[dict[str, Any]]
    agent: dict[str, Any]
    timings: dict[str, float]
    hidden: list[dict[str, Any]] = field(default_factory=list)  # confirmed: in the tables, in no file table
    not_in_guest_view: list[dict[str, Any]] = field(default_factory=list)  # confirmed: /proc/net hides them
    unexplained_flows: list[dict[str, Any]] = field(default_factory=list)  # confirmed: no guest socket explains
    findings: list[Finding] = field(default_factory=list)  # set by the analysis (service.net)

    @property
    def complete(self) -> bool:
        return all(v.get("complete", True) for k, v in self.views.items() if k in ("files", "tables"))

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready data."""
        return {"vm": self.vm, "sockets": self.sockets, "views": self.views, "complete": self.complete,
                "identities": {str(p): i for p, i in sorted(self.identities.items())}, "flows": self.flows,
                "unowned": self.unowned, "agent": self.agent, "findings": [f.to_dict() for f in self.findings],
                "timings": self.timings}


def _host_flows(vm: VmTarget, guest_ip: str | None) -> list[HostFlow]:
    """Return the flows the host sees: QEMU's own sockets (slirp), plus conntrack's for `guest_ip` (tap)."""
    flows = qemu_flows(vm.qemu_pid) if vm.qemu_pid else []
    if guest_ip:
        flows += conntrack_flows(guest_ip)
    return flows


def collect_net(vm: VmTarget, *, identify: bool = True, agent: bool = True, host: bool = True,
                kb: Path | None = None, symbols: Path | None = None, cache: bool = True,
                guest_ip: str | None = None) -> NetReport:
    """Collect and compare every view of `vm`'s sockets and flows (no pause); the findings are left empty.

    `guest_ip`: the guest's address on a tap device, as the operator knows it (never from the guest), to
    read its flows from the host's conntrack table.
    """
    timings: dict[str, float] = {}
    live = vm.live
    t0 = time.perf_counter()
    agent1 = read_agent_net(vm) if agent and live else AgentNet(problem="not asked" if live else "a dump: no agent")
    timings["agent_s"] = time.perf_counter() - t0
    flows1: list[HostFlow] | None = None
    flow_problem = ""
    if host and live and (vm.qemu_pid or guest_ip):
        try:
            flows1 = _host_flows(vm, guest_ip)
        except ConnectorError as exc:
            flow_problem = str(exc)
    elif not host:
        flow_problem = "not asked"
    elif not live:
        flow_problem = "a dump: no host flows"
    else:
        flow_problem = "no QEMU process known for this VM (tap networking: give --guest-ip for conntrack)"
    with open_kernel(vm, symbols=symbols, cache=cache) as k:
        t1 = time.perf_counter()
        tasks, view = _kernel_pass(k)
        timings["kernel_s"] = time.perf_counter() - t1
        rows = [row_of(e) for e in view.endpoints()]
        hidden = [row_of(e) for e in view.hidden.items]
        flows, unexplained = join_flows(flows1 or [], rows)
        kernel_only = _kernel_only(view, agent1)
        if live and (hidden or kernel_only or unexplained):  # confirm every claim on a second pass
            agent2 = read_agent_net(vm) if agent else agent1
            try:
                flows2 = _host_flows(vm, guest_ip) if flows1 is not None else []
            except ConnectorError:
                flows2 = []  # the confirming read failed: no unexplained-flow claim
            k.kernel.flush()
            view2 = net_view(k, k.threads())  # every thread's file table (unshare(CLONE_FILES))
            rows2 = [row_of(e) for e in view2.endpoints()]
            still_hidden = {e.socket.sock_gva for e in view2.hidden.items}
            hidden = [r for r in hidden if int(r["sock"], 16) in still_hidden]
            again = {r["inode"] for r in rows2}
            kernel_only = [r for r in kernel_only if r["inode"] in again and r["inode"] not in agent2.inodes]
            _f2, unexplained2 = join_flows(flows2, rows2)
            seen2 = {(u["proto"], u["local"], u["local_port"], u["remote"], u["remote_port"]) for u in unexplained2}
            unexplained = [u for u in unexplained
                           if (u["proto"], u["local"], u["local_port"], u["remote"], u["remote_port"]) in seen2]
        pids = {o["pid"] for r in rows for o in r["owners"]}
        t2 = time.perf_counter()
        ids = identities(k, tasks, pids, kb) if identify else {
            t.pid: {"status": "unverifiable", "verdict": "unverifiable", "reason": "identification not asked"}
            for t in tasks if t.pid in pids}
        timings["identify_s"] = time.perf_counter() - t2
        budget = k.budget.to_dict()
    views = view.views()
    if not view.files.complete or not view.tables.complete:
        hidden = []
    agent_view = {"complete": not agent1.problem, "problem": agent1.problem, "count": len(agent1.entries),
                  "not_in_guest_view": len(kernel_only)}
    if agent1.problem:
        kernel_only = []
    views["agent"] = agent_view
    views["host"] = {"complete": flows1 is not None, "problem": flow_problem, "count": len(flows1 or []),
                     "unexplained": len(unexplained) if flows1 is not None else 0}
    views["budget"] = budget
    unowned = [row_of(e) for e in view.unowned]
    return NetReport(vm.name, rows, views, ids, flows, unowned,
                     {"entries": [e.to_dict() for e in agent1.entries], "problem": agent1.problem}, timings,
                     hidden, kernel_only, unexplained if flows1 is not None else [])


def _kernel_only(view: NetView, agent: AgentNet) -> list[dict[str, Any]]:
    """Return table sockets (with an inode) the guest's /proc/net does not list (only if that view was read)."""
    if agent.problem or (not agent.entries and not agent.unix_inodes):
        return []
    shown = agent.inodes
    return [row_of(e) for e in view.tables.items if e.socket.inode and e.socket.inode not in shown]


def sockets_of(vm: VmTarget, symbols: Path | None = None, cache: bool = True) -> list[dict[str, Any]]:
    """Return every socket of `vm` from kernel memory only (both views merged), as rows (no pause)."""
    with open_kernel(vm, symbols=symbols, cache=cache) as k:
        return [row_of(e) for e in _kernel_pass(k)[1].endpoints()]
