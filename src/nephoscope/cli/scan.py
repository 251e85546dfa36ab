"""`nephoscope scan`, `diff` and `history`: run methods side by side and compare scans over time."""

from __future__ import annotations

import datetime
import os

import typer

from nephoscope.cli.render import console, emit_json, fail, progress, table
from nephoscope.core.errors import NephoscopeError
from nephoscope.service.methods import available_methods
from nephoscope.service.scan import ScanResult, diff_scans, run_scan
from nephoscope.service.targets import resolve_target
from nephoscope.store.sqlite import Store


def _code_summary(exe: str, binaries: list[dict]) -> str:
    """Return the main binary's package and version first, then how many libraries and unknown regions."""
    base = os.path.basename(exe.removesuffix(" (deleted)"))
    known = [b for b in binaries if b.get("status") != "unknown"]
    main = next((b for b in known if os.path.basename(b.get("path") or "") == base), None)
    programs = [b for b in known if ".so" not in os.path.basename(b.get("path") or "")]
    if main is None and programs:  # renamed, deleted or memfd copies: the one non-library image
        main = max(programs, key=lambda b: (b.get("gva_end") or 0) - (b.get("gva_start") or 0))
    parts = []
    if main is not None:
        flag = " MODIFIED" if main.get("status") == "modified" else ""
        parts.append(f"{main.get('package') or '?'} {','.join(main.get('versions', []))}{flag}")
    others = len({(b.get("path"), b.get("package")) for b in known if b is not main})
    if others:
        parts.append(f"+{others} libs")
    unknown = sum(1 for b in binaries if b.get("status") == "unknown")
    if unknown:
        parts.append(f"{unknown} UNKNOWN region(s)")
    modified = [b for b in known if b is not main and b.get("status") == "modified"]
    if modified:
        parts.append(f"{len(modified)} modified")
    return "; ".join(parts)


def render_scan(result: ScanResult) -> None:
    """Print a scan for people: processes with who saw them, findings, and what is unverifiable."""
    rows = []
    for p in sorted(result.view.processes.values(), key=lambda p: p.pid):
        seen = " ".join(f"{m}:{v[0]}" for m, v in sorted(p.seen_by.items()))
        rows.append([p.pid, p.comm, p.exe, seen, _code_summary(p.exe, p.binaries), p.verdict])
    table(f"{result.vm.name}: processes (methods: {', '.join(result.view.methods)}; v=verified r=reported)",
          ["pid", "comm", "exe", "seen by", "identified code", "verdict"], rows)
    if result.view.binaries:
        table("binaries", ["path", "package", "versions", "status", "methods", "pids"],
              [[b.path, b.package, ",".join(b.versions), b.status, ",".join(sorted(b.seen_by)),
                ",".join(map(str, sorted(b.pids)))] for b in result.view.binaries.values()])
    severity = {"critical": 0, "high": 1, "medium": 2, "low": 3}
    ranked = sorted(result.view.findings, key=lambda f: severity.get(f.severity, 9))
    table("findings", ["severity", "kind", "what"], [[f.severity, f.kind, f.title] for f in ranked])
    if result.view.unverifiable:
        groups: dict[tuple[str, str], list[str]] = {}
        for u in result.view.unverifiable:
            groups.setdefault((u["method"], u["reason"]), []).append(u["what"])
        table("unverifiable (could not be obtained)", ["method", "what", "why"],
              [[m, whats[0] + (f" (+{len(whats) - 1} more)" if len(whats) > 1 else ""), why]
               for (m, why), whats in groups.items()])
    console.print("timings: " + ", ".join(f"{m} {t['wall_s']:.2f}s" for m, t in result.timings.items())
                  + (f"; stored as scan {result.scan_id}" if result.scan_id else ""))


def scan(
    vm: str = typer.Argument(..., help="lab guest name, QMP socket path, or RAM/dump file"),
    methods: str = typer.Option("", "--methods", "-m",
                                help=f"comma-separated subset of: {','.join(available_methods())}"),
    json_out: bool = typer.Option(False, "--json", help="print the merged result as JSON"),
    no_store: bool = typer.Option(False, "--no-store", help="do not record the scan in the store"),
    rollback: bool = typer.Option(False, "--rollback",
                                  help="checkpoint also runs the agent inside a throw-away clone of the VM"),
) -> None:
    """Run introspection methods on a VM, merge per process and binary, report findings and verdicts."""
    try:
        target = resolve_target(vm)
        chosen = [m.strip() for m in methods.split(",") if m.strip()] or None
        with progress(f"scan {target.name}", quiet=json_out) as log:
            options = {"checkpoint": {"rollback": True}} if rollback else None
            result = run_scan(target, chosen, store=None if no_store else Store(), options=options, progress=log)
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json(result.to_dict())
    else:
        render_scan(result)


def history(vm: str = typer.Argument(None, help="only this VM"),
            json_out: bool = typer.Option(False, "--json")) -> None:
    """List stored scans, newest first."""
    scans = Store().scans(vm)
    if json_out:
        emit_json([{"id": s.id, "vm": s.vm, "started": s.started, "finished": s.finished, "methods": s.methods,
                    "summary": s.summary} for s in scans])
        return
    table("scans", ["id", "vm", "when", "methods", "processes", "findings"],
          [[s.id, s.vm, datetime.datetime.fromtimestamp(s.started).isoformat(timespec="seconds"),
            ",".join(s.methods), s.summary.get("processes"), s.summary.get("findings")] for s in scans])


def diff(vm: str = typer.Argument(..., help="VM name as stored"),
         old: int = typer.Option(None, "--old", help="older scan id (default: the one before --new)"),
         new: int = typer.Option(None, "--new", help="newer scan id (default: the latest)"),
         json_out: bool = typer.Option(False, "--json")) -> None:
    """Show what changed between two scans of a VM (default: the last two)."""
    store = Store()
    try:
        scans = store.scans(vm, limit=1000)
        ids = [s.id for s in scans]
        new_id = new or (ids[0] if ids else None)
        if new_id is None or (old is None and len([i for i in ids if i < new_id]) == 0):
            raise NephoscopeError(f"need two scans of {vm!r} to diff; run `nephoscope scan {vm}` again")
        old_id = old or max(i for i in ids if i < new_id)
        result = diff_scans(store, old_id, new_id)
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json(result)
        return
    rows = [["+ process", f"{p.get('pid')} {p.get('comm')} {p.get('exe')}"] for p in result["processes_started"]]
    rows += [["- process", f"{p.get('pid')} {p.get('comm')} {p.get('exe')}"] for p in result["processes_gone"]]
    rows += [["+ binary", b] for b in result["binaries_new"]] + [["- binary", b] for b in result["binaries_gone"]]
    rows += [["+ finding", f] for f in result["findings_new"]]
    rows += [["- finding", f] for f in result["findings_resolved"]]
    table(f"{vm}: scan {old_id} → {new_id}", ["change", "what"], rows)
