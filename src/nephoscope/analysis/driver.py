"""Judge the in-guest driver's process table against the hypervisor's views (the driver's weakness made visible).

The driver (nphdrv) walks the guest kernel's own task list, so a rootkit that unlinks a task (DKOM) hides it
from the driver as well; inspect and checkpoint see such a task through other views (the address spaces the
hardware has, the PID table). A user process a sound hypervisor view holds and the driver's table lacks is a
`driver-view-mismatch`: the driver's answer is not the truth, whatever made it so. It never becomes a silent
clean: the finding names the pid and who saw it.

No claim when either side is unsound (an `unverifiable` process view from the driver or that method), for a
process the driver's own log says exited before its table was read, or for one started after that read
(inspect runs later on a live guest and may see processes the driver could not have listed yet).
"""

from __future__ import annotations

from nephoscope.core.payloads import Details, Exit, KernelTamper, Process
from nephoscope.core.records import Finding, Observation, Verdict

DRIVER = "driver"
HYPERVISOR_VIEWS = ("inspect", "checkpoint")


def driver_findings(observations: list[Observation], unsound: set[str], vm: str) -> list[Finding]:
    """Return a `driver-view-mismatch` finding per user process a hypervisor view sees and the driver's table lacks."""
    if DRIVER in unsound:
        return []
    driver_pids: set[int] = set()
    exited: set[int] = set()
    read_boot_ns: int | None = None
    for o in observations:
        if o.provenance.method != DRIVER or o.verdict == Verdict.UNVERIFIABLE:
            continue
        if isinstance(o.payload, Process):
            driver_pids.add(o.payload.pid)
        elif isinstance(o.payload, Exit) and o.payload.pid is not None:
            exited.add(o.payload.pid)
        elif isinstance(o.payload, Details) and o.kind == "driver-stats":
            value = o.payload.data.get("now_boot_ns")
            read_boot_ns = value if isinstance(value, int) else None
    if not driver_pids or read_boot_ns is None:
        return []  # the driver did not run, or said nothing credible (its unverifiable says why)
    seen: dict[int, dict[str, str]] = {}
    comm: dict[int, str] = {}
    for o in observations:
        method, p = o.provenance.method, o.payload
        if method not in HYPERVISOR_VIEWS or method in unsound or o.verdict == Verdict.UNVERIFIABLE:
            continue
        if isinstance(p, Process) and p.is_user_process:
            if p.start_boottime_ns is None or p.start_boottime_ns > read_boot_ns:
                continue  # started after the driver's read (or unknown): the driver could not list it
            seen.setdefault(p.pid, {})[method] = "task list / PID table"
            comm.setdefault(p.pid, p.comm)
        elif (isinstance(p, KernelTamper) and p.technique == "hidden-task" and p.pid is not None
              and o.verdict == Verdict.VERIFIED):
            seen.setdefault(p.pid, {})[method] = p.check or "cross-view"
    findings = []
    for pid in sorted(seen):
        if pid in driver_pids or pid in exited:
            continue
        who = ", ".join(f"{m} ({v})" for m, v in sorted(seen[pid].items()))
        findings.append(Finding("driver-view-mismatch", "critical",
                                f"pid {pid} ({comm.get(pid, '?')}) runs (seen by {who}) but the in-guest driver's "
                                "process table lacks it: the guest kernel's task list is tampered with, or the "
                                "driver lies", vm,
                                [{"pid": pid, "seen_by": seen[pid], "driver_pids": len(driver_pids)}]))
    return findings
