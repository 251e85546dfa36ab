"""One way to a VM's guest RAM for every method: its RAM or dump file (fast path), else the QEMU process.

`open_ram` picks, in this order: the VmTarget's RAM/dump file; a shared file-backed RAM the monitor names
(when it holds all of RAM at offset = gpa); the QEMU process's own memory, found and proven with
`nephoscope.hypervisor.qemu.find_process_ram` — read through the mapping's file where the proven mapping
is a shared memfd/file holding all RAM at offset = gpa (zero-copy, holes skipped), else with the process
reader (pagemap + process_vm_readv). A layout proven earlier in this process is reused once re-proved
(`recall_process_ram`). All addresses are guest-physical. Nothing here pauses the VM.
"""

from __future__ import annotations

from nephoscope.core.errors import ConnectorError
from nephoscope.hypervisor.qemu import (
    ProcessRam,
    find_process_ram,
    find_qemu_pid,
    parse_mtree,
    ram_ranges,
    recall_process_ram,
)
from nephoscope.hypervisor.target import VmTarget
from nephoscope.memory.physical import PhysicalMemory, open_memory
from nephoscope.memory.process import ProcessMemory, RamRegion


def find_qemu_process(vm: VmTarget) -> int | None:
    """Return the pid of `vm`'s QEMU process: known, or asked of its QMP socket (SO_PEERCRED), else None."""
    if vm.qemu_pid:
        return vm.qemu_pid
    if vm.qmp_socket is not None and vm.domain is None:
        return find_qemu_pid(vm.qmp_socket)
    return None


def process_memory(layout: ProcessRam, source: str, *, cache: bool = True) -> ProcessMemory:
    """Return a reader of a proven process RAM layout."""
    regions = [RamRegion(r.gpa_start, r.gpa_end, r.hva, r.block, r.block_offset) for r in layout.ranges]
    return ProcessMemory(layout.pid, regions, source, cache=cache)


def open_ram(vm: VmTarget, *, cache: bool = True) -> PhysicalMemory:
    """Return `vm`'s guest RAM (file fast path, else read from the QEMU process); ConnectorError says why not.

    `cache` False makes process reads uncached (for callers that read after the guest ran, e.g. trap)."""
    if vm.ram_path is not None:
        return open_memory(vm.ram_path)
    if not vm.live:
        raise ConnectorError(f"{vm.name}: no guest RAM to read (neither a RAM file, a dump nor a live VM)")
    from nephoscope.hypervisor.monitor import open_monitor
    from nephoscope.hypervisor.ramfile import find_shared_ram

    pid = find_qemu_process(vm)  # before the monitor: a QMP socket serves one client at a time
    with open_monitor(vm) as monitor:
        # a layout proven earlier in this process, re-proved with the flat view and one xp per region
        layout = recall_process_ram(monitor, pid) if pid is not None else None
        if layout is None:
            flat = None
            shared = find_shared_ram(monitor)
            if shared is not None:
                flat = parse_mtree(monitor.hmp("info mtree -f"))
                # the file is offset = gpa only when no RAM sits above the PCI hole
                if all(r.gpa_start == r.block_offset
                       for r in ram_ranges(flat, {f.name for f in flat if f.kind == "ram"})):
                    return open_memory(shared)
            if pid is None:
                raise ConnectorError(f"{vm.name}: guest RAM lives only in the QEMU process and its pid is unknown "
                                     "(name the VM as pid:N or by its lab/libvirt name)")
            layout = find_process_ram(monitor, pid, flat)
    shared_file = layout.shared_file()
    if shared_file is not None:  # memfd or file RAM, proven at this mapping: read the file (zero-copy, holes)
        try:
            return open_memory(shared_file)
        except ConnectorError:
            pass  # the process reader below needs no file
    backing = ", ".join(f"{b} {k}" for b, k in layout.backing.items())
    return process_memory(layout, f"{vm.name} (QEMU pid {pid}: {backing})", cache=cache)
