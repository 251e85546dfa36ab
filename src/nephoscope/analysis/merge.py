"""Merge every method's observations into one view per process and per binary, and derive findings.

Disagreement between methods is the signal: a process the hardware-level methods see but the guest's
own tools do not is hidden; a process whose name differs from the binary it executes is masquerading;
executable code in no package is unknown; pages differing from every known version are modified.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from nephoscope.analysis.driver import driver_findings
from nephoscope.analysis.facts import dedupe
from nephoscope.analysis.network import scan_findings
from nephoscope.analysis.scripts import interpreter_summary, script_findings
from nephoscope.core.payloads import (
    CrossView,
    Details,
    Image,
    Interpreter,
    KernelImage,
    KernelTamper,
    Mapping,
    Process,
    Socket,
    UnknownCode,
    UnknownKernelCode,
)
from nephoscope.core.records import Finding, Observation, Verdict

# binaries whose processes legitimately carry another program's name (multi-call binaries)
MULTI_CALL = ("busybox",)
INTERPRETER_PREFIXES = ("python", "perl", "ruby", "php", "node", "java")
TRUST_ORDER = {"arch": 0, "inspect": 1, "checkpoint": 1, "trap": 2, "agent": 3}
# a method that says one of these could not be verified has no sound process view: its lists feed no
# hidden-process claim (a damaged or truncated view differs from every other for no reason at all)
PROCESS_VIEWS = frozenset({"everything", "kernel", "processes", "threads", "pid-idr", "cross-view"})


@dataclass(slots=True)
class ProcessView:
    """One process as all methods together see it."""

    pid: int
    comm: str = ""
    exe: str = ""
    cmdline: list[str] = field(default_factory=list)
    ppid: int | None = None
    seen_by: dict[str, str] = field(default_factory=dict)  # method -> verdict
    binaries: list[dict[str, Any]] = field(default_factory=list)  # identified executable images (arch)
    verdict: str = Verdict.UNVERIFIABLE.value
    interpreter: dict[str, Any] | None = None  # what an interpreter process runs (introspect/interp)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


@dataclass(slots=True)
class BinaryView:
    """One binary (path + package version) and who runs it."""

    path: str
    package: str | None
    versions: list[str]
    seen_by: set[str] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)
    status: str = "identified"  # identified | modified | unknown

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        d = asdict(self)
        d["seen_by"], d["pids"] = sorted(self.seen_by), sorted(self.pids)
        return d


@dataclass(slots=True)
class ScanView:
    """The merged result of one scan."""

    processes: dict[int, ProcessView]
    binaries: dict[str, BinaryView]
    findings: list[Finding]
    unverifiable: list[dict[str, str]]
    methods: list[str]

    def summary(self) -> dict[str, Any]:
        """Return counts for history listings."""
        by_verdict: dict[str, int] = defaultdict(int)
        for p in self.processes.values():
            by_verdict[p.verdict] += 1
        return {"processes": len(self.processes), "binaries": len(self.binaries), "findings": len(self.findings),
                "by_verdict": dict(by_verdict), "unverifiable": len(self.unverifiable), "methods": self.methods}


def _masquerading(comm: str, exe: str, cmdline: list[str]) -> bool:
    """Return whether a process's names point at a different program than the binary it executes."""
    base = os.path.basename(exe.removesuffix(" (deleted)"))
    if not comm or not base or exe.startswith("/memfd:") or base in MULTI_CALL:
        return False
    arg0 = os.path.basename(cmdline[0].split(" ")[0]) if cmdline else ""
    names_fit = base.startswith(comm[:15]) or comm.startswith(base[:15])
    arg_fits = not arg0 or base.startswith(arg0) or arg0.startswith(base) or arg0.startswith(comm)
    if base.startswith(INTERPRETER_PREFIXES) and names_fit:
        return False
    return not (names_fit and arg_fits)


# kernel-tamper technique -> (finding kind, severity); a hidden task is a hidden process (found by pid)
KERNEL_FINDINGS = {"hidden-task": ("hidden-process", "critical"), "hidden-module": ("hidden-module", "critical"),
                   "syscall-hook": ("syscall-hook", "critical"), "idt-hook": ("idt-hook", "critical"),
                   "inline-hook": ("inline-hook", "critical"), "ftrace-hook": ("ftrace-hook", "high"),
                   "kprobe-hook": ("kprobe-hook", "high"), "ops-hook": ("ops-hook", "critical")}
KERNEL_KINDS = tuple(sorted({kind for kind, _ in KERNEL_FINDINGS.values()}))


def _kernel_finding(p: KernelTamper, o: Observation, vm: str, method: str) -> Finding | None:
    """Return the finding a verified kernel-tamper observation makes (None for an unknown technique)."""
    if o.verdict != Verdict.VERIFIED or p.technique not in KERNEL_FINDINGS:
        return None
    kind, severity = KERNEL_FINDINGS[p.technique]
    evidence: dict[str, Any] = {"method": method, "check": p.check, **o.data}
    if p.technique == "hidden-task":
        title = f"pid {p.pid} is hidden from both the task list and the PID table (DKOM), seen by {p.check}"
    elif p.technique == "hidden-module":
        title = f"module {p.module or '?'} runs code in the module area but is hidden ({p.check})"
    elif p.technique == "modified-code":
        title = f"{p.where} points into modified kernel code: {p.evidence}"
    else:
        title = f"{p.where} is hooked: {p.evidence}"
    return Finding(kind, severity, title, vm, [evidence])


# inspect's pointer checks with kernel code identity: a pointer whose target page differs from the package
KERNEL_FINDINGS["modified-code"] = ("modified-kernel-code", "critical")


def merge(observations: list[Observation], methods: list[str], vm: str) -> ScanView:
    """Merge observations of one VM into process and binary views with findings."""
    processes: dict[int, ProcessView] = {}
    binaries: dict[str, BinaryView] = {}
    unverifiable: list[dict[str, str]] = []
    findings: list[Finding] = []
    agent_credible = "agent" in methods
    by_cr3: dict[int, list[dict[str, Any]]] = defaultdict(list)
    pid_cr3: dict[int, int] = {}
    sockets: list[tuple[str, Socket]] = []
    interpreters: list[Interpreter] = []
    unsound = {o.provenance.method for o in observations  # (arch's own "kernel" note is about kernel text)
               if o.verdict == Verdict.UNVERIFIABLE and o.key in PROCESS_VIEWS and o.provenance.method != "arch"
               and o.via != "arch"}

    for o in sorted(observations, key=lambda o: TRUST_ORDER.get(o.provenance.method, 9)):
        method, p = o.provenance.method, o.payload
        if o.verdict == Verdict.UNVERIFIABLE:
            unverifiable.append({"method": method, "what": o.key, "reason": o.reason})
            if method == "agent" and o.key == "processes":
                agent_credible = False
            continue
        if isinstance(p, Details) and p.problem:  # a stored record that does not fit its kind: no claim
            unverifiable.append({"method": method, "what": o.key,
                                 "reason": f"the {o.kind} record is malformed ({p.problem})"})
        elif isinstance(p, Process) and p.is_user_process:
            view = processes.setdefault(p.pid, ProcessView(p.pid))
            view.seen_by[method] = str(o.verdict)
            for key in ("comm", "exe", "cmdline", "ppid"):  # the most trusted method that knows it
                if not getattr(view, key) and getattr(p, key):
                    setattr(view, key, list(p.cmdline) if key == "cmdline" else getattr(p, key))
            if p.cr3 is not None:
                pid_cr3[p.pid] = p.cr3
        elif isinstance(p, Mapping) and "x" in p.perms and not p.path:
            findings.append(Finding("anonymous-exec", "high",
                                    f"pid {p.pid} has an anonymous executable mapping at {p.start:#x} ({p.perms})",
                                    vm, [{"pid": p.pid, "method": method, **o.data}]))
        elif isinstance(p, CrossView):
            if o.verdict != Verdict.VERIFIED or method in unsound:
                unverifiable.append({"method": method, "what": o.key, "reason": "a difference between kernel "
                                     "views that were not both complete and validated: no hidden-process claim"})
                continue
            findings.append(Finding("hidden-process", "critical",
                                    f"pid {p.pid} ({p.comm}) is "
                                    + ("on the task list but not in the PID table" if p.in_task_list
                                       else "in the PID table but unlinked from the task list (DKOM)"),
                                    vm, [{"pid": p.pid, "method": method, **o.data}]))
        elif isinstance(p, KernelTamper):
            finding = _kernel_finding(p, o, vm, method)
            if finding is not None:
                findings.append(finding)
        elif isinstance(p, Image):
            image = p.identity()
            image["status"] = "modified" if o.kind == "modified-binary" else "identified"
            image["method"] = method
            for root in p.roots:
                by_cr3[root].append(image)
            key = f"{image['path']}|{image['package']}|{','.join(image['versions'])}|{image['status']}"
            bv = binaries.setdefault(key, BinaryView(image["path"], image["package"], image["versions"],
                                                     status=image["status"]))
            bv.seen_by.add(method)
            if o.kind == "modified-binary":
                findings.append(Finding("modified-binary", "high",
                                        f"{image['path']} ({image['package']}) is mapped with pages that differ "
                                        "from every known version", vm, [o.to_dict()]))
        elif isinstance(p, Socket):
            sockets.append((method, p))
        elif isinstance(p, Interpreter):
            processes.setdefault(p.pid, ProcessView(p.pid)).interpreter = interpreter_summary(p)
            interpreters.append(p)
        elif isinstance(p, UnknownCode) and o.verdict == Verdict.UNVERIFIABLE:
            # kb sync: code in a packaged file whose installed version the archive no longer offers
            unverifiable.append({"method": method, "what": o.key, "reason": o.reason})
        elif isinstance(p, KernelImage) and o.kind == "modified-kernel-image":
            where = ", ".join(c.function for c in p.changes[:4]) or f"{len(p.modified_pages)} page(s)"
            findings.append(Finding("modified-kernel-code", "critical",
                                    f"kernel image {p.name} ({p.package} {p.version}) differs from its package "
                                    f"outside every legitimate patch site: {where}", vm, [o.to_dict()]))
        elif isinstance(p, UnknownKernelCode):
            findings.append(Finding("unknown-kernel-code", "critical",
                                    f"executable kernel memory in no kernel image or known module at "
                                    f"{p.gva_start:#x}-{p.gva_end:#x} ({p.pages} pages)", vm, [o.to_dict()]))
        elif isinstance(p, UnknownCode):
            start, end = p.gva_start or 0, p.gva_end or 0
            for root in p.roots:
                by_cr3[root].append({"path": "", "package": None, "versions": [], "status": "unknown",
                                     "gva_start": start, "gva_end": end, "method": method})
            findings.append(Finding("unknown-code", "high", f"executable code in no known binary at "
                                    f"{start:#x}-{end:#x}", vm,
                                    [o.to_dict()]))

    for pid, cr3 in pid_cr3.items():
        images = by_cr3.get(cr3, [])
        processes[pid].binaries = images
        for img in images:
            processes[pid].seen_by.setdefault(str(img.get("method", "arch")), Verdict.VERIFIED.value)
            for bv in binaries.values():
                if bv.path == img.get("path") and bv.package == img.get("package"):
                    bv.pids.add(pid)

    for view in processes.values():
        hw = [m for m in ("arch", "inspect", "checkpoint", "trap") if m in view.seen_by]
        if view.binaries or any(view.seen_by[m] == Verdict.VERIFIED for m in hw):
            view.verdict = Verdict.VERIFIED.value
        elif view.seen_by:
            view.verdict = Verdict.REPORTED.value
        sound = [m for m in ("inspect", "checkpoint", "trap") if m in view.seen_by and m not in unsound]
        if sound and agent_credible and "agent" not in view.seen_by:
            findings.append(Finding("hidden-process", "high",
                                    f"pid {view.pid} ({view.comm}) runs but the guest's own tools do not list it",
                                    vm, [{"pid": view.pid, "seen_by": view.seen_by}]))
        if view.exe.endswith(" (deleted)") and not view.exe.startswith("/memfd:"):
            findings.append(Finding("deleted-binary", "medium", f"pid {view.pid} runs from a deleted file {view.exe}",
                                    vm, [{"pid": view.pid, "exe": view.exe}]))
        if view.exe.startswith("/memfd:"):
            findings.append(Finding("fileless", "high", f"pid {view.pid} runs from memory only ({view.exe})", vm,
                                    [{"pid": view.pid, "exe": view.exe}]))
        if _masquerading(view.comm, view.exe, view.cmdline):
            findings.append(Finding("masquerading", "medium",
                                    f"pid {view.pid} calls itself {view.comm!r} but executes {view.exe}", vm,
                                    [{"pid": view.pid, "comm": view.comm, "cmdline": view.cmdline,
                                      "exe": view.exe}]))
    findings += scan_findings(sockets, processes, unverifiable, vm, agent_credible)
    findings += script_findings(interpreters, vm)
    findings += driver_findings(observations, unsound, vm)  # the in-guest driver's table vs inspect/checkpoint
    pids_of_root: dict[int, list[int]] = defaultdict(list)
    for pid, cr3 in sorted(pid_cr3.items()):
        pids_of_root[cr3].append(pid)
    return ScanView(processes, binaries, dedupe(findings, pids_of_root), unverifiable, methods)
