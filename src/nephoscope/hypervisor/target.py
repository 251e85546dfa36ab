"""What nephoscope needs to reach one VM: its RAM, its monitor, its agent, its gdbstub."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class VmTarget:
    """A VM and the host-side handles nephoscope may use; any handle may be missing."""

    name: str
    ram_path: Path | None = None  # raw guest-physical RAM (shared memory-backend-file) or a dump file
    qmp_socket: Path | None = None
    qga_socket: Path | None = None
    gdb_port: int | None = None
    qemu_pid: int | None = None  # lets checkpoint start a throw-away clone with the same devices
    live: bool = True  # False for dump files: nothing can be paused or asked
    domain: str | None = None  # libvirt domain name or UUID: the monitor and agent go through libvirt
    libvirt_uri: str | None = None  # None: libvirt's default (qemu:///system)

    def describe(self) -> dict[str, str | int | bool | None]:
        """Return the handles as plain values (for JSON and logs)."""
        return {"name": self.name, "ram": str(self.ram_path) if self.ram_path else None,
                "qmp": str(self.qmp_socket) if self.qmp_socket else None,
                "qga": str(self.qga_socket) if self.qga_socket else None,
                "gdb_port": self.gdb_port, "qemu_pid": self.qemu_pid, "live": self.live,
                "domain": self.domain, "libvirt_uri": self.libvirt_uri}
