"""The `scripts` use case: what each interpreter process runs, and which scripts are known code.

The interpreter readers (introspect/interp) give every interpreter process's entry script, stacks and
loaded script files; introspect/interp/files.py reads each file from the guest's page cache and
identifies it by sha256 against the script DB (knowledge/scripts.py); analysis/scripts.py turns the
result into findings (unknown, modified and vulnerable scripts). With a QMP socket the VM is paused for
the read (the operator's run state is restored: a paused VM stays paused).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from nephoscope.analysis.scripts import script_findings
from nephoscope.core.errors import KnowledgeError
from nephoscope.core.payloads import Interpreter
from nephoscope.core.records import Finding
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.interp.files import InterpProcess, collect_scripts, observations
from nephoscope.knowledge.scripts import ScriptDB


@dataclass(slots=True)
class ScriptsReport:
    """Every interpreter process of a VM, its scripts, and the findings about them."""

    vm: str
    processes: list[InterpProcess]
    findings: list[Finding]
    timings: dict[str, float]
    paused: bool

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "paused": self.paused, "timings": self.timings,
                "processes": [p.to_dict() for p in self.processes], "findings": [f.to_dict() for f in self.findings]}


def source_of(package: str, version: str) -> str:
    """Return the source package of a binary package version (the archive's record; the name if unknown)."""
    try:
        from nephoscope.knowledge.debian import archive

        return str(archive.package_record(package, version).get("Source", package)).split()[0]
    except (KnowledgeError, KeyError, OSError):
        return package


def scripts_report(vm: VmTarget, *, db: ScriptDB | None = None, vulns: Any = None, pause: bool = True,
                   symbols: Any = None, cache: bool = True) -> ScriptsReport:
    """Return what every interpreter of `vm` runs (pauses the VM for the read when it has a QMP socket)."""
    from nephoscope.hypervisor.control import paused
    from nephoscope.introspect.kernel import open_kernel

    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        qmp = None
        if pause and vm.qmp_socket is not None and vm.live:
            from nephoscope.hypervisor.qmp import Qmp

            qmp = stack.enter_context(Qmp(vm.qmp_socket))
        k = stack.enter_context(open_kernel(vm, symbols=symbols, cache=cache))
        opened = time.monotonic()
        with paused(qmp) as did_pause:
            k.kernel.flush()
            processes = collect_scripts(k, db)
        read = time.monotonic()
    payloads = [o.payload for o in observations("inspect", vm, processes)]
    findings = script_findings([p for p in payloads if isinstance(p, Interpreter)], vm.name, vulns, source_of)
    return ScriptsReport(vm.name, processes, findings,
                         {"open_s": round(opened - started, 3), "read_s": round(read - opened, 3),
                          "total_s": round(time.monotonic() - started, 3)}, bool(did_pause))
