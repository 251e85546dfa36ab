"""Open the Linux kernel model of a VM (RAM file, dump or the QEMU process) for the inspect faces and methods."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from nephoscope.core.errors import GuestDataError, MemoryAccessError
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.ram import open_ram
from nephoscope.os.linux.model import LinuxKernel


@contextlib.contextmanager
def open_kernel(vm: VmTarget, *, symbols: Path | str | None = None, cache: bool = False) -> Iterator[LinuxKernel]:
    """Yield the kernel model of `vm` read from its RAM (the VM keeps running; nothing is paused).

    RAM comes from `open_ram`: the RAM or dump file, else the QEMU process. `symbols`: a Volatility 3 ISF,
    a vmlinux (BTF or DWARF) or a System.map for kernels whose BTF or kallsyms are not in RAM. `cache`:
    reuse a validated model of the same kernel build (os/linux/cache.py).
    """
    phys = open_ram(vm)
    try:
        if symbols is not None:
            from nephoscope.os.linux.symbols import open_with_symbols

            yield open_with_symbols(phys, symbols)
        else:
            from nephoscope.os.linux.cache import open_model

            yield open_model(phys, use_cache=cache)
    finally:
        phys.close()


def task_cr3(kernel: LinuxKernel, mm_gva: int) -> int | None:
    """Return the gpa of a process's top-level page table (mm->pgd), or None for kernel threads."""
    if not mm_gva:
        return None
    try:
        pgd_gva = kernel.u64(mm_gva + kernel.off["mm_struct.pgd"])
        return kernel.kernel.translate(pgd_gva)
    except (MemoryAccessError, GuestDataError):  # guest data: an unreadable mm gives no root, not a crash
        return None
