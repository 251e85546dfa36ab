"""Find the host file that holds a QEMU VM's guest RAM, asking its monitor (QMP qom-list / qom-get): the fast path.

A VM started with `-object memory-backend-file,mem-path=FILE,share=on` (the lab's guests, and any VM an
operator configured so) keeps guest-physical RAM in FILE: file offset = gpa below the PCI hole. Nothing
here pauses the VM.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from nephoscope.core.errors import ConnectorError
from nephoscope.hypervisor.target import VmTarget


class Commands(Protocol):
    """Anything that runs QMP commands (nephoscope.hypervisor.qmp.Qmp)."""

    def command(self, name: str, **args: Any) -> Any: ...


def find_shared_ram(qmp: Commands) -> Path | None:
    """Return the file of the VM's shared file-backed RAM (the largest such backend), or None."""
    best: tuple[int, Path] | None = None
    for child in qmp.command("qom-list", path="/objects") or []:
        if "memory-backend-file" not in str(child.get("type", "")):
            continue
        path = f"/objects/{child.get('name')}"
        with contextlib.suppress(ConnectorError):
            if not qmp.command("qom-get", path=path, property="share"):
                continue  # a private mapping: the file does not see the guest's writes
            mem_path = Path(str(qmp.command("qom-get", path=path, property="mem-path")))
            size = int(qmp.command("qom-get", path=path, property="size") or 0)
            if mem_path.is_file() and (best is None or size > best[0]):
                best = (size, mem_path)
    return best[1] if best else None


def with_ram(vm: VmTarget) -> VmTarget:
    """Return `vm` with its RAM file filled in from its monitor when it has none (ConnectorError if it has none).

    Methods read RAM through `nephoscope.introspect.ram.open_ram`, which also reads a VM without a RAM file
    from its QEMU process; this is for callers that need the file itself."""
    if vm.ram_path is not None or (vm.qmp_socket is None and vm.domain is None) or not vm.live:
        return vm
    from nephoscope.hypervisor.monitor import open_monitor

    with open_monitor(vm) as monitor:
        ram = find_shared_ram(monitor)
    if ram is None:
        raise ConnectorError(f"{vm.name}: the VM has no shared file-backed RAM (its RAM lives in the QEMU process; "
                             "read it with open_ram, or dump it with QMP dump-guest-memory and pass the dump file)")
    return replace(vm, ram_path=ram)
