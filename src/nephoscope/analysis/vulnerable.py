"""Vulnerable code findings: running package versions below a fix rank above ones merely installed.

Running code comes from the scan view: binaries identified by their pages (`arch`, verified) with the
pids executing them, and processes whose executable or mapped files belong to a package (`inspect`,
`agent`: the path is observed, the version is what dpkg reports). Installed packages come from the
agent's `package` observations (the guest's dpkg status, reported).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from nephoscope.analysis.merge import ScanView
from nephoscope.core.payloads import Image, Mapping, Package, Process
from nephoscope.core.records import Finding, Observation, Verdict
from nephoscope.knowledge.vulns import Affected, VulnIndex, version_key

RUNNING, INSTALLED = "running-vulnerable", "installed-vulnerable"
SEVERITY = {RUNNING: "high", INSTALLED: "medium"}
Owner = Callable[[str], str | None]  # guest path -> binary package that ships it


@dataclass(slots=True)
class Installed:
    """One package as the guest's dpkg status reports it."""

    name: str
    version: str
    source: str
    method: str = "agent"
    verdict: str = Verdict.REPORTED.value


@dataclass(slots=True)
class Running:
    """One binary package seen executing: its candidate versions, processes and evidence."""

    package: str
    versions: set[str]
    source: str = ""
    pids: set[int] = field(default_factory=set)
    paths: set[str] = field(default_factory=set)
    methods: set[str] = field(default_factory=set)
    verdict: str = Verdict.VERIFIED.value


def installed_from(observations: Iterable[Observation]) -> dict[str, Installed]:
    """Return installed packages from `package` observations."""
    out: dict[str, Installed] = {}
    for o in observations:
        p = o.payload
        if isinstance(p, Package) and o.verdict != Verdict.UNVERIFIABLE and p.name and p.version:
            out[p.name] = Installed(p.name, p.version, p.source or p.name, o.provenance.method, str(o.verdict))
    return out


def mapped_paths(observations: Iterable[Observation]) -> dict[int, set[str]]:
    """Return pid -> file paths it executes or maps executable, from process and mapping observations."""
    out: dict[int, set[str]] = {}
    own: set[int] = set()  # the agent's own helpers (its listing shell) are not the customer's code
    for o in observations:
        p = o.payload
        if isinstance(p, Process) and p.agent_own:
            own.add(p.pid)
        path = p.exe if isinstance(p, Process) else p.path if isinstance(p, Mapping) else None
        if path and path.startswith("/"):
            out.setdefault(p.pid, set()).add(path.removesuffix(" (deleted)"))  # type: ignore[union-attr]
    return {pid: paths for pid, paths in out.items() if pid not in own}


def running_from_arch(observations: Iterable[Observation]) -> dict[str, Running]:
    """Return packages whose pages `arch` identified (`binary` observations), with the pids of their cr3."""
    pids: dict[int, set[int]] = {}
    images: list[Image] = []
    for o in observations:
        p = o.payload
        if isinstance(p, Process) and p.cr3 is not None:
            pids.setdefault(p.cr3, set()).add(p.pid)
        elif isinstance(p, Image) and o.kind == "binary" and o.provenance.method == "arch":
            images.append(p)
    out: dict[str, Running] = {}
    for image in images:
        for cand in image.candidates:
            if not cand.package or not cand.version:
                continue
            run = out.setdefault(cand.package, Running(cand.package, set(), cand.source_package))
            run.versions.add(cand.version)
            run.paths.add(cand.path)
            run.methods.add("arch")
            run.pids |= pids.get(image.cr3 if image.cr3 is not None else -1, set())
    return out


def _versions(package: str | None, raw: Iterable[Any]) -> set[str]:
    """Return version strings from plain versions or (package, version) pairs."""
    out = set()
    for v in raw:
        if isinstance(v, list | tuple):
            if len(v) == 2 and v[0] == package:
                out.add(str(v[1]))
        elif v:
            out.add(str(v))
    return out


def running_from_view(view: ScanView, installed: dict[str, Installed], sources: dict[str, str],
                      paths: dict[int, set[str]] | None = None, owner: Owner | None = None,
                      observations: Iterable[Observation] = ()) -> dict[str, Running]:
    """Return binary packages executing in the scan: page-identified binaries, then owned paths."""
    out: dict[str, Running] = running_from_arch(observations)
    for bv in view.binaries.values():
        versions = _versions(bv.package, bv.versions)
        if not bv.package or bv.status == "unknown" or not versions:
            continue
        run = out.setdefault(bv.package, Running(bv.package, versions))
        run.versions = (run.versions & versions) or run.versions | versions
        run.pids |= bv.pids
        run.paths.add(bv.path)
        run.methods |= bv.seen_by
    for run in out.values():
        have = installed.get(run.package)
        if have is not None and have.version in run.versions:
            run.versions = {have.version}  # pages fit several versions; dpkg names one of them
    if owner is not None:
        for pid, files in (paths or {}).items():
            seen_by = view.processes[pid].seen_by if pid in view.processes else {}
            for path in files:
                package = owner(path)
                have = installed.get(package or "")
                if package is None or have is None:
                    continue
                run = out.get(package)
                if run is None:
                    run = out[package] = Running(package, {have.version}, verdict=Verdict.REPORTED.value)
                if pid not in run.pids:
                    run.methods |= set(seen_by)
                run.pids.add(pid)
                run.paths.add(path)
    for run in out.values():
        have = installed.get(run.package)
        run.source = run.source or sources.get(run.package) or (have.source if have else "") or run.package
    return out


def _fix_for_all(affected: list[Affected]) -> str | None:
    fixes = [a.fixed for a in affected if a.fixed]
    return max(fixes, key=version_key) if fixes and all(a.fixed for a in affected) else None


def _cves(affected: list[Affected]) -> list[dict[str, Any]]:
    return [{"cve": a.cve, "fixed": a.fixed, "urgency": a.urgency, "origins": a.origins} for a in affected]


def _running_finding(run: Running, index: VulnIndex, view: ScanView, vm: str) -> Finding | None:
    per_version = {v: index.affecting(run.source, v) for v in sorted(run.versions, key=version_key)}
    union: dict[str, Affected] = {}
    for affected in per_version.values():
        for a in affected:
            union.setdefault(a.cve, a)
    if not union:
        return None
    certain = set.intersection(*({a.cve for a in aff} for aff in per_version.values()))
    affected = sorted(union.values(), key=lambda a: a.cve)
    procs = [{"pid": pid, "comm": view.processes[pid].comm if pid in view.processes else "",
              "exe": view.processes[pid].exe if pid in view.processes else ""} for pid in sorted(run.pids)]
    versions = sorted(run.versions, key=version_key)
    fixed = _fix_for_all(affected)
    names = ", ".join(sorted({p["comm"] for p in procs if p["comm"]}))
    where = (f"pids {', '.join(str(p['pid']) for p in procs)}: {names}" if procs
             else "in an address space no process listing names")
    title = (f"{run.package} {' or '.join(versions)} is executing ({where}) with {len(affected)} known CVE(s); "
             + (f"fixed in {fixed}" if fixed else "no fixed version for some"))
    return Finding(RUNNING, SEVERITY[RUNNING], title, vm, [{
        "package": run.package, "source": run.source, "versions": versions, "fixed_version": fixed,
        "cves": _cves(affected), "uncertain_cves": sorted(set(union) - certain), "processes": procs,
        "paths": sorted(run.paths), "methods": sorted(run.methods), "verdict": run.verdict, "vm": vm}])


def _installed_finding(pkg: Installed, affected: list[Affected], vm: str) -> Finding:
    fixed = _fix_for_all(affected)
    title = (f"{pkg.name} {pkg.version} is installed (not seen executing) with {len(affected)} known CVE(s); "
             + (f"fixed in {fixed}" if fixed else "no fixed version for some"))
    return Finding(INSTALLED, SEVERITY[INSTALLED], title, vm, [{
        "package": pkg.name, "source": pkg.source, "versions": [pkg.version], "fixed_version": fixed,
        "cves": _cves(affected), "processes": [], "methods": [pkg.method], "verdict": pkg.verdict, "vm": vm}])


def vulnerable_findings(view: ScanView, installed: dict[str, Installed], index: VulnIndex, vm: str, *,
                        sources: dict[str, str] | None = None, paths: dict[int, set[str]] | None = None,
                        owner: Owner | None = None,
                        observations: Iterable[Observation] = ()) -> list[Finding]:
    """Return running-vulnerable findings (ranked first) then installed-vulnerable ones."""
    sources = sources or {}
    running = running_from_view(view, installed, sources, paths, owner, observations)
    out = [f for run in sorted(running.values(), key=lambda r: r.package)
           if (f := _running_finding(run, index, view, vm)) is not None]
    for name in sorted(installed.keys() - running.keys()):
        pkg = installed[name]
        affected = index.affecting(sources.get(name) or pkg.source, pkg.version)
        if affected:
            out.append(_installed_finding(pkg, affected, vm))
    return out
