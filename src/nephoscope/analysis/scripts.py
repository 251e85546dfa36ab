"""Script findings: scripts of no package, packaged scripts with other bytes, vulnerable packaged scripts.

Input is the `interpreter` payloads (one per interpreter process, each with its script files' status as
introspect/interp/files.py decided it from page-cache hashes). `unknown-script` (a script in no package,
where Debian never installs) and `modified-script` (a packaged path whose bytes are no package's) carry
the path and first lines, escaped; `running-vulnerable-script` matches a packaged script's package version
to its CVEs as vulnerable.py does for binaries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from nephoscope.core.payloads import Interpreter, ScriptEntry
from nephoscope.core.records import Finding, Verdict
from nephoscope.core.text import escape_guest

UNKNOWN_SCRIPT, MODIFIED_SCRIPT, VULNERABLE_SCRIPT = "unknown-script", "modified-script", "running-vulnerable-script"
Source = Callable[[str, str], str]  # (binary package, version) -> source package


def interpreter_summary(p: Interpreter) -> dict[str, Any]:
    """Return what a process view shows of its interpreter: build, entry, main thread's innermost frames,
    and its script files counted by status with the packages they belong to."""
    counts: dict[str, int] = {}
    for f in p.files:
        counts[f.status] = counts.get(f.status, 0) + 1
    return {"kind": p.kind, "runtime": p.runtime, "entry": p.entry, "threads": len(p.stacks),
            "now": list(p.stacks[-1][:3]) if p.stacks else [], "scripts": p.scripts, "files": counts,
            "packages": sorted({f.identity for f in p.files if f.identity})[:50],
            "unknown": sorted(f.path for f in p.files if f.status in ("unknown", "modified"))}


def script_findings(interpreters: Iterable[Interpreter], vm: str, vulns: Any = None,
                    source_of: Source = lambda package, _version: package) -> list[Finding]:
    """Return unknown/modified-script findings, and vulnerable-script ones when a VulnIndex is given."""
    out: list[Finding] = []
    odd: dict[tuple[str, str], tuple[ScriptEntry, set[int], set[str]]] = {}
    packages: dict[tuple[str, str], tuple[set[int], set[str]]] = {}
    for interp in interpreters:
        for f in interp.files:
            if f.status in ("unknown", "modified"):
                entry = odd.setdefault((f.status, f.path), (f, set(), set()))
                entry[1].add(interp.pid)
                entry[2].add(interp.runtime)
            elif f.status == "known" and f.package:
                pids, paths = packages.setdefault((f.package, f.version), (set(), set()))
                pids.add(interp.pid)
                paths.add(f.path)
    for (status, path), (f, pids, runtimes) in sorted(odd.items()):
        who = ", ".join(map(str, sorted(pids)))
        kind, severity, what = ((UNKNOWN_SCRIPT, "medium", "belongs to no known package") if status == "unknown"
                                else (MODIFIED_SCRIPT, "high", f"differs from the packaged file ({f.reason})"))
        out.append(Finding(kind, severity, f"{escape_guest(path, 200)}, run by pid(s) {who}, {what}", vm,
                           [{"path": path, "sha256": f.sha256, "head": list(f.head), "pids": sorted(pids),
                             "interpreters": sorted(runtimes), "verdict": str(Verdict.VERIFIED), "vm": vm}]))
    if vulns is None:
        return out
    for (package, version), (pids, paths) in sorted(packages.items()):
        source = source_of(package, version)
        affected = vulns.affecting(source, version)
        if affected:
            out.append(Finding(VULNERABLE_SCRIPT, "high",
                               f"{package} {version} runs as scripts in pid(s) {', '.join(map(str, sorted(pids)))} "
                               f"with {len(affected)} known CVE(s)", vm,
                               [{"package": package, "source": source, "versions": [version],
                                 "cves": [{"cve": a.cve, "fixed": a.fixed, "urgency": a.urgency} for a in affected],
                                 "paths": sorted(paths)[:20], "processes": [{"pid": p} for p in sorted(pids)],
                                 "verdict": str(Verdict.VERIFIED), "vm": vm}]))
    return out
