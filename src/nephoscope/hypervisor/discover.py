"""Every VM on this host: libvirt domains, other QEMU processes (from /proc), and the lab's own guests.

A QEMU process's command line names its handles: `-qmp` / `-chardev socket,...` + `-mon` monitor sockets,
`-gdb`, the chardev behind the `org.qemu.guest_agent.0` port, memory-backend-file paths. A QEMU whose monitor
is a passed fd (`-chardev socket,...,fd=N`) is held by libvirtd: it is that libvirt domain, not a second VM.
Lab guests are QEMUs named `nephoscope-NAME` (lab/runner.py). Nothing here connects to a VM except libvirt's
read-only API (domain XML and state); nothing pauses.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nephoscope.core.errors import ConnectorError
from nephoscope.hypervisor.target import VmTarget

AGENT_CHANNEL = "org.qemu.guest_agent.0"
LAB_PREFIX = "nephoscope-"
METHODS = ("agent", "driver", "inspect", "checkpoint", "arch", "trap")
MAX_CMDLINE = 1 << 20  # a command line longer than this is not a QEMU we can make sense of


# ------------------------------------------------------------------------------------ command lines

def split_options(value: str) -> dict[str, Any]:
    """Parse one QEMU option value (`type,key=val,...` with `,,` escapes, or JSON) into a dict; "" = the type."""
    if value.startswith("{"):
        try:
            parsed = json.loads(value)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    out: dict[str, Any] = {}
    parts = re.split(r"(?<!,),(?!,)", value)
    for i, part in enumerate(parts):
        part = part.replace(",,", ",")
        key, eq, val = part.partition("=")
        if not eq:
            if i == 0:
                out[""] = key
            else:
                out[key] = "on"  # old boolean shorthand: server, nowait
        else:
            out[key] = val
    return out


@dataclass(slots=True)
class QemuProcess:
    """What a QEMU process's command line says about its VM."""

    pid: int
    binary: str
    name: str | None = None
    uuid: str | None = None
    qmp_sockets: list[Path] = field(default_factory=list)
    hmp_sockets: list[Path] = field(default_factory=list)
    monitor_fd: bool = False  # a control monitor on a passed fd (libvirt holds it)
    qga_socket: Path | None = None
    agent_channel: bool = False  # an org.qemu.guest_agent.0 port exists (on whatever chardev)
    gdb: str | None = None
    ram_files: list[Path] = field(default_factory=list)
    memory_backends: list[str] = field(default_factory=list)  # qom types: memory-backend-ram/file/memfd
    mem: str | None = None
    pidfile: Path | None = None

    @property
    def libvirt(self) -> bool:
        """Return whether libvirtd started this QEMU (`-name guest=` and a monitor on a passed fd)."""
        return self.monitor_fd

    @property
    def lab_name(self) -> str | None:
        """Return the lab guest name if the lab started this QEMU (`-name nephoscope-NAME`)."""
        if self.name and self.name.startswith(LAB_PREFIX) and not self.libvirt:
            return self.name[len(LAB_PREFIX):]
        return None

    @property
    def gdb_port(self) -> int | None:
        """Return the gdbstub's TCP port on the host, if it has one."""
        m = re.fullmatch(r"tcp:[^:]*:(\d+)(,.*)?", self.gdb or "")
        return int(m.group(1)) if m else None


def _socket_path(spec: str) -> Path | None:
    if spec.startswith("unix:"):
        return Path(spec[5:].split(",", 1)[0])
    return None


def _dig(value: Any, *keys: str) -> Any:
    """Return value[k1][k2]... or None where a level is missing or not a dict (command lines are untrusted)."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def parse_qemu_cmdline(argv: list[str], pid: int) -> QemuProcess | None:
    """Parse a qemu-system-* argv into a QemuProcess, or None when argv is not a QEMU system emulator."""
    if not argv or not os.path.basename(argv[0]).startswith("qemu-system-"):
        return None
    proc = QemuProcess(pid=pid, binary=argv[0])
    chardevs: dict[str, dict[str, Any]] = {}
    monitors: list[tuple[str, str]] = []  # (chardev id, mode)
    ports: list[dict[str, Any]] = []
    i = 1
    while i < len(argv):
        opt = argv[i]
        if not opt.startswith("-"):
            i += 1
            continue
        opt = "-" + opt.lstrip("-")
        val = argv[i + 1] if i + 1 < len(argv) else ""
        takes_value = opt not in ("-s", "-S", "-nodefaults", "-no-reboot", "-no-shutdown", "-no-user-config",
                                  "-no-acpi", "-no-hpet", "-daemonize", "-snapshot", "-enable-kvm", "-nographic")
        if opt == "-name":
            o = split_options(val)
            proc.name = o.get("guest") or o.get("") or None
        elif opt == "-uuid":
            proc.uuid = val
        elif opt == "-qmp" or opt == "-qmp-pretty":
            path = _socket_path(val)
            if path:
                proc.qmp_sockets.append(path)
        elif opt == "-monitor":
            path = _socket_path(val)
            if path:
                proc.hmp_sockets.append(path)
        elif opt == "-chardev":
            o = split_options(val)
            cid = str(o.get("id", ""))
            if isinstance(o.get("backend"), dict):  # JSON form (QAPI chardev-add layout)
                addr = _dig(o, "backend", "data", "addr", "data")
                o = {"": _dig(o, "backend", "type"), "id": cid, "path": _dig(addr, "path"), "fd": _dig(addr, "str")}
            chardevs[cid] = o
        elif opt == "-mon":
            o = split_options(val)
            monitors.append((str(o.get("chardev", "")), str(o.get("mode", "readline"))))
        elif opt == "-device":
            o = split_options(val)
            if (o.get("driver") or o.get("")) in ("virtserialport", "virtconsole"):
                ports.append(o)
        elif opt == "-object":
            o = split_options(val)
            qom = str(o.get("qom-type") or o.get("") or "")
            if qom.startswith("memory-backend-"):
                proc.memory_backends.append(qom)
                if qom == "memory-backend-file" and o.get("mem-path"):
                    proc.ram_files.append(Path(str(o["mem-path"])))
        elif opt == "-mem-path":
            proc.ram_files.append(Path(val))
        elif opt == "-gdb":
            proc.gdb = val
        elif opt == "-s":
            proc.gdb = "tcp::1234"
        elif opt == "-m":
            o = split_options(val)
            proc.mem = str(o.get("size") or o.get("") or val)
        elif opt == "-pidfile":
            proc.pidfile = Path(val)
        i += 2 if takes_value else 1
    for cid, mode in monitors:
        dev = chardevs.get(cid, {})
        path = dev.get("path")
        if dev.get("fd") not in (None, "") and mode == "control":
            proc.monitor_fd = True
        elif path and dev.get("") == "socket":
            (proc.qmp_sockets if mode == "control" else proc.hmp_sockets).append(Path(str(path)))
    for port in ports:
        if port.get("name") == AGENT_CHANNEL:
            proc.agent_channel = True
            dev = chardevs.get(str(port.get("chardev", "")), {})
            if dev.get("") == "socket" and dev.get("path"):
                proc.qga_socket = Path(str(dev["path"]))
    return proc


def iter_qemu_processes(proc_root: Path = Path("/proc")) -> Iterator[QemuProcess]:
    """Yield every running qemu-system-* process on this host (from /proc/PID/cmdline)."""
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(proc_root / entry / "cmdline", "rb") as f:
                raw = f.read(MAX_CMDLINE)
        except OSError:
            continue
        if b"qemu-system-" not in raw[:4096]:
            continue
        parsed = parse_qemu_cmdline(raw.decode("utf-8", "replace").rstrip("\0").split("\0"), int(entry))
        if parsed is not None:
            yield parsed


# ------------------------------------------------------------------------------------ capabilities

def process_ram_reader() -> Any | None:
    """Return the process RAM finder (`nephoscope.hypervisor.qemu.find_process_ram`; methods open RAM with
    `nephoscope.introspect.ram.open_ram`) if this build has it, else None."""
    try:
        module = importlib.import_module("nephoscope.hypervisor.qemu")
    except ImportError:
        return None
    return getattr(module, "find_process_ram", None)


def capabilities(vm: VmTarget, *, agent_channel: bool | None = None, monitor: str | None = None
                 ) -> dict[str, str | None]:
    """Return method -> None (supported) or why not, for `vm` as the host sees it (nothing is contacted).

    `agent_channel` says whether the VM has an agent port at all (None: judge by its handles); `monitor` is
    why it has no usable monitor (None: it has one, or judge by its handles)."""
    out: dict[str, str | None] = {}
    has_monitor = monitor is None and (vm.qmp_socket is not None or vm.domain is not None)
    no_monitor = monitor or "no QMP socket and not a libvirt domain"
    if not vm.live:
        ram = None if vm.ram_path is not None else "no memory file"
        return {"agent": "a dump file: nothing to ask", "driver": "a dump file: nothing to ask",
                "inspect": ram, "checkpoint": "a dump file is already a checkpoint (use inspect/arch)",
                "arch": ram, "trap": "a dump file: no events"}
    if agent_channel is False:
        out["agent"] = "no guest agent channel (org.qemu.guest_agent.0)"
    elif vm.domain is None and vm.qga_socket is None:
        out["agent"] = "the guest agent channel is not on a chardev socket nephoscope can reach"
    else:
        out["agent"] = None
    out["driver"] = "not offered by this build (needs an in-guest kernel module)"
    if vm.ram_path is not None:
        ram_why: str | None = None
    elif vm.qemu_pid is None:
        ram_why = "no RAM file and no QEMU pid to read RAM from"
    elif process_ram_reader() is not None:
        ram_why = None if has_monitor else f"RAM from the QEMU process needs its monitor ({no_monitor})"
    else:
        ram_why = ("RAM readable from the QEMU process (needs the conn connector); only shared-file RAM "
                   "is supported yet")
    out["inspect"] = out["arch"] = ram_why
    out["checkpoint"] = ram_why or (None if has_monitor else f"cannot pause: {no_monitor}")
    if vm.gdb_port is not None:
        out["trap"] = None
    elif not has_monitor:
        out["trap"] = f"no gdbstub and {no_monitor}"
    else:
        out["trap"] = None  # no -gdb: trap/watch start a gdbstub on demand through the monitor and remove it
    return out


# ------------------------------------------------------------------------------------ the host's VMs

@dataclass(slots=True)
class HostVm:
    """One VM on this host, how it was found, and which methods can reach it."""

    name: str
    kind: str  # "libvirt", "qemu" or "lab"
    target: VmTarget
    uuid: str | None = None
    pid: int | None = None
    state: str = "running"
    methods: dict[str, str | None] = field(default_factory=dict)  # method -> None or why not
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        """Return whether the VM runs (or is paused): something to scan."""
        return self.state in ("running", "paused", "blocked")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"name": self.name, "kind": self.kind, "uuid": self.uuid, "pid": self.pid, "state": self.state,
                "supported": [m for m, why in self.methods.items() if why is None],
                "unsupported": {m: why for m, why in self.methods.items() if why is not None},
                "handles": self.target.describe(), "details": self.details}


@dataclass(slots=True)
class Discovery:
    """The VMs found and the sources that could not be asked (with why)."""

    vms: list[HostVm]
    skipped: dict[str, str]

    def find(self, spec: str) -> HostVm | None:
        """Return the VM named `spec` (name, UUID or pid:N), or None."""
        for vm in self.vms:
            if spec in (vm.name, vm.uuid, f"pid:{vm.pid}") or (vm.uuid and spec.lower() == vm.uuid.lower()):
                return vm
        return None


def _libvirt_vms(uri: str | None, processes: dict[int, QemuProcess]) -> list[HostVm]:
    from nephoscope.hypervisor import libvirt as lv

    conn = lv.connect(uri, readonly=True)
    try:
        vms = []
        for dom in conn.listAllDomains(0):
            try:
                info = lv.describe_domain(dom)
            except ConnectorError:
                continue
            proc = processes.get(info.pid) if info.pid else None
            ram = proc.ram_files[0] if proc and proc.ram_files else None
            gdb = proc.gdb_port if proc else None
            target = VmTarget(name=info.name, ram_path=ram, qemu_pid=info.pid, gdb_port=gdb,
                              live=info.state in ("running", "paused", "blocked"), domain=info.uuid,
                              libvirt_uri=conn.getURI())
            vm = HostVm(name=info.name, kind="libvirt", target=target, uuid=info.uuid, pid=info.pid,
                        state=info.state, details={"uri": conn.getURI(), "memory_mib": info.memory_kib // 1024,
                                                   "memory_source": info.memory_source or "anonymous",
                                                   "agent_connected": info.agent_connected})
            if target.live:
                vm.methods = capabilities(target, agent_channel=info.agent_channel)
            else:
                vm.methods = {m: f"domain is {info.state}" for m in METHODS}
            vms.append(vm)
        return vms
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _process_vm(proc: QemuProcess) -> HostVm:
    lab = proc.lab_name
    name = lab or proc.name or f"pid:{proc.pid}"
    qmp = next((p for p in proc.qmp_sockets if p.is_socket()), None)
    target = VmTarget(name=name, ram_path=proc.ram_files[0] if proc.ram_files else None, qmp_socket=qmp,
                      qga_socket=proc.qga_socket, gdb_port=proc.gdb_port, qemu_pid=proc.pid, live=True)
    monitor_why = None
    if proc.libvirt:
        monitor_why = "its monitor is held by libvirtd, and libvirt could not be asked"
    elif qmp is None:
        monitor_why = "no QMP socket (-qmp unix:... or -chardev socket + -mon mode=control)"
    vm = HostVm(name=name, kind="lab" if lab else "qemu", target=target, uuid=proc.uuid, pid=proc.pid,
                details={"binary": proc.binary, "memory": proc.mem, "memory_backends": proc.memory_backends or
                         ["memory-backend-ram (default)"], "qmp": [str(p) for p in proc.qmp_sockets],
                         "hmp": [str(p) for p in proc.hmp_sockets], "gdb": proc.gdb,
                         "ram_files": [str(p) for p in proc.ram_files], "libvirt_held": proc.libvirt})
    vm.methods = capabilities(target, agent_channel=proc.agent_channel, monitor=monitor_why)
    return vm


def discover(uri: str | None = None, proc_root: Path = Path("/proc")) -> Discovery:
    """Return every VM on this host: libvirt domains first, then QEMU processes libvirt does not hold."""
    processes = {p.pid: p for p in iter_qemu_processes(proc_root)}
    skipped: dict[str, str] = {}
    vms: list[HostVm] = []
    try:
        vms.extend(_libvirt_vms(uri, processes))
    except ConnectorError as exc:
        skipped["libvirt"] = str(exc)
    claimed = {vm.pid for vm in vms if vm.pid}
    for pid in sorted(processes):
        if pid not in claimed:
            vms.append(_process_vm(processes[pid]))
    return Discovery(vms, skipped)
