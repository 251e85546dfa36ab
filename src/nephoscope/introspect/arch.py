"""The `arch` method: trust only hardware state. Find every page-table root, hash every present executable
page, and identify it against the code-page DB — no OS knowledge at all.

The algorithm lives in `nephoscope.introspect.codepages` (records, `scan`, `identify_space`, `main_image`),
the Observation conversion in `nephoscope.introspect.arch_observations`; this module is the method: it
reaches a VM (a VmTarget: live RAM file with a QMP socket, a QMP socket alone, or a RAM or dump file),
reads its vCPUs' registers, and pauses it only when asked (`pause=True`), giving the operator's run state
back. Turning a lab guest name into a VmTarget is the service layer's (`service.targets.resolve_target`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from nephoscope.core.errors import ConnectorError, NephoscopeError
from nephoscope.core.records import Observation
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.arch_observations import METHOD, VDSO_REASON
from nephoscope.introspect.base import unverifiable
from nephoscope.introspect.codepages import (
    SCAN_BUDGET,
    USER_TOP,
    VDSO_PATH,
    ArchReport,
    Candidate,
    CodePageLookup,
    Image,
    KernelCode,
    ModifiedPage,
    ScanStats,
    SpaceReport,
    UnknownRegion,
    Vdso,
    main_image,
    scan,
)
from nephoscope.memory.physical import PhysicalMemory
from nephoscope.memory.roots import VcpuState

__all__ = ["METHOD", "SCAN_BUDGET", "USER_TOP", "VDSO_PATH", "VDSO_REASON", "ArchMethod", "ArchReport", "Candidate",
           "CodePageLookup", "Image", "KernelCode", "ModifiedPage", "ScanStats", "SpaceReport", "UnknownRegion",
           "Vdso", "main_image", "scan", "scan_file", "scan_target"]


def scan_target(vm: VmTarget, kb_path: Path | None = None, *, pause: bool = False,
                cr3: Sequence[int] = ()) -> ArchReport:
    """Scan `vm` (RAM file, dump, or the QEMU process's memory, found through its monitor).

    A live VM's vCPU registers are read over HMP; it is paused for the scan only when `pause` is true and
    it was running (a VM its operator paused stays paused). `cr3` adds known roots (guest-physical)."""
    from nephoscope.knowledge.binaries import CodePageDB

    method = ArchMethod(kb_path, pause=pause)
    method.extra_roots = list(cr3)
    db = CodePageDB.open(kb_path)
    try:
        phys = _open(vm)
        try:
            report, note = method.scan(vm, phys, db)
        finally:
            phys.close()
    finally:
        db.close()
    if note:  # a live VM whose monitor does not answer: no registers and no pause, so no scan either
        raise ConnectorError(note)
    return report


def scan_file(path: str | Path, kb_path: Path | None = None, *, cr3: Sequence[int] = ()) -> ArchReport:
    """Scan a RAM image or dump file (raw, ELF core, LiME); `cr3` adds known roots (guest-physical)."""
    return scan_target(VmTarget(name=str(path), ram_path=Path(path), live=False), kb_path, cr3=cr3)


def _open(vm: VmTarget) -> PhysicalMemory:
    from nephoscope.introspect.ram import open_ram

    return open_ram(vm)


class ArchMethod:
    """The `arch` method for the service registry: scan a VmTarget's RAM (live file or dump).

    A live VM's vCPU registers are read over HMP (no pause unless `pause`; a paused VM stays paused);
    `extra_vcpus` (e.g. set by checkpoint from the paused vCPUs: CR3 with CR4/EFER, so the paging mode is
    known) and `extra_roots` (bare guest-physical cr3 values) are added as known roots.
    """

    name = METHOD

    def __init__(self, kb: str | Path | None = None, pause: bool = False, db: CodePageLookup | None = None) -> None:
        self.kb = Path(kb) if kb else None
        self.pause = pause
        self.shared_db = db  # a KB the caller keeps open across scans (the sensor's per-sweep cache): not closed here
        self.extra_roots: list[int] = []
        self.extra_vcpus: list[VcpuState] = []
        self.last_report: ArchReport | None = None

    def collect(self, vm: VmTarget) -> Iterator[Observation]:
        """Yield arch observations of `vm`; failures become `unverifiable` observations."""
        from nephoscope.knowledge.binaries import CodePageDB

        try:
            db: Any = self.shared_db if self.shared_db is not None else CodePageDB.open(self.kb)
        except NephoscopeError as exc:
            yield unverifiable(METHOD, vm, "knowledge", str(exc))
            return
        close = db.close if self.shared_db is None else (lambda: None)
        try:
            phys = _open(vm)
        except NephoscopeError as exc:
            close()
            yield unverifiable(METHOD, vm, "memory", str(exc))
            return
        try:
            report, note = self.scan(vm, phys, db)
        except NephoscopeError as exc:
            yield unverifiable(METHOD, vm, "scan", f"arch scan failed: {exc}")
            return
        finally:
            phys.close()
            close()
        if note:
            yield unverifiable(METHOD, vm, "vcpu-registers", note)
        self.last_report = report
        yield from report.to_observations()

    def scan(self, vm: VmTarget, phys: PhysicalMemory, db: CodePageLookup) -> tuple[ArchReport, str]:
        """Scan `phys` with the live VM's vCPU registers (paused throughout when `pause` and it was running).

        Returns the report and a note saying what was missing ("" when nothing was)."""
        extra = [VcpuState(1000 + i, cr3, 0, 0, 0, 0) for i, cr3 in enumerate(self.extra_roots)]
        extra += [VcpuState(2000 + v.index, v.cr3, v.cr4, v.efer, v.rip, v.rsp) for v in self.extra_vcpus]
        if not vm.live or (vm.qmp_socket is None and vm.domain is None):
            return scan(phys, db, vcpus=extra, vm=vm.name), ""
        from nephoscope.hypervisor.control import paused
        from nephoscope.hypervisor.monitor import open_monitor
        from nephoscope.memory.roots import read_vcpu_states

        try:
            qmp = open_monitor(vm)
        except ConnectorError as exc:
            note = f"vCPU registers unavailable ({exc}); roots come from the RAM scan alone"
            return scan(phys, db, vcpus=extra, vm=vm.name), note
        try:
            with paused(qmp) if self.pause else contextlib.nullcontext(False):
                return scan(phys, db, vcpus=read_vcpu_states(qmp) + extra, vm=vm.name), ""
        finally:
            qmp.close()
