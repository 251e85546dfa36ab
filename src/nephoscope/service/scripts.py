"""The `scripts` use case: what each interpreter process runs, and which scripts are known code.

The interpreter readers (introspect/interp) give every interpreter process's entry script, stacks and
loaded script files; each file is then read from the guest's page cache (found by path in the dentry
cache of the interpreter binary's file system), hashed whole and identified against the script-hash DB
(knowledge/scripts.py): a hash of a packaged file is "flask 2.2.2 (python3-flask 2.2.2-3)", verified; a
vulnerable package version gets its CVEs like a binary; a file of no package is an `unknown-script`
finding with its path and first lines (escaped). A file whose pages are not all cached, or that is not in
the dentry cache, is unverifiable, never guessed. With a QMP socket the VM is paused for the read (the
operator's run state is restored: a paused VM stays paused).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any

from nephoscope.core.errors import GuestDataError, KnowledgeError, MemoryAccessError
from nephoscope.core.records import Finding, Verdict
from nephoscope.core.text import escape_guest
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.interp import InterpResult, read_interpreters
from nephoscope.knowledge.scripts import SCRIPT_SUFFIXES, KnownScript, ScriptDB

UNKNOWN_SCRIPT, VULNERABLE_SCRIPT = "unknown-script", "running-vulnerable-script"
MAX_SCRIPT_BYTES = 8 << 20
HEAD_LINES, HEAD_CHARS = 5, 160
_BAD = (MemoryAccessError, GuestDataError)
DIST = re.compile(r"/(?:dist|site)-packages/([^/]+)/")


@dataclass(slots=True)
class ScriptFile:
    """One script file an interpreter runs, read from the page cache and identified by its hash."""

    path: str
    verdict: Verdict
    reason: str = ""
    sha256: str = ""
    size: int = 0
    known: list[KnownScript] = field(default_factory=list)
    head: list[str] = field(default_factory=list)  # first lines, escaped (unknown scripts only)

    @property
    def label(self) -> str:
        """Return "flask 2.2.2 (python3-flask 2.2.2-3)" for a packaged file, "" otherwise."""
        if not self.known:
            return ""
        k = self.known[0]
        upstream = k.version.split(":", 1)[-1].rsplit("-", 1)[0]
        m = DIST.search(self.path)
        project = m.group(1) if m else k.package
        return f"{project} {upstream} ({k.package} {k.version})"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "verdict": str(self.verdict), "reason": self.reason, "sha256": self.sha256,
                "size": self.size, "identity": self.label,
                "known": [{"package": k.package, "version": k.version, "path": k.path} for k in self.known],
                "head": self.head}


@dataclass(slots=True)
class InterpProcess:
    """An interpreter process with its script files identified."""

    result: InterpResult
    files: list[ScriptFile] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.result.to_dict(), "files": [f.to_dict() for f in self.files]}


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


def _root_dentry(k: Any, result: InterpResult, ctx_vmas: list[Any]) -> int | None:
    """Return the root dentry of the file system the interpreter binary lives on (its vm_file's mount)."""
    binary = result.details.get("binary", "")
    vma = next((v for v in ctx_vmas if v.file_gva and v.path == binary), None) or \
        next((v for v in ctx_vmas if v.file_gva), None)
    if vma is None:
        return None
    mnt = k.u64(vma.file_gva + k.off["file.f_path"] + k.off["path.mnt"])
    return int(k.u64(mnt + k.off["vfsmount.mnt_root"]))


def read_script(k: Any, root: int, path: str, db: ScriptDB | None) -> ScriptFile:
    """Return one script file read from the page cache below dentry `root`, hashed and identified."""
    from nephoscope.os.linux import pagecache

    try:
        dentry = pagecache.lookup_dentry(k, root, path)
        inode = pagecache.dentry_inode(k, dentry) if dentry else 0
        if not inode:
            return ScriptFile(path, Verdict.UNVERIFIABLE, "not in the guest's dentry cache (or on another mount)")
        if pagecache.inode_is_symlink(k, inode):
            return ScriptFile(path, Verdict.UNVERIFIABLE, "a symbolic link in the guest (its target is not followed)")
        cached = pagecache.read_cached_file(k, inode, "inode", max_bytes=MAX_SCRIPT_BYTES)
    except _BAD as exc:
        return ScriptFile(path, Verdict.UNVERIFIABLE, f"page cache unreadable ({exc})")
    if not cached.complete:
        return ScriptFile(path, Verdict.UNVERIFIABLE, cached.why_incomplete, size=cached.size)
    digest = hashlib.sha256(cached.data).hexdigest()
    known = db.identify(digest) if db is not None else []
    if known:
        return ScriptFile(path, Verdict.VERIFIED, "sha256 of the page-cache copy matches a packaged file",
                          digest, cached.size, known)
    head = [escape_guest(line, HEAD_CHARS) for line in
            cached.data[:HEAD_LINES * HEAD_CHARS * 2].decode("utf-8", "backslashreplace").splitlines()[:HEAD_LINES]]
    reason = "its sha256 is in no ingested package" if db is not None else "no script-hash DB to identify it"
    return ScriptFile(path, Verdict.VERIFIED, reason, digest, cached.size, [], head)


def _is_file(path: str) -> bool:
    return path.startswith("/") and not path.startswith("<")


def script_findings(processes: list[InterpProcess], vm: str, vulns: Any = None) -> list[Finding]:
    """Return unknown-script findings, and vulnerable-script findings when a vulnerability index is given."""
    out: list[Finding] = []
    unknown: dict[str, tuple[ScriptFile, list[InterpProcess]]] = {}
    packages: dict[tuple[str, str], tuple[set[int], set[str]]] = {}
    for proc in processes:
        for f in proc.files:
            if f.sha256 and not f.known and f.reason.startswith("its sha256"):
                unknown.setdefault(f.path, (f, []))[1].append(proc)
            for k in f.known[:1]:
                pids, paths = packages.setdefault((k.package, k.version), (set(), set()))
                pids.add(proc.result.pid)
                paths.add(f.path)
    for path, (f, procs) in sorted(unknown.items()):
        pids = sorted({p.result.pid for p in procs})
        out.append(Finding(UNKNOWN_SCRIPT, "medium",
                           f"{escape_guest(path, 200)} is run by pid(s) {', '.join(map(str, pids))} and belongs to "
                           "no known package", vm,
                           [{"path": path, "sha256": f.sha256, "size": f.size, "head": f.head, "pids": pids,
                             "interpreters": sorted({p.result.runtime for p in procs}),
                             "verdict": str(Verdict.VERIFIED), "vm": vm}]))
    if vulns is not None:
        for (package, version), (pids, paths) in sorted(packages.items()):
            source = _source_of(package, version)
            affected = vulns.affecting(source, version)
            if affected:
                out.append(Finding(VULNERABLE_SCRIPT, "high",
                                   f"{package} {version} is running as scripts in pid(s) "
                                   f"{', '.join(map(str, sorted(pids)))} with {len(affected)} known CVE(s)", vm,
                                   [{"package": package, "source": source, "versions": [version],
                                     "cves": [{"cve": a.cve, "fixed": a.fixed, "urgency": a.urgency}
                                              for a in affected], "paths": sorted(paths)[:20],
                                     "processes": [{"pid": p} for p in sorted(pids)],
                                     "verdict": str(Verdict.VERIFIED), "vm": vm}]))
    return out


def _source_of(package: str, version: str) -> str:
    try:
        from nephoscope.knowledge.debian import archive

        return str(archive.package_record(package, version).get("Source", package)).split()[0]
    except (KnowledgeError, KeyError, OSError):
        return package


def collect_scripts(k: Any, db: ScriptDB | None, *, max_files: int = 4096) -> list[InterpProcess]:
    """Return every interpreter process of kernel `k` with its script files identified (no pause here)."""
    from nephoscope.introspect.interp import iter_contexts

    results = read_interpreters(k)
    vmas = {ctx.task.pid: ctx.vmas for ctx in iter_contexts(k, {r.pid for r in results})}
    out: list[InterpProcess] = []
    seen: dict[tuple[int, str], ScriptFile] = {}
    for result in results:
        proc = InterpProcess(result)
        # the entry script (any name: /usr/bin/gunicorn) and every loaded file with a script suffix; extension
        # modules (.so) are ELF code, identified by their pages like any binary
        paths = [p for p in dict.fromkeys([result.entry, *(s for s in result.scripts if s.endswith(SCRIPT_SUFFIXES))])
                 if p and _is_file(p)]
        try:
            root = _root_dentry(k, result, vmas.get(result.pid, []))
        except _BAD:
            root = None
        for path in paths[:max_files]:
            if root is None:
                proc.files.append(ScriptFile(path, Verdict.UNVERIFIABLE, "no file system root for this process"))
                continue
            key = (root, path)
            if key not in seen:
                seen[key] = read_script(k, root, path, db)
            proc.files.append(seen[key])
        out.append(proc)
    return out


def scripts_report(vm: VmTarget, *, db: ScriptDB | None = None, vulns: Any = None, pause: bool = True,
                   symbols: Any = None, cache: bool = True) -> ScriptsReport:
    """Return what every interpreter of `vm` runs (pauses the VM for the read when it has a QMP socket)."""
    import contextlib

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
    findings = script_findings(processes, vm.name, vulns)
    return ScriptsReport(vm.name, processes, findings,
                         {"open_s": round(opened - started, 3), "read_s": round(read - opened, 3),
                          "total_s": round(time.monotonic() - started, 3)}, bool(did_pause))
