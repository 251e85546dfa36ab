"""Our x86-64 translations against QEMU's own `gva2gpa` on a live lab guest (paused while comparing)."""

from __future__ import annotations

import re

import pytest

from nephoscope.hypervisor.qmp import Qmp
from nephoscope.memory.paging import AddressSpace, iter_runs
from nephoscope.memory.physical import RawMemory
from nephoscope.memory.roots import read_vcpu_states, scan_roots

pytestmark = pytest.mark.guest


def _qemu_gva2gpa(qmp: Qmp, gva: int) -> int | None:
    out = qmp.hmp(f"gva2gpa 0x{gva:x}").strip()
    m = re.search(r"gpa:\s*0x([0-9a-fA-F]+)", out)
    if m:
        return int(m.group(1), 16)
    assert "Unmapped" in out, out
    return None


def _sample(asp: AddressSpace) -> list[int]:
    """Return mapped gvas (page starts, odd offsets, both halves, every page size) and gaps just past runs."""
    runs = list(iter_runs(asp.iter_mappings()))
    gvas: list[int] = []
    step = max(1, len(runs) // 120)
    for start, end, maps in runs[::step]:
        gvas += [start, start + 0x123, end - 1, maps[len(maps) // 2].gva + 0x7F8]
        gvas.append(end)  # usually unmapped: the next run starts later
    sizes = {m.size: m for _, _, ms in runs for m in ms}
    gvas += [m.gva + m.size // 2 + 5 for m in sizes.values()]
    return gvas


def test_translations_match_qemu(clean_guest) -> None:
    phys = RawMemory(clean_guest.ram_path)
    with Qmp(clean_guest.qmp_socket) as qmp:
        qmp.command("stop")
        try:
            vcpu = read_vcpu_states(qmp)[0]
            asp = AddressSpace(phys, vcpu.cr3, vcpu.levels)
            gvas = [vcpu.rip, vcpu.rsp, *_sample(asp)]
            assert len(gvas) > 200
            ours = {gva: asp.find_translation(gva) for gva in gvas}
            theirs = {gva: _qemu_gva2gpa(qmp, gva) for gva in gvas}
            roots = scan_roots(phys, known=[vcpu.cr3])
        finally:
            qmp.command("cont")
    mismatches = {hex(g): (ours[g], theirs[g]) for g in gvas if ours[g] != theirs[g]}
    assert not mismatches
    assert sum(v is None for v in theirs.values()) >= 10  # the comparison covered unmapped addresses too
    assert ours[vcpu.rip] is not None
    # the only entries iter_mappings skips are kernel mappings of MMIO (APIC, HPET, device BARs): not RAM
    assert set(asp.anomalies) <= {"page-outside-ram"}
    # the root scan finds the running vCPU's table, with no OS knowledge
    assert any(vcpu.cr3 & ~0xFFF in (r.gpa, r.user_gpa) for r in roots.roots)
    assert len(roots.process_roots) >= len(clean_guest.manifest()["processes"]) - 2
