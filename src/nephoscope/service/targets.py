"""Turn what a user typed into a VmTarget: a lab guest, a libvirt domain (name or UUID), `pid:N`, a QEMU's
`-name`, a QMP socket, or a RAM/dump file."""

from __future__ import annotations

from pathlib import Path

from nephoscope.core.errors import NephoscopeError
from nephoscope.hypervisor.target import VmTarget


def resolve_target(spec: str) -> VmTarget:
    """Return the VM `spec` names; raise NephoscopeError listing the VMs there are when it names none."""
    path = Path(spec)
    if "/" in spec and path.is_file():  # a memory file: no need to load the lab or look at the host
        return VmTarget(name=path.name, ram_path=path, live=False)
    from nephoscope.lab import runner

    guest = runner.load_guest(spec) if "/" not in spec else None
    if guest is not None and guest.alive():
        # ram_path None (a guest with anonymous or memfd RAM): methods read RAM from the QEMU process
        return VmTarget(name=guest.name, ram_path=guest.ram_path, qmp_socket=guest.qmp_socket,
                        qga_socket=guest.qga_socket, gdb_port=guest.gdb_port or None, qemu_pid=guest.pid, live=True)
    path = Path(spec)
    if "/" in spec or path.exists():
        if path.is_socket():
            return _socket_target(path)
        if path.is_file():
            return VmTarget(name=path.name, ram_path=path, live=False)
    return _host_target(spec)


def _socket_target(path: Path) -> VmTarget:
    """Return the target of a QMP socket: the QEMU that serves it if /proc names it, else siblings by name."""
    from nephoscope.hypervisor.discover import discover

    resolved = path.resolve()
    for vm in discover().vms:
        if vm.target.qmp_socket is not None and vm.target.qmp_socket.resolve() == resolved:
            return vm.target
    # a QMP socket of a VM not visible in /proc (another namespace): look for siblings named like the lab's
    qga = path.with_name("qga.sock")
    return VmTarget(name=path.parent.name or path.stem, qmp_socket=path,
                    qga_socket=qga if qga.is_socket() else None, live=True)


def _host_target(spec: str) -> VmTarget:
    """Return the target of a libvirt domain (name or UUID), `pid:N` or a QEMU's -name on this host."""
    from nephoscope.hypervisor.discover import discover

    found = discover()
    vm = found.find(spec)
    if vm is not None:
        if not vm.running:
            raise NephoscopeError(f"VM {spec!r} is {vm.state}; start it before scanning (`virsh start {vm.name}`)")
        return vm.target
    known = ", ".join(v.name for v in found.vms) or "none running"
    skipped = "".join(f"; {src} not asked: {why}" for src, why in found.skipped.items())
    if "/" in spec:  # meant as a path: say what is wrong with the path, not how to boot a guest of that name
        raise NephoscopeError(f"{spec!r} does not exist or is neither a QMP socket nor a memory file "
                              f"(raw RAM, QEMU ELF core, LiME); `nephoscope vms` lists the VMs on this host")
    raise NephoscopeError(f"{spec!r} is neither a running lab guest nor a VM on this host ({known}), a QMP socket "
                          f"nor a memory file"
                          f"{skipped}; `nephoscope vms` lists the VMs, `nephoscope lab up {spec}` starts a lab guest")
