"""Turn what a user typed (a lab guest name, a QMP socket, a RAM or dump file) into a VmTarget."""

from __future__ import annotations

from pathlib import Path

from nephoscope.core.errors import NephoscopeError
from nephoscope.hypervisor.target import VmTarget


def resolve_target(spec: str) -> VmTarget:
    """Return the VM `spec` names: a running lab guest, a QMP socket path, or a memory/dump file."""
    from nephoscope.lab import runner

    guest = runner.load_guest(spec) if "/" not in spec else None
    if guest is not None and guest.alive():
        return VmTarget(name=guest.name, ram_path=guest.ram_path, qmp_socket=guest.qmp_socket,
                        qga_socket=guest.qga_socket, gdb_port=guest.gdb_port, qemu_pid=guest.pid, live=True)
    path = Path(spec)
    if path.is_socket():
        # a QMP socket of a VM not started by the lab: look for siblings named like the lab's
        qga = path.with_name("qga.sock")
        return VmTarget(name=path.parent.name or path.stem, qmp_socket=path,
                        qga_socket=qga if qga.is_socket() else None, live=True)
    if path.is_file():
        return VmTarget(name=path.name, ram_path=path, live=False)
    running = ", ".join(g.name for g in runner.list_guests() if g.alive()) or "none running"
    raise NephoscopeError(f"{spec!r} is neither a running lab guest ({running}), a QMP socket nor a memory file; "
                          f"start one with `nephoscope lab up {spec}`")
