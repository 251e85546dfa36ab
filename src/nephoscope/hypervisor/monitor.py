"""One way to reach a VM's QEMU monitor, whoever started the VM: a QMP socket, or libvirt's monitor passthrough.

Methods never open QMP themselves: they call `open_monitor(vm)` and use `command` (QMP) and `hmp` (human
monitor text, for what QMP lacks: `info mtree -f`, `xp`, `gdbserver`). A libvirt domain's QMP socket is
held by libvirtd (QEMU serves one client per socket), so for those the monitor goes through libvirt.
Nothing here pauses the VM.
"""

from __future__ import annotations

from typing import Any, Protocol

from nephoscope.core.errors import ConnectorError
from nephoscope.hypervisor.target import VmTarget


class Monitor(Protocol):
    """A connected QEMU monitor; use as a context manager."""

    def command(self, name: str, **args: Any) -> Any:
        """Run one QMP command and return its result; raise ConnectorError on an error reply."""
        ...

    def hmp(self, line: str) -> str:
        """Run a human monitor command and return its text."""
        ...

    def close(self) -> None:
        """Disconnect (the VM keeps running)."""
        ...

    def __enter__(self) -> Monitor: ...

    def __exit__(self, *exc: object) -> None: ...


def open_monitor(vm: VmTarget, timeout: float = 10.0) -> Monitor:
    """Return a connected monitor of `vm` (libvirt passthrough for libvirt domains, else its QMP socket)."""
    if vm.domain is not None:
        from nephoscope.hypervisor.libvirt import LibvirtMonitor  # libvirt-python only where libvirt is used

        return LibvirtMonitor(vm.domain, vm.libvirt_uri, timeout=timeout)
    if vm.qmp_socket is None:
        raise ConnectorError(f"{vm.name}: no monitor (neither a QMP socket nor a libvirt domain)")
    from nephoscope.hypervisor.qmp import Qmp

    return Qmp(vm.qmp_socket, timeout=timeout)
