"""`nephoscope scripts VM`: what every interpreter process runs (entry script, stacks, script files)."""

from __future__ import annotations

from pathlib import Path

import typer

from nephoscope.cli.render import console, emit_json, fail, table
from nephoscope.core.errors import NephoscopeError
from nephoscope.core.text import escape_guest
from nephoscope.service.targets import resolve_target

VM_ARG = typer.Argument(..., help="lab guest name, QMP socket path, or RAM/dump file (raw, QEMU ELF, LiME)")


def scripts(vm: str = VM_ARG, json_out: bool = typer.Option(False, "--json", help="print JSON"),
            stacks: bool = typer.Option(False, "--stacks", help="print every thread's frames"),
            files: bool = typer.Option(False, "--files", help="list every loaded script file and its identity"),
            ingest: list[str] = typer.Option([], "--ingest", metavar="PKG=VERSION",
                                             help="hash this package's script files into the script DB first"),
            no_pause: bool = typer.Option(False, "--no-pause", help="read without pausing the VM (stacks may "
                                                                    "be torn while it runs)"),
            db_path: Path | None = typer.Option(None, "--db", help="the KB holding the script hashes "
                                                                   "(default: the code-page KB)")
            ) -> None:
    """List what every interpreter process runs: entry script, stacks and script files, identified by hash."""
    from nephoscope.knowledge.scripts import ScriptDB, ingest_package
    from nephoscope.service.scripts import scripts_report

    try:
        with ScriptDB(db_path) as db:
            for spec in ingest:
                name, _, version = spec.partition("=")
                if not version:
                    raise NephoscopeError(f"--ingest wants PKG=VERSION, not {spec!r}")
                ingest_package(db, name, version)
            vulns = _vulns()
            report = scripts_report(resolve_target(vm), db=db, vulns=vulns, pause=not no_pause)
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json(report.to_dict())
        return
    rows = []
    for p in report.processes:
        r = p.result
        known = sum(1 for f in p.files if f.status == "known")
        unknown = sum(1 for f in p.files if f.status in ("unknown", "modified"))
        unver = sum(1 for f in p.files if f.status == "unverifiable")
        top = r.threads[-1].frames[0] if r.threads and r.threads[-1].frames else None
        rows.append([r.pid, r.comm, r.runtime, r.entry, f"{top.function} ({top.file}:{top.line})" if top else "",
                     len(r.threads), f"{known} known / {unknown} unknown / {unver} unverifiable", str(r.verdict)])
    table(f"{vm}: interpreter processes ({len(rows)})",
          ["pid", "comm", "interpreter", "entry", "main thread now", "threads", "script files", "verdict"], rows)
    from rich.text import Text

    for p in report.processes:
        if p.result.reason and str(p.result.verdict) != "verified":
            console.print(Text(f"pid {p.result.pid}: {escape_guest(p.result.reason)}", style="yellow"))
        if stacks:
            for th in p.result.threads:
                console.print(Text(f"pid {p.result.pid} thread {th.native_id}:"))
                for f in th.frames:
                    console.print(Text(f"    {escape_guest(f.function)} ({escape_guest(f.file)}:{f.line})"))
        if files:
            for f in p.files:
                console.print(Text(f"  pid {p.result.pid} {escape_guest(f.path)}: {f.label or f.reason}"))
                for line in f.head:  # escaped already: first lines, or a jar's manifest attributes
                    console.print(Text(f"      | {line}"))
    for finding in report.findings:
        console.print(Text(f"[{finding.severity}] {finding.kind}: {finding.title}"))
        for line in finding.evidence[0].get("head", []):
            console.print(Text(f"    | {line}"))
    console.print(Text(f"read in {report.timings['read_s']}s" + (" (VM paused)" if report.paused else "")))


def _vulns():  # type: ignore[no-untyped-def]
    """Return the vulnerability index when a vulnerability DB exists (else None: no CVE matching)."""
    from nephoscope.knowledge.vulns import VulnDB, default_path

    if not default_path().exists():
        return None
    db = VulnDB.open()
    try:
        return db.index()
    finally:
        db.close()
