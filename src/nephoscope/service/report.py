"""The customer report use case: a typed report of one VM for its owner, from a scan or the store.

It holds running vulnerable software with the versions that fix it, malicious or unknown code with its
evidence, and what could not be verified. It carries nothing of other VMs and no host internals: fields
are copied from a whitelist, and host-produced messages are scrubbed of host paths and page-table roots.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nephoscope.analysis.facts import dedupe, finding_location, pids_by_root
from nephoscope.analysis.malware import regions_from, scan_regions
from nephoscope.analysis.merge import KERNEL_KINDS, ScanView, merge
from nephoscope.analysis.network import NETWORK_KINDS
from nephoscope.analysis.scripts import MODIFIED_SCRIPT, UNKNOWN_SCRIPT, VULNERABLE_SCRIPT, script_findings
from nephoscope.analysis.vulnerable import RUNNING, Owner, installed_from, mapped_paths, vulnerable_findings
from nephoscope.core.errors import NephoscopeError
from nephoscope.core.payloads import Interpreter
from nephoscope.core.records import Finding, Observation
from nephoscope.knowledge.vulns import VulnDB
from nephoscope.service.scan import scan_status

CODE_KINDS = tuple(dict.fromkeys(("malicious-code", "unknown-code", "modified-binary", "anonymous-exec",
                                   "hidden-process", "fileless", "modified-kernel-code", "unknown-kernel-code",
                                   "deleted-binary", "masquerading", UNKNOWN_SCRIPT, MODIFIED_SCRIPT,
                                   *KERNEL_KINDS)))
DETAIL_KEYS = ("pid", "pids", "comm", "exe", "cmdline", "path", "package", "start", "end", "gva_start", "gva_end",
               "gva", "rule",
               "description", "technique", "sha256", "perms", "check", "where", "target", "module", "function",
               "owner", "evidence", "method", "verdict", "seen_by", "head")
# what a network-behaviour item shows of a socket (guest-side addresses only: never the host's end of a flow)
SOCKET_KEYS = ("proto", "state", "local", "local_port", "remote", "remote_port")
_HOST_PATTERNS = [(re.compile(p), r) for p, r in (
    (r"\bcr3:0x[0-9a-fA-F]+:?", ""), (r"\bcr3[=: ]*(0x)?[0-9a-fA-F]+", "<host>"), (r"/run/nephoscope\S*", "<host>"),
    (r"/dev/shm/\S+", "<host>"), (r"\S+\.sock\b", "<host>"), (r"/root/\S+", "<host>"), (r"/home/\S+", "<host>"))]
ADDRESS_KEYS = ("start", "end", "gva", "gva_start", "gva_end", "target")
SEVERITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3}


@dataclass(slots=True)
class VulnItem:
    """One vulnerable package: what runs it, which CVEs, and the version that fixes them all."""

    package: str
    versions: list[str]
    running: bool
    fixed_version: str | None
    cves: list[dict[str, Any]]
    processes: list[dict[str, Any]]
    evidence: str  # methods and verdict, e.g. "arch (verified)"


@dataclass(slots=True)
class CodeItem:
    """One fact about malicious, unknown or suspicious code, with customer-safe evidence.

    `details` holds one entry per distinct piece of evidence, each with the `methods` that saw it;
    `methods` is every method that saw the fact."""

    kind: str
    severity: str
    title: str
    details: list[dict[str, Any]]
    methods: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Report:
    """Everything the owner of one VM should know from one scan."""

    vm: str
    scan_id: int | None
    scanned_at: float
    methods: list[str]
    vulnerable: list[VulnItem] = field(default_factory=list)
    code: list[CodeItem] = field(default_factory=list)
    behaviour: list[CodeItem] = field(default_factory=list)  # what processes do on the network (analysis.network)
    interpreters: list[dict[str, Any]] = field(default_factory=list)  # what each interpreter process runs
    unverified: list[dict[str, str]] = field(default_factory=list)
    summary: dict[str, int] = field(default_factory=dict)
    status: str = "ok"  # "unverifiable" when no method obtained anything: nothing here is an all-clear
    # every finding behind the items above (one per fact, raw evidence): for `scan --fail-on`, never for the owner
    findings: list[Finding] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (without the raw `findings`)."""
        return asdict(self, dict_factory=lambda kv: {k: v for k, v in kv if k != "findings"})


def scrub(text: str, extra: tuple[str, ...] = ()) -> str:
    """Return a host-produced message without host paths, socket names or page-table roots."""
    for value in sorted((e for e in extra if e), key=len, reverse=True):
        text = text.replace(value, "<host>")
    for pattern, replacement in _HOST_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _grouped(items: list[dict[str, str]]) -> list[dict[str, str]]:
    """Return unverifiable items folded: one line per method and reason, then one per fact across methods."""
    groups: dict[tuple[str, str], list[str]] = {}
    for u in items:
        groups.setdefault((u["method"], u["reason"]), []).append(u["what"])
    facts: dict[tuple[str, str], list[str]] = {}  # arch and checkpoint's arch on the copy say the same things
    for (method, reason), whats in groups.items():
        what = whats[0] if len(whats) == 1 else f"{whats[0]} and {len(whats) - 1} more like it"
        facts.setdefault((what, reason), []).append(method)
    return [{"what": what, "method": ", ".join(methods), "reason": reason} for (what, reason), methods in facts.items()]


def _details(evidence: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for ev in evidence:
        data = ev.get("data", ev) if isinstance(ev.get("data"), dict) else ev
        kept = {k: (f"{data[k]:#x}" if k in ADDRESS_KEYS and isinstance(data[k], int) else data[k])
                for k in DETAIL_KEYS if k in data and k not in ("method", "verdict")}
        if "provenance" in ev:
            kept["method"], kept["verdict"] = ev["provenance"].get("method"), ev.get("verdict")
        else:
            kept.update({k: ev[k] for k in ("method", "verdict") if k in ev})
        out.append(kept)
    return out


def _code_item(f: Finding, view: ScanView, pids_of_root: dict[int, list[int]]) -> CodeItem:
    """Return a finding as a report item: evidence lines folded across methods, every method named."""
    loc = finding_location(f, {pid: cr3 for cr3, pids in pids_of_root.items() for pid in pids})
    pids = pids_of_root.get(loc.cr3, []) if loc is not None else []
    order = {m: i for i, m in enumerate(view.methods)}
    methods: set[str] = set()
    folded: dict[str, dict[str, Any]] = {}
    for d in _details(f.evidence):
        method, verdict, seen = d.pop("method", None), d.pop("verdict", None), d.pop("seen_by", None)
        d = {k: v for k, v in d.items() if v not in ("", None, [])}
        if pids and "pid" not in d and "pids" not in d:
            d["pids"] = pids
        entry = folded.setdefault(json.dumps(d, sort_keys=True, default=str), {**d, "methods": []})
        for m in ([method] if method else []) + (sorted(seen) if isinstance(seen, dict) else []):
            methods.add(str(m))
            if m not in entry["methods"]:
                entry["methods"].append(str(m))
        if verdict and entry.get("verdict") != "verified":
            entry["verdict"] = str(verdict)
        pid = d.get("pid")
        if isinstance(pid, int) and pid in view.processes and not entry["methods"]:
            methods |= set(view.processes[pid].seen_by)  # a process fact: every method that saw the process
    details = list(folded.values())
    for d in details:
        d["methods"] = sorted(d["methods"], key=lambda m: order.get(m, len(order)))
        if not d["methods"]:
            del d["methods"]
    return CodeItem(f.kind, f.severity, f.title, details, sorted(methods, key=lambda m: order.get(m, len(order))))


def _socket_text(row: dict[str, Any]) -> str:
    local = f"{row.get('local', '')}:{row.get('local_port', '')}" if row.get("local_port") else ""
    remote = f"{row.get('remote', '')}:{row.get('remote_port', '')}" if row.get("remote_port") else ""
    ends = " -> ".join(e for e in (local, remote) if e)
    return " ".join(str(x) for x in (row.get("proto", ""), ends, f"({row['state']})" if row.get("state") else "")
                    if x)


def _behaviour_item(f: Finding, view: ScanView, host_strings: tuple[str, ...]) -> CodeItem:
    """Return a network finding as a report item: the process, its code identity, the sockets (guest side)."""
    order = {m: i for i, m in enumerate(view.methods)}
    details: list[dict[str, Any]] = []
    methods: set[str] = set()
    for ev in f.evidence:
        who = [ev] if "pid" in ev else [w for w in ev.get("owners", []) if isinstance(w, dict)]
        d: dict[str, Any] = {}
        for w in who[:8]:
            what = ", ".join(str(w[k]) for k in ("binary", "package", "identity") if w.get(k) not in (None, ""))
            d.setdefault("processes", []).append(f"pid {w.get('pid')} {w.get('comm', '')} ({what})")
            if isinstance(w.get("pid"), int) and w["pid"] in view.processes:
                methods |= set(view.processes[w["pid"]].seen_by)
        rows = ev.get("sockets") if isinstance(ev.get("sockets"), list) else ([ev] if "proto" in ev else [])
        if rows:
            d["sockets"] = [scrub(_socket_text({k: r.get(k) for k in SOCKET_KEYS if k in r}), host_strings)
                            for r in rows[:20] if isinstance(r, dict)]
            if len(rows) > 20:
                d["sockets"].append(f"… and {len(rows) - 20} more")
        if isinstance(ev.get("port"), int):
            d["port"] = ev["port"]
        if isinstance(ev.get("hosts"), list):
            d["hosts"] = len(ev["hosts"])
        details.append(d)
    return CodeItem(f.kind, f.severity, scrub(f.title, host_strings), details,
                    sorted(methods, key=lambda m: order.get(m, len(order))))


def _vuln_item(f: Finding) -> VulnItem:
    ev = f.evidence[0]
    return VulnItem(ev["package"], ev["versions"], f.kind in (RUNNING, VULNERABLE_SCRIPT), ev.get("fixed_version"),
                    ev["cves"], [{"pid": p["pid"], "comm": p.get("comm", "")} for p in ev.get("processes", [])],
                    f"{', '.join(ev.get('methods', [])) or '?'} ({ev.get('verdict', '?')})")


def _interpreters(view: ScanView) -> list[dict[str, Any]]:
    """Return what each interpreter process runs (guest paths and names, nothing of the host)."""
    out = []
    for pid, p in sorted(view.processes.items()):
        i = p.interpreter
        if i:
            out.append({"pid": pid, "comm": p.comm, "runtime": i.get("runtime", ""), "entry": i.get("entry", ""),
                        "now": list(i.get("now", []))[:3], "packages": list(i.get("packages", [])),
                        "unknown": list(i.get("unknown", [])), "files": dict(i.get("files", {}))})
    return out


def build_report(vm: str, view: ScanView, observations: list[Observation], *, scan_id: int | None = None,
                 scanned_at: float | None = None, vulns: VulnDB | None = None, ram_path: Path | None = None,
                 host_strings: tuple[str, ...] = (), owner: Owner | None = None) -> Report:
    """Build the report of one VM's scan: vulnerable software, suspicious code, what is unverified.

    `owner` maps a guest path to its binary package (default: the code-page DB's files)."""
    report = Report(vm, scan_id, scanned_at or time.time(), list(view.methods), status=scan_status(observations))
    unverified = _grouped([{"what": scrub(u["what"], host_strings), "method": u["method"],
                            "reason": scrub(u["reason"], host_strings)} for u in view.unverifiable])
    findings = list(view.findings)
    db = vulns or VulnDB.open()
    index = db.index()
    if not index.sources():
        unverified.append({"what": "vulnerabilities", "method": "knowledge",
                           "reason": "the vulnerability knowledge is empty; known CVEs were not checked"})
    installed = installed_from(observations)
    if not installed:
        unverified.append({"what": "installed packages", "method": "agent",
                           "reason": "no package list was obtained (the agent method did not run or failed)"})
    findings += vulnerable_findings(view, installed, index, vm, sources=db.binaries(),
                                    paths=mapped_paths(observations), owner=owner or kb_owner(),
                                    observations=observations)
    interpreters = [o.payload for o in observations if isinstance(o.payload, Interpreter)]
    findings += [f for f in script_findings(interpreters, vm, index) if f.kind == VULNERABLE_SCRIPT]
    report.interpreters = _interpreters(view)
    regions = regions_from(observations)
    if regions and ram_path is not None:
        findings += _malware(vm, ram_path, regions, unverified)
    elif regions:
        unverified.append({"what": f"{len(regions)} unknown code region(s)", "method": "yara",
                           "reason": "guest memory was not available to scan them for known-bad code"})
    pids_of_root = pids_by_root(observations)
    findings = [f for f in findings if f.kind not in CODE_KINDS] + dedupe(
        [f for f in findings if f.kind in CODE_KINDS], pids_of_root)  # one finding per fact, all methods
    report.findings = findings
    for f in sorted(findings, key=lambda f: SEVERITY_ORDER.get(f.severity, 9)):
        if f.kind in (RUNNING, "installed-vulnerable", VULNERABLE_SCRIPT):
            report.vulnerable.append(_vuln_item(f))
        elif f.kind in CODE_KINDS:
            report.code.append(_code_item(f, view, pids_of_root))
        elif f.kind in NETWORK_KINDS:
            report.behaviour.append(_behaviour_item(f, view, host_strings))
    report.vulnerable.sort(key=lambda v: (not v.running, v.package))
    if not any(m in view.methods for m in ("arch", "inspect", "checkpoint")):
        unverified.append({"what": "running code", "method": "-", "reason": "only the guest's own account "
                           "was available; processes and packages are as the guest reports them"})
    report.unverified = unverified
    report.summary = {"running_vulnerable": sum(v.running for v in report.vulnerable),
                      "installed_vulnerable": sum(not v.running for v in report.vulnerable),
                      "cves": len({c["cve"] for v in report.vulnerable for c in v.cves}),
                      "suspicious_code": len(report.code), "network_behaviour": len(report.behaviour),
                      "unverified": len(unverified)}
    return report


def kb_owner() -> Owner | None:
    """Return a path -> binary package lookup from the code-page DB, or None when there is none."""
    from nephoscope.knowledge.binaries import CodePageDB, default_path

    if not default_path().exists():
        return None
    try:
        db = CodePageDB.open()
        owners = {}
        for _id, path, package, _v in db.find_files():
            owners[path] = package
            if path.startswith(("/bin/", "/sbin/", "/lib/", "/lib64/")):  # merged /usr in the guest
                owners["/usr" + path] = package
        db.close()
    except NephoscopeError:
        return None
    return owners.get


def _malware(vm: str, ram_path: Path, regions: list, unverified: list[dict[str, str]]) -> list[Finding]:
    from nephoscope.knowledge.yara_rules import RuleSet, load_hashes
    from nephoscope.memory.physical import open_memory

    try:
        with open_memory(ram_path) as phys:
            scan = scan_regions(phys, regions, RuleSet(), load_hashes(), vm)
    except NephoscopeError as exc:
        unverified.append({"what": "unknown code regions", "method": "yara",
                           "reason": scrub(str(exc), (str(ram_path),))})
        return []
    unverified += [{"what": u["what"], "method": "yara", "reason": u["reason"]} for u in scan.unreadable]
    return scan.findings


def report_from_result(result: Any, vulns: VulnDB | None = None) -> Report:
    """Build the report from a finished `ScanResult`."""
    target = result.vm
    host = tuple(str(p) for p in (target.ram_path, target.qmp_socket, target.qga_socket) if p)
    return build_report(target.name, result.view, result.observations, scan_id=result.scan_id, vulns=vulns,
                        ram_path=target.ram_path if target.ram_path and Path(target.ram_path).exists() else None,
                        host_strings=host)


def latest_report(vm: str, vulns: VulnDB | None = None) -> Report:
    """Build the report from the latest stored scan of `vm`, scanning its RAM when it is a running lab guest."""
    from nephoscope.lab import runner
    from nephoscope.store.sqlite import Store

    guest = runner.load_guest(vm)
    ram = guest.ram_path if guest is not None and guest.alive() else None
    return report_from_store(vm, Store(), vulns=vulns, ram_path=ram)


def report_from_store(vm: str, store: Any, vulns: VulnDB | None = None, ram_path: Path | None = None,
                      owner: Owner | None = None) -> Report:
    """Build the report from the latest stored scan of `vm` (its observations only, merged afresh)."""
    scans = store.scans(vm, limit=1)
    if not scans:
        raise NephoscopeError(f"no stored scan of {vm!r}; run `nephoscope scan {vm}` first")
    rec = scans[0]
    observations = store.load_observations(rec.id, vm)
    view = merge(observations, rec.methods, vm)
    host = (str(ram_path),) if ram_path else ()
    return build_report(vm, view, observations, scan_id=rec.id, scanned_at=rec.started, vulns=vulns,
                        ram_path=ram_path, host_strings=host, owner=owner)
