"""libvirt domains: the monitor and the guest agent through libvirt's QEMU passthrough, and the domain's QEMU pid.

libvirtd holds a domain's QMP socket and its agent socket itself (QEMU serves one client per socket), so
nephoscope reaches both through `libvirt_qemu.qemuMonitorCommand` / `qemuAgentCommand`. Guest RAM is not read
through libvirt: the domain's QEMU pid (`domain_pid`) lets the process RAM reader map it directly.
Nothing here pauses the VM.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nephoscope.core.errors import ConnectorError
from nephoscope.hypervisor.qga import parse_reply

DEFAULT_URI = "qemu:///system"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
PID_DIR = Path("/run/libvirt/qemu")  # libvirtd (system) writes NAME.pid and NAME.xml here per running domain
STATE_NAMES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff", 6: "crashed",
               7: "pmsuspended"}


def default_uri() -> str:
    """Return the libvirt URI nephoscope uses (NEPHOSCOPE_LIBVIRT_URI, default qemu:///system)."""
    return os.environ.get("NEPHOSCOPE_LIBVIRT_URI") or DEFAULT_URI


def _modules() -> tuple[Any, Any]:
    try:
        import libvirt
        import libvirt_qemu
    except ImportError as exc:
        raise ConnectorError("libvirt-python is not installed; run scripts/setup.sh (needs libvirt-dev, "
                             "pkg-config) or `pip install libvirt-python`") from exc
    # libvirt prints every error to stderr by default; ours become ConnectorError messages instead
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt, libvirt_qemu


def connect(uri: str | None = None, readonly: bool = False) -> Any:
    """Return an open libvirt connection to `uri` (default: default_uri()) or raise ConnectorError."""
    libvirt, _ = _modules()
    uri = uri or default_uri()
    try:
        return libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise ConnectorError(f"cannot connect to libvirt at {uri}: {exc}; is libvirtd running? "
                             "(`nephoscope lab libvirtd` starts virtlogd and libvirtd where no init does)") from exc


_SHARED: dict[str, tuple[int, Any]] = {}  # uri → (pid that opened it, connection)
_SHARED_LOCK = threading.Lock()


def shared_connection(uri: str | None = None) -> Any:
    """Return this process's one open connection to `uri` (opened on first use, reopened once it died or
    the daemon behind it restarted).

    Monitors and agent channels share it: opening a libvirt connection costs more than a monitor command.
    Callers must not close it. A forked child opens its own (never reuses the parent's socket)."""
    libvirt, _ = _modules()
    uri = uri or default_uri()
    with _SHARED_LOCK:
        held = _SHARED.get(uri)
        if held is not None and held[0] == os.getpid():
            try:
                # isAlive() is the client's own view: after a libvirtd restart it stays true until an RPC
                # fails, so one cheap round trip proves the daemon at the other end still answers
                if held[1].isAlive() and held[1].getLibVersion():
                    return held[1]
            except (libvirt.libvirtError, AttributeError, TypeError):
                pass  # closed behind our back, or the daemon restarted: open a new one
            with contextlib.suppress(libvirt.libvirtError, AttributeError, TypeError):
                held[1].close()
        conn = connect(uri)
        if not _SHARED:
            atexit.register(_close_shared)
        _SHARED[uri] = (os.getpid(), conn)
        return conn


def _close_shared() -> None:
    """Close this process's shared connections before the interpreter unloads libvirt's module."""
    with _SHARED_LOCK:
        for pid, conn in _SHARED.values():
            if pid == os.getpid():
                with contextlib.suppress(Exception):
                    conn.close()
        _SHARED.clear()


def lookup_domain(conn: Any, spec: str) -> Any | None:
    """Return the domain named `spec` (name or UUID) on `conn`, or None."""
    libvirt, _ = _modules()
    for look in (conn.lookupByName, conn.lookupByUUIDString):
        try:
            return look(spec)
        except libvirt.libvirtError:
            continue
    return None


def get_domain(conn: Any, spec: str) -> Any:
    """Return the domain `spec` (name or UUID) or raise ConnectorError naming the domains there are."""
    dom = lookup_domain(conn, spec)
    if dom is None:
        try:
            names = ", ".join(sorted(d.name() for d in conn.listAllDomains())) or "none"
        except Exception:
            names = "unknown"
        raise ConnectorError(f"no libvirt domain {spec!r} at {conn.getURI()} (domains: {names}); "
                             "`nephoscope vms` lists every VM on this host")
    return dom


def domain_pid(name: str) -> int | None:
    """Return the QEMU pid of running domain `name` from libvirtd's pid file, or None."""
    try:
        pid = int((PID_DIR / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        return pid if b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes() else None
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """What the libvirt XML and runtime say about one domain."""

    name: str
    uuid: str
    state: str
    pid: int | None
    agent_channel: bool  # an org.qemu.guest_agent.0 virtio-serial channel is configured
    agent_connected: bool | None  # libvirt's view of the channel state (None: unknown)
    memory_source: str | None  # <memoryBacking><source type=...> (file, anonymous, memfd), None: plain RAM
    memory_kib: int
    gdb: str | None  # a gdbstub added by qemu:commandline, if any


def describe_domain(dom: Any) -> DomainInfo:
    """Return a DomainInfo for `dom` (XML of the running definition, libvirt state, pid)."""
    libvirt, _ = _modules()
    try:
        state = dom.state()[0]
        xml = dom.XMLDesc(0)
        name, uuid = dom.name(), dom.UUIDString()
    except libvirt.libvirtError as exc:
        raise ConnectorError(f"cannot read libvirt domain: {exc}") from exc
    return parse_domain_xml(xml, name, uuid, STATE_NAMES.get(state, str(state)),
                            domain_pid(name) if state in (1, 2, 3) else None)


def parse_domain_xml(xml: str, name: str, uuid: str, state: str, pid: int | None) -> DomainInfo:
    """Parse a libvirt domain XML into a DomainInfo (runtime state and pid given)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ConnectorError(f"libvirt returned unreadable XML for {name}: {exc}") from exc
    agent, connected = False, None
    for chan in root.iterfind("./devices/channel"):
        target = chan.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            agent = True
            if target.get("state"):
                connected = target.get("state") == "connected"
    backing = root.find("./memoryBacking/source")
    mem = (root.findtext("./memory") or "0").strip()
    args = [a.get("value", "") for a in root.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    gdb = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "-gdb"), None)
    return DomainInfo(name=name, uuid=uuid, state=state, pid=pid, agent_channel=agent, agent_connected=connected,
                      memory_source=backing.get("type") if backing is not None else None,
                      memory_kib=int(mem) if mem.isdigit() else 0, gdb=gdb)


class LibvirtMonitor:
    """A domain's QEMU monitor through libvirt (QMP JSON and HMP text); the VM keeps running."""

    def __init__(self, domain: str, uri: str | None = None, timeout: float = 10.0) -> None:
        self.libvirt, self.libvirt_qemu = _modules()
        self.timeout = timeout  # libvirt bounds monitor jobs itself (its job timeout); kept for the interface
        self.conn = shared_connection(uri)
        self.dom = get_domain(self.conn, domain)  # looked up each time: a redefined domain is another one
        self.name = self.dom.name()

    def _raw(self, text: str, flags: int) -> str:
        try:
            return str(self.libvirt_qemu.qemuMonitorCommand(self.dom, text, flags))
        except self.libvirt.libvirtError as exc:
            raise ConnectorError(f"libvirt monitor command on {self.name} failed: {exc}; "
                                 f"`virsh domstate {self.name}` shows whether the domain runs") from exc

    def command(self, name: str, **args: Any) -> Any:
        """Run one QMP command through libvirt and return its result; raise ConnectorError on an error reply."""
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        text = self._raw(json.dumps(msg), 0)
        try:
            reply = json.loads(text)
        except ValueError as exc:
            raise ConnectorError(f"QMP {name} on {self.name} returned invalid JSON: {text[:200]!r}") from exc
        if not isinstance(reply, dict):
            raise ConnectorError(f"QMP {name} on {self.name} returned a non-object reply")
        if "error" in reply:
            err = reply["error"]
            desc = err.get("desc", err) if isinstance(err, dict) else err
            raise ConnectorError(f"QMP {name} on {self.name} failed: {desc}")
        return reply.get("return")

    def hmp(self, line: str) -> str:
        """Run a human monitor command through libvirt and return its text."""
        return self._raw(line, self.libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)

    def close(self) -> None:
        """Let go of the domain (the shared libvirt connection stays open for the next monitor; the VM runs on)."""
        self.dom = None

    def __enter__(self) -> LibvirtMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LibvirtAgentChannel:
    """A domain's guest agent through libvirt (`qemuAgentCommand`; libvirt does the guest-sync itself)."""

    def __init__(self, domain: str, uri: str | None = None, timeout: float = 10.0) -> None:
        self.libvirt, self.libvirt_qemu = _modules()
        self.timeout = timeout
        self.conn = shared_connection(uri)
        self.dom = get_domain(self.conn, domain)
        info = describe_domain(self.dom)
        self.name = info.name
        if not info.agent_channel:
            raise ConnectorError(f"libvirt domain {info.name} has no guest agent channel ({AGENT_CHANNEL}); "
                                 "add a <channel type='unix'> with that target name to its XML")

    def call(self, name: str, **args: Any) -> Any:
        """Run one agent command and return its `return` value."""
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        try:
            text = self.libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(msg), max(1, round(self.timeout)), 0)
        except self.libvirt.libvirtError as exc:
            raise ConnectorError(f"guest agent {name} on {self.name} failed through libvirt: {exc}") from exc
        if text is None:
            raise ConnectorError(f"guest agent {name} on {self.name}: libvirt returned nothing")
        if len(text) > 64 * 2**20:
            raise ConnectorError("guest agent reply exceeds 64 MiB; refusing it")
        return parse_reply(text, name).get("return")

    def close(self) -> None:
        """Let go of the domain (the shared libvirt connection stays open; the agent keeps running)."""
        self.dom = None
