"""What the customer's tools can read: a CycloneDX 1.5 SBOM of the software seen running, and OpenVEX 0.2.0.

The SBOM lists the binary packages whose code a scan saw executing (analysis.vulnerable's running view:
pages identified by `arch`, executables and mapped files owned by a package via `inspect`/`agent`), each
with its package URL (`pkg:deb/debian/NAME@VERSION?arch=ARCH`) and the evidence per method
(`evidence.identity.methods`, `evidence.occurrences` = the guest paths, `nephoscope:*` properties).

The VEX document has one statement per CVE and package version, over an observed window (the stored
scans of the VM that obtained something, oldest to newest):
- `affected` where the package's code was executing in a scan of the window (action: the fixed version);
- `not_affected` / `vulnerable_code_not_in_execute_path` where the guest's dpkg status (read by the agent)
  says it is installed but no scan of the window saw its code executing, and every scan of the window ran
  a method that sees all executing code (arch, inspect or checkpoint) — the window is in `status_notes`;
- `under_investigation` where it is installed, not seen executing, but some scan saw only the guest's
  own account (agent alone), so absence of evidence is not evidence.
A scan is a snapshot: code that ran only between two scans is not seen; the notes say so.
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from nephoscope import __version__
from nephoscope.analysis.merge import merge
from nephoscope.analysis.vulnerable import Owner, Running, installed_from, mapped_paths, running_from_view
from nephoscope.core.errors import NephoscopeError
from nephoscope.core.payloads import Package
from nephoscope.core.records import Observation
from nephoscope.knowledge.vulns import VulnDB, version_key
from nephoscope.service.report import kb_owner
from nephoscope.service.scan import UNVERIFIABLE, scan_status

CYCLONEDX_VERSION = "1.5"
OPENVEX_CONTEXT = "https://openvex.dev/ns/v0.2.0"
FULL_VIEW = ("arch", "inspect", "checkpoint")  # methods that see executing code without the guest's word
# CycloneDX 1.5 identity techniques per method, with the confidence of the package identity they give
TECHNIQUE = {"arch": ("hash-comparison", 1.0, "executable pages hashed and matched to the package's file pages"),
             "checkpoint": ("hash-comparison", 0.95, "pages of a consistent snapshot matched to the package"),
             "inspect": ("dynamic-analysis", 0.8, "the kernel's memory maps name the package's file (version: dpkg)"),
             "trap": ("instrumentation", 0.8, "an exec of the package's file was trapped in the kernel"),
             "agent": ("manifest-analysis", 0.5, "the guest's /proc and dpkg status, as the guest reports them"),
             "driver": ("instrumentation", 0.5, "the in-guest driver's account")}
EXECUTABLE_DIRS = ("/usr/bin/", "/usr/sbin/", "/bin/", "/sbin/", "/usr/libexec/")


def purl(name: str, version: str, arch: str = "amd64") -> str:
    """Return the package URL of a Debian binary package version (epoch ':' and '+' percent-encoded)."""
    return f"pkg:deb/debian/{quote(name, safe='.+-')}@{quote(version, safe='.-~_')}?arch={quote(arch or 'amd64')}"


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(slots=True)
class ScanSeen:
    """What one stored scan saw: packages executing, packages installed, the methods that ran."""

    scan_id: int
    started: float
    methods: list[str]
    running: dict[str, Running]
    installed: dict[str, Any]
    arch: dict[str, str] = field(default_factory=dict)  # package -> dpkg architecture

    @property
    def full_view(self) -> bool:
        """Return whether a method that sees all executing code ran in this scan."""
        return any(m in FULL_VIEW for m in self.methods)


def seen_in(scan_id: int, started: float, methods: list[str], observations: list[Observation], vm: str,
            db: VulnDB, owner: Owner | None) -> ScanSeen:
    """Return what a scan's observations show executing and installed (the report's running view)."""
    view = merge(observations, methods, vm)
    installed = installed_from(observations)
    running = running_from_view(view, installed, db.binaries(), mapped_paths(observations), owner, observations)
    arch = {o.payload.name: o.payload.arch for o in observations if isinstance(o.payload, Package) and o.payload.arch}
    return ScanSeen(scan_id, started, list(view.methods), running, installed, arch)


def _component(run: Running, version: str, arch: str) -> dict[str, Any]:
    ref = purl(run.package, version, arch)
    methods = sorted(run.methods) or ["?"]
    evidence_methods = [{"technique": TECHNIQUE.get(m, ("other", 0.3, m))[0],
                         "confidence": TECHNIQUE.get(m, ("other", 0.3, m))[1],
                         "value": f"{m}: {TECHNIQUE.get(m, ('other', 0.3, 'nephoscope method'))[2]}"} for m in methods]
    confidence = max(e["confidence"] for e in evidence_methods)
    if len(run.versions) > 1:
        confidence = min(confidence, 0.5)  # pages fit several versions: which one is not certain
    props = [("nephoscope:running", "true"), ("nephoscope:methods", ",".join(methods)),
             ("nephoscope:verdict", run.verdict), ("nephoscope:processes", str(len(run.pids))),
             ("nephoscope:source-package", run.source or run.package)]
    if len(run.versions) > 1:
        props.append(("nephoscope:version-candidates", ",".join(sorted(run.versions, key=version_key))))
    kind = "application" if any(p.startswith(EXECUTABLE_DIRS) for p in run.paths) else "library"
    return {"type": kind, "bom-ref": ref, "name": run.package, "version": version, "purl": ref,
            "evidence": {"identity": {"field": "purl", "confidence": confidence, "methods": evidence_methods},
                         "occurrences": [{"location": p} for p in sorted(run.paths)[:200]]},
            "properties": [{"name": k, "value": v} for k, v in props]}


def build_cyclonedx(vm: str, seen: ScanSeen) -> dict[str, Any]:
    """Return a CycloneDX 1.5 BOM (JSON-ready) of the packages one scan saw executing."""
    components = []
    for run in sorted(seen.running.values(), key=lambda r: r.package):
        arch = seen.arch.get(run.package, "amd64")
        components += [_component(run, v, arch) for v in sorted(run.versions, key=version_key)]
    return {"bomFormat": "CycloneDX", "specVersion": CYCLONEDX_VERSION, "serialNumber": f"urn:uuid:{uuid.uuid4()}",
            "version": 1,
            "metadata": {"timestamp": _iso(seen.started),
                         "tools": {"components": [{"type": "application", "name": "nephoscope",
                                                   "version": __version__}]},
                         "component": {"type": "operating-system", "bom-ref": f"vm:{vm}", "name": vm,
                                       "description": "a virtual machine, observed from its host"},
                         "properties": [{"name": "nephoscope:scan", "value": str(seen.scan_id)},
                                        {"name": "nephoscope:methods", "value": ",".join(seen.methods)},
                                        {"name": "nephoscope:scope", "value": "software seen executing"}]},
            "components": components}


def _statement(cve: str, product: str, status: str, at: float, notes: str, **extra: str) -> dict[str, Any]:
    return {"vulnerability": {"name": cve}, "products": [{"@id": product, "identifiers": {"purl": product}}],
            "status": status, "timestamp": _iso(at), "status_notes": notes, **extra}


def build_openvex(vm: str, window: list[ScanSeen], db: VulnDB) -> dict[str, Any]:
    """Return an OpenVEX 0.2.0 document over a window of scans (oldest first; the last one is the present)."""
    if not window:
        raise NephoscopeError(f"no stored scan of {vm!r} obtained anything; run `nephoscope scan {vm}` first")
    index, sources = db.index(), db.binaries()
    latest, first, last = window[-1], _iso(window[0].started), _iso(window[-1].started)
    span = f"{len(window)} scan(s) from {first} to {last}"
    statements: list[dict[str, Any]] = []
    ran: dict[str, list[ScanSeen]] = {}
    for seen in window:
        for name in seen.running:
            ran.setdefault(name, []).append(seen)
    for name, run in sorted(latest.running.items()):
        for version in sorted(run.versions, key=version_key):
            product = purl(name, version, latest.arch.get(name, "amd64"))
            for a in index.affecting(run.source or sources.get(name) or name, version):
                action = (f"Update {name} to {a.fixed} or later and restart what runs it" if a.fixed
                          else f"No fixed version of {name} yet; restrict access to the service or stop it")
                statements.append(_statement(
                    a.cve, product, "affected", latest.started,
                    f"{name} {version} was executing at the scan of {last} ({len(run.pids)} process(es); seen by "
                    f"{', '.join(sorted(run.methods))}, {run.verdict}).", action_statement=action))
    for name, pkg in sorted(latest.installed.items()):
        if name in latest.running:
            continue
        product = purl(name, pkg.version, latest.arch.get(name, "amd64"))
        for a in index.affecting(sources.get(name) or pkg.source, pkg.version):
            if name in ran:
                when = ", ".join(_iso(s.started) for s in ran[name][:5])
                statements.append(_statement(
                    a.cve, product, "affected", latest.started,
                    f"{name} is installed and its code was executing at scan(s) {when} of the window ({span}), "
                    "though not at the latest one.",
                    action_statement=f"Update {name} to {a.fixed} or later" if a.fixed else
                    f"No fixed version of {name} yet; keep its code from running"))
            elif all(s.full_view for s in window):
                statements.append(_statement(
                    a.cve, product, "not_affected", latest.started,
                    f"{name} {pkg.version} is installed (the guest's dpkg status, read by the {pkg.method} method: "
                    f"{pkg.verdict}) but none of its code was seen executing in the observed window: {span}, "
                    f"each scan with a method that sees all executing code "
                    f"({', '.join(sorted({m for s in window for m in s.methods if m in FULL_VIEW}))}). "
                    "Code that ran only between two scans is not seen.",
                    justification="vulnerable_code_not_in_execute_path"))
            else:
                statements.append(_statement(
                    a.cve, product, "under_investigation", latest.started,
                    f"{name} {pkg.version} is installed and was not seen executing in {span}, but some scans saw "
                    "only the guest's own account of what runs (no arch, inspect or checkpoint)."))
    doc: dict[str, Any] = {"@context": OPENVEX_CONTEXT, "@id": f"urn:uuid:{uuid.uuid4()}",
                           "author": "nephoscope (the VM's host provider, observing from outside the VM)",
                           "role": "provider", "timestamp": _iso(latest.started), "version": 1,
                           "tooling": f"nephoscope {__version__}", "statements": statements}
    if not statements:  # OpenVEX needs at least one statement: say nothing was found, honestly
        raise NephoscopeError(f"no known CVE affects a package running or installed in {vm!r} ({span}); "
                              "an OpenVEX document needs at least one statement")
    return doc


def window_from_store(vm: str, store: Any, db: VulnDB, owner: Owner | None, limit: int = 50) -> list[ScanSeen]:
    """Return what the last `limit` stored scans of `vm` that obtained something saw, oldest first."""
    out = []
    for rec in reversed(store.scans(vm, limit=limit)):
        if rec.summary.get("status") == UNVERIFIABLE:
            continue
        observations = store.load_observations(rec.id, vm)
        if scan_status(observations) == UNVERIFIABLE:
            continue
        out.append(seen_in(rec.id, rec.started, rec.methods, observations, vm, db, owner))
    if not out:
        raise NephoscopeError(f"no stored scan of {vm!r} obtained anything; run `nephoscope scan {vm}` first")
    return out


FORMATS = ("cyclonedx", "openvex")


def exports(vm: str, fmts: tuple[str, ...] | list[str], *, store: Any = None, vulns: VulnDB | None = None,
            owner: Owner | None = None, limit: int = 50) -> dict[str, dict[str, Any]]:
    """Return format -> document for each of `fmts` ("cyclonedx": latest scan, "openvex": window of stored scans).

    The stored scans are read once for every format asked for; raises before returning anything when one
    of the documents cannot be built (no scan that obtained something, no known CVE for the VEX)."""
    from nephoscope.store.sqlite import Store

    unknown = [f for f in fmts if f not in FORMATS]
    if unknown:
        raise NephoscopeError(f"unknown export format {unknown[0]!r}; use cyclonedx or openvex")
    store = store or Store()
    db = vulns or VulnDB.open()
    owner = owner or kb_owner()
    window = window_from_store(vm, store, db, owner, limit=limit if "openvex" in fmts else 5)
    builders = {"cyclonedx": lambda: build_cyclonedx(vm, window[-1]), "openvex": lambda: build_openvex(vm, window, db)}
    return {f: builders[f]() for f in dict.fromkeys(fmts)}


def export(vm: str, fmt: str, *, store: Any = None, vulns: VulnDB | None = None, owner: Owner | None = None,
           limit: int = 50) -> dict[str, Any]:
    """Return `vm`'s SBOM ("cyclonedx", latest scan) or VEX ("openvex", window of stored scans)."""
    return exports(vm, (fmt,), store=store, vulns=vulns, owner=owner, limit=limit)[fmt]
