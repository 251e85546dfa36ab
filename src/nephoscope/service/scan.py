"""The scan use case: run methods on a VM, merge what they saw, store it, and diff scans."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nephoscope.analysis.code import CodeSummary, summarize_code
from nephoscope.analysis.facts import SEVERITY_RANK
from nephoscope.analysis.merge import ScanView, merge
from nephoscope.core.errors import NephoscopeError
from nephoscope.core.payloads import Image, Process
from nephoscope.core.records import Finding, Observation, Verdict
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.base import unverifiable
from nephoscope.service.methods import default_methods, get_method
from nephoscope.store.sqlite import ScanRecord, Store

Progress = Callable[[str], None]
SEVERITIES = tuple(SEVERITY_RANK)  # most severe first
OK = "ok"
UNVERIFIABLE = "unverifiable"  # no method obtained anything: stored flagged, never a clean result


def scan_status(observations: list[Observation]) -> str:
    """Return "unverifiable" when every observation is unverifiable (nothing was obtained), else "ok"."""
    return OK if any(o.verdict != Verdict.UNVERIFIABLE for o in observations) else UNVERIFIABLE


@dataclass(slots=True)
class ScanResult:
    """A finished scan: the merged view, raw observations, per-method timings and the stored id."""

    vm: VmTarget
    view: ScanView
    observations: list[Observation]
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    scan_id: int | None = None
    filter_changes: list[Any] = field(default_factory=list)  # filters this scan expired (service.filters)

    @property
    def status(self) -> str:
        """Return "ok", or "unverifiable" when no method obtained anything."""
        return scan_status(self.observations)

    def code(self) -> dict[int, CodeSummary]:
        """Return pid -> the code summary of each process (main binary, libraries, unknown regions)."""
        return {pid: summarize_code(p.exe, p.binaries) for pid, p in self.view.processes.items()}

    def findings_at_or_above(self, severity: str) -> list[Finding]:
        """Return the findings whose severity is `severity` or worse (one of SEVERITIES)."""
        limit = SEVERITY_RANK[severity]
        return [f for f in self.view.findings if SEVERITY_RANK.get(f.severity, len(SEVERITY_RANK)) <= limit]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        code = self.code()
        return {
            "scan_id": self.scan_id, "vm": self.vm.name, "status": self.status, "methods": self.view.methods,
            "timings": self.timings, "summary": self.view.summary(),
            "processes": [{**p.to_dict(), "code": code[p.pid].to_dict()}
                          for p in sorted(self.view.processes.values(), key=lambda p: p.pid)],
            "binaries": [b.to_dict() for b in self.view.binaries.values()],
            "findings": [f.to_dict() for f in self.view.findings],
            "unverifiable": self.view.unverifiable,
        }


Refine = Callable[[list[Observation]], list[Observation]]


def run_scan(vm: VmTarget, methods: list[str] | None = None, *, store: Store | None = None,
             options: dict[str, dict[str, object]] | None = None, progress: Progress = lambda _m: None,
             refine: Refine | None = None) -> ScanResult:
    """Run `methods` (default: all available but trap) on `vm`, merge, and store the result.

    `refine` sees every observation before the merge (kb sync: unknown code in a file whose installed
    version cannot be downloaded becomes unverifiable).

    A scan in which no method obtained anything is stored with summary status "unverifiable", so
    `history` shows it and `diff` does not take it for a scan in which every process had gone."""
    names = methods or default_methods()
    observations: list[Observation] = []
    timings: dict[str, dict[str, float]] = {}
    started = time.time()
    for name in names:
        method = get_method(name, **(options or {}).get(name, {}))
        progress(f"running {name}")
        wall, cpu = time.monotonic(), time.process_time()
        try:
            got = list(method.collect(vm))
        except NephoscopeError as exc:
            got = [unverifiable(name, vm, "everything", f"{name} failed: {exc}")]
        observations.extend(got)
        timings[name] = {"wall_s": round(time.monotonic() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3),
                         "observations": len(got)}
        extra = getattr(method, "last_stats", None)
        if isinstance(extra, dict):
            timings[name].update(extra)
    if refine is not None:
        observations = refine(observations)
    view = merge(observations, names, vm.name)
    result = ScanResult(vm, view, observations, timings)
    if store is not None:
        save_result(result, store, started)
        from nephoscope.service.filters import after_scan
        result.filter_changes = after_scan(store, vm.name, observations, names)
    return result


def save_result(result: ScanResult, store: Store, started: float) -> int:
    """Store a finished scan with its summary status and timings; set and return its id."""
    result.scan_id = store.save_scan(result.vm.name, result.view.methods, result.observations, result.view.findings,
                                     {**result.view.summary(), "status": result.status, "timings": result.timings},
                                     started)
    return result.scan_id


def scan_vm(spec: str, methods: list[str] | None = None, *, save: bool = True, rollback: bool = False,
            symbols: str | Path | None = None, progress: Progress = lambda _m: None,
            refine: Refine | None = None) -> ScanResult:
    """Scan the VM a user named (lab guest, QMP socket or memory file); store it in the default store.

    `symbols`: a --symbols file (ISF, vmlinux, System.map) for the inspect method's kernel model.
    """
    from nephoscope.service.targets import resolve_target

    target = resolve_target(spec)
    options: dict[str, dict[str, object]] = {"checkpoint": {"rollback": True}} if rollback else {}
    if symbols is not None:
        options["inspect"] = {"symbols": symbols}
    return run_scan(target, methods, store=Store() if save else None, options=options or None, progress=progress,
                    refine=refine)


@dataclass(slots=True)
class HostScan:
    """One VM's part of `scan --all`: its result, or why it could not be scanned."""

    name: str
    kind: str
    result: ScanResult | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        if self.result is None:
            return {"vm": self.name, "kind": self.kind, "status": "error", "error": self.error}
        return {**self.result.to_dict(), "kind": self.kind}


def scan_all(methods: list[str] | None = None, *, save: bool = True, progress: Progress = lambda _m: None,
             after: Callable[[HostScan], None] = lambda _s: None) -> tuple[list[HostScan], dict[str, str]]:
    """Scan every running VM on this host, one after another; return per VM its scan and the skipped sources.

    A VM that cannot be scanned gets an error entry and the sweep goes on; shut-off libvirt domains are
    listed with their state as the error. `after` is called with each entry as soon as it is made (a
    VM's follow-up, e.g. its notice, before the next VM is scanned); what it raises stops the sweep."""
    from nephoscope.hypervisor.discover import discover

    found = discover()
    store = Store() if save else None
    out = []
    for vm in found.vms:
        if not vm.running:
            out.append(HostScan(vm.name, vm.kind, error=f"not running ({vm.state})"))
            after(out[-1])
            continue
        progress(f"{vm.name} ({vm.kind})")
        try:
            out.append(HostScan(vm.name, vm.kind, run_scan(vm.target, methods, store=store,
                                                           progress=lambda m, n=vm.name: progress(f"{n}: {m}"))))
        except NephoscopeError as exc:
            out.append(HostScan(vm.name, vm.kind, error=str(exc)))
        after(out[-1])
    return out, found.skipped


def history(vm: str | None = None) -> list[ScanRecord]:
    """Return the stored scans (of one VM, or all), newest first."""
    return Store().scans(vm)


def diff_latest(vm: str, old: int | None = None, new: int | None = None) -> dict[str, Any]:
    """Return what changed between two stored scans of `vm` (default: the last two that obtained anything)."""
    store = Store()
    old_id, new_id = diff_pair(store, vm, old, new)
    return diff_scans(store, old_id, new_id)


def diff_pair(store: Store, vm: str, old: int | None = None, new: int | None = None) -> tuple[int, int]:
    """Return (old, new) scan ids to diff: given ids, else the last two scans of `vm` that obtained anything."""
    usable = [s.id for s in store.scans(vm, limit=1000) if s.summary.get("status", OK) != UNVERIFIABLE]
    new_id = new if new is not None else (usable[0] if usable else None)
    older = [i for i in usable if new_id is not None and i < new_id]
    if new_id is None or (old is None and not older):
        raise NephoscopeError(f"need two scans of {vm!r} that obtained something to diff; "
                              f"run `nephoscope scan {vm}` again")
    return (old if old is not None else max(older)), new_id


def diff_scans(store: Store, old_id: int, new_id: int) -> dict[str, Any]:
    """Return what changed between two stored scans: processes, binaries and findings added or gone."""
    def keyed(scan_id: int) -> tuple[dict[str, dict[str, Any]], set[str], set[str]]:
        procs = {}
        vm = store.get_scan(scan_id).vm
        for o in store.load_observations(scan_id, vm, "process"):
            p = o.payload
            if not isinstance(p, Process) or p.kernel_thread or p.agent_own:
                continue
            procs[f"{p.pid}:{p.comm}:{p.exe}"] = o.data
        bins = set()
        for kind in ("binary", "modified-binary"):
            for o in store.load_observations(scan_id, vm, kind):
                if not isinstance(o.payload, Image):
                    continue
                image = o.payload.identity()
                bins.add(f"{image['path']} {image['package']} {','.join(image['versions'])}"
                         + (" (modified)" if kind == "modified-binary" else ""))
        finds = {f"{f['kind']}: {f['title']}" for f in store.findings(scan_id)}
        return procs, bins, finds

    old_p, old_b, old_f = keyed(old_id)
    new_p, new_b, new_f = keyed(new_id)
    return {
        "old": old_id, "new": new_id,
        "processes_started": [new_p[k] for k in sorted(new_p.keys() - old_p.keys())],
        "processes_gone": [old_p[k] for k in sorted(old_p.keys() - new_p.keys())],
        "binaries_new": sorted(new_b - old_b), "binaries_gone": sorted(old_b - new_b),
        "findings_new": sorted(new_f - old_f), "findings_resolved": sorted(old_f - new_f),
    }
