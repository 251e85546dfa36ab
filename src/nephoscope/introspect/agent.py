"""The `agent` method: ask the in-guest qemu-guest-agent what runs, the way the guest's own tools see it.

The listing runs the guest's own shell over /proc, so anything that fools the guest's userland (an
/etc/ld.so.preload rootkit, a trojaned shell) fools this method too: every observation is `reported`.
An agent that is missing, dead, slow or inconsistent yields `unverifiable`, never an empty all-clear.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterator
from typing import Any

from debian import deb822

from nephoscope.core import payloads
from nephoscope.core.errors import ConnectorError
from nephoscope.core.records import Observation, Verdict
from nephoscope.hypervisor.qga import GuestAgent, has_agent, open_agent
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.base import observe, unverifiable

NAME = "agent"
SHELLS = ("/usr/bin/bash", "/bin/bash", "/bin/sh")
# Lists /proc with the guest's shell (its readdir is what userland rootkits hook). One base64 stream
# for everything keeps the number of forks low (TCG guests fork slowly): per process a record
# SEP "P pid ppid" SEP comm SEP exe SEP cmdline SEP maps, records joined by SEP.
SEP = "\x01NPH\x02"
LIST_SCRIPT = r"""
sep=$(printf '\001NPH\002')
for d in /proc/[0-9]*; do
  [ -r "$d/status" ] || continue
  ppid=
  while read -r k v; do [ "$k" = PPid: ] && ppid=$v && break; done < "$d/status"
  printf '%sP %s %s%s' "$sep" "${d#/proc/}" "$ppid" "$sep"
  cat "$d/comm" 2>/dev/null; printf %s "$sep"
  readlink "$d/exe" 2>/dev/null; printf %s "$sep"
  cat "$d/cmdline" 2>/dev/null; printf %s "$sep"
  cat "$d/maps" 2>/dev/null
done | base64
"""
MAX_PROCESSES = 100_000


def _maps(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5 or "x" not in fields[1]:
            continue
        start, _, end = fields[0].partition("-")
        try:
            out.append({"start": int(start, 16), "end": int(end, 16), "perms": fields[1],
                        "offset": int(fields[2], 16), "path": fields[5] if len(fields) > 5 else ""})
        except ValueError:
            continue
    return out


def parse_listing(encoded: str) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Parse the listing script's base64 stream into processes (with exec mappings) and anomalies."""
    procs: dict[int, dict[str, Any]] = {}
    anomalies: list[str] = []
    try:
        text = base64.b64decode("".join(encoded.split()), validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return procs, ["the listing is not valid base64"]
    parts = text.split(SEP)
    i = 0
    while i < len(parts):
        head = parts[i].split(" ")
        if head[0] != "P" or len(head) < 3 or not head[1].isdigit() or i + 5 > len(parts):
            if parts[i].strip():
                anomalies.append(f"unexpected record: {parts[i][:60]!r}")
            i += 1
            continue
        if len(procs) >= MAX_PROCESSES:
            anomalies.append(f"listing truncated at {MAX_PROCESSES} processes")
            break
        comm, exe, cmdline, maps = parts[i + 1: i + 5]
        pid = int(head[1])
        procs[pid] = {"pid": pid, "ppid": int(head[2]) if head[2].isdigit() else None,
                      "comm": comm.rstrip("\n"), "exe": exe.rstrip("\n"),
                      "cmdline": [a for a in cmdline.split("\0") if a], "maps": _maps(maps)}
        i += 5
    _mark_agent_own(procs)
    return procs, anomalies


def _mark_agent_own(procs: dict[int, dict[str, Any]]) -> None:
    """Flag the agent's own helper processes (the listing itself) and kernel threads."""
    agents = {pid for pid, p in procs.items() if p["exe"].endswith("/qemu-ga")}
    for p in procs.values():
        p["kernel_thread"] = not p["exe"] and not p["cmdline"]
        node, depth, own = p, 0, False
        while node is not None and depth < 64:
            if node["ppid"] in agents:
                own = True
                break
            node, depth = procs.get(node["ppid"] or -1), depth + 1
        p["agent_own"] = own


def installed_packages(status_text: str) -> dict[str, dict[str, str]]:
    """Parse a dpkg status database into package -> {version, source, arch} for installed packages."""
    out = {}
    for para in deb822.Deb822.iter_paragraphs(status_text):
        if "installed" not in para.get("Status", "").split() or "Package" not in para:
            continue
        source = para.get("Source", para["Package"]).split(" ")[0]
        out[para["Package"]] = {"version": para.get("Version", ""), "source": source,
                                "arch": para.get("Architecture", "")}
    return out


def through_agent(method: str, vm: VmTarget, timeout: float,
                  body: Callable[[GuestAgent, VmTarget], Iterator[Observation]],
                  why: str = "") -> Iterator[Observation]:
    """Yield what `body` yields over one guest agent session of `vm`, or `method`'s `unverifiable` processes
    when the VM has no agent channel or its agent does not answer (`why` is added to the first reason)."""
    if not has_agent(vm):
        yield unverifiable(method, vm, "processes", f"no guest agent channel for this VM{why}")
        return
    try:
        agent = open_agent(vm, timeout=timeout)
    except ConnectorError as exc:
        yield unverifiable(method, vm, "processes", f"guest agent unreachable: {exc}")
        return
    with agent:
        yield from body(agent, vm)


class AgentMethod:
    """The in-guest agent method (qemu-guest-agent over its virtio-serial socket or libvirt's agent channel)."""

    name = NAME

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout

    def collect(self, vm: VmTarget) -> Iterator[Observation]:
        """Yield processes, executable mappings, modules and installed packages as the guest reports them."""
        yield from through_agent(NAME, vm, self.timeout, self._collect)

    def _collect(self, agent: GuestAgent, vm: VmTarget) -> Iterator[Observation]:
        try:
            info = agent.call("guest-info")
            shell = self._shell(agent)
            code, out, err = agent.exec([shell, "-c", LIST_SCRIPT], timeout=self.timeout)
        except ConnectorError as exc:
            yield unverifiable(NAME, vm, "processes", f"guest agent failed: {exc}")
            return
        procs, anomalies = parse_listing(out.decode("utf-8", "replace"))
        agent_seen = any(p["exe"].endswith("/qemu-ga") for p in procs.values())
        if code != 0 or not procs or not agent_seen:
            why = (f"listing exit {code}, {len(procs)} processes, the agent itself "
                   f"{'listed' if agent_seen else 'missing'}; stderr: {err[:200]!r}")
            yield unverifiable(NAME, vm, "processes", f"the guest's process listing is not credible ({why})")
        yield observe(NAME, vm, "agent", "qemu-ga", payloads.Details({"version": info.get("version"), "shell": shell,
                                                                      "anomalies": anomalies[:20]}), Verdict.REPORTED)
        for pid, p in sorted(procs.items()):
            yield observe(NAME, vm, "process", f"pid:{pid}", payloads.Process(
                pid=pid, ppid=p["ppid"], comm=p["comm"], exe=p["exe"], cmdline=tuple(p["cmdline"]),
                kernel_thread=p["kernel_thread"], agent_own=p["agent_own"]), Verdict.REPORTED)
            for m in p["maps"]:
                yield observe(NAME, vm, "mapping", f"pid:{pid}:{m['start']:x}", payloads.Mapping(
                    pid, m["start"], m["end"], m["perms"], m["offset"], m["path"]), Verdict.REPORTED)
        yield from self._modules(agent, vm)
        yield from self._sockets(agent, vm)
        yield from self._packages(agent, vm)

    @staticmethod
    def _shell(agent: GuestAgent) -> str:
        for shell in SHELLS:
            try:
                code, _, _ = agent.exec([shell, "-c", "exit 0"], timeout=15)
            except ConnectorError:
                continue
            if code == 0:
                return shell
        raise ConnectorError("no usable shell in the guest")

    @staticmethod
    def _modules(agent: GuestAgent, vm: VmTarget) -> Iterator[Observation]:
        try:
            text = agent.read_file("/proc/modules").decode("utf-8", "replace")
        except ConnectorError as exc:
            yield unverifiable(NAME, vm, "modules", f"cannot read /proc/modules: {exc}")
            return
        for line in text.splitlines():
            f = line.split()
            if len(f) >= 2 and f[1].isdigit():
                yield observe(NAME, vm, "module", f"module:{f[0]}", payloads.Module(f[0], size=int(f[1])),
                              Verdict.REPORTED)

    @staticmethod
    def _sockets(agent: GuestAgent, vm: VmTarget) -> Iterator[Observation]:
        """Yield the sockets the guest's /proc/net/{tcp,udp,raw,udplite}{,6} tables show (its own account)."""
        from nephoscope.hypervisor.flows import parse_proc_net

        for name in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6", "udplite", "udplite6"):
            try:
                text = agent.read_file(f"/proc/net/{name}").decode("utf-8", "replace")
            except ConnectorError as exc:
                if name in ("tcp", "udp"):
                    yield unverifiable(NAME, vm, "sockets", f"cannot read /proc/net/{name}: {exc}")
                continue
            entries, bad = parse_proc_net(name, text)
            if bad:
                yield unverifiable(NAME, vm, "sockets", f"/proc/net/{name} has {len(bad)} malformed line(s)")
            for e in entries:
                yield observe(NAME, vm, "socket", f"{name}:{e.inode or e.key()}", payloads.Socket(
                    e.proto, "inet6" if e.proto.endswith("6") else "inet", "", e.state, e.local, e.local_port,
                    e.remote, e.remote_port, e.rx_queue, e.tx_queue, e.inode, ("proc-net",)), Verdict.REPORTED)

    @staticmethod
    def _packages(agent: GuestAgent, vm: VmTarget) -> Iterator[Observation]:
        try:
            text = agent.read_file("/var/lib/dpkg/status", limit=64 * 2**20).decode("utf-8", "replace")
        except ConnectorError as exc:
            yield unverifiable(NAME, vm, "packages", f"no dpkg status database readable: {exc}")
            return
        for name, pkg in sorted(installed_packages(text).items()):
            yield observe(NAME, vm, "package", f"package:{name}",
                          payloads.Package(name, pkg["version"], pkg["source"], pkg["arch"]), Verdict.REPORTED)
