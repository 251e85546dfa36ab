"""`nephoscope scan`, `diff` and `history`: run methods side by side and compare scans over time."""

from __future__ import annotations

import datetime
from pathlib import Path

import typer
from rich.text import Text

from nephoscope.cli.render import emit_json, err_console, fail, progress, table
from nephoscope.cli.views import render_scan
from nephoscope.core.errors import NephoscopeError
from nephoscope.service.methods import available_methods
from nephoscope.service.scan import SEVERITIES, UNVERIFIABLE, ScanResult, diff_latest, scan_all, scan_vm
from nephoscope.service.scan import history as stored_scans

# exit codes of `nephoscope scan` (docs/methods.md, "Exit codes"); 2 is click's usage error
EXIT_OK = 0
EXIT_FINDINGS = 1  # a finding at or above --fail-on
EXIT_USAGE = 2
EXIT_UNVERIFIABLE = 3  # no method obtained anything: not a clean result
EXIT_ERROR = 4  # the scan could not run (no such VM, store cannot be opened, ...)


def scan(
    vm: str = typer.Argument(None, help="libvirt domain (name or UUID), pid:N, lab guest, QMP socket or RAM/dump file"),
    all_vms: bool = typer.Option(False, "--all", help="scan every VM on this host (`nephoscope vms`)"),
    methods: str = typer.Option("", "--methods", "-m",
                                help=f"comma-separated subset of: {','.join(available_methods())}"),
    json_out: bool = typer.Option(False, "--json", help="print the merged result as JSON"),
    no_store: bool = typer.Option(False, "--no-store", help="do not record the scan in the store"),
    rollback: bool = typer.Option(False, "--rollback",
                                  help="checkpoint also runs the agent inside a throw-away clone of the VM"),
    fail_on: str = typer.Option(None, "--fail-on", metavar="SEVERITY",
                                help=f"exit {EXIT_FINDINGS} when a finding is this severe or worse: "
                                     f"{', '.join(SEVERITIES)} (default: findings do not change the exit status)"),
    symbols: Path | None = typer.Option(None, "--symbols", metavar="FILE",
                                        help="the kernel's types/symbols for inspect when RAM lacks them: a Volatility "
                                             "3 ISF, a vmlinux (BTF or DWARF) or a System.map"),
    sync_kb: bool = typer.Option(False, "--sync-kb", help="first fill the KB with every version of the packages "
                                 "that ship the files the VM maps (`kb sync`), then scan with it"),
    notify: bool = typer.Option(False, "--notify", help="then notify the VM's tenant if its state changed "
                                "(`nephoscope notices`; needs a tenants file)"),
) -> None:
    """Run introspection methods on a VM, merge per process and binary, report findings and verdicts.

    Exit status:
    0 scanned; no finding at or above --fail-on
    1 a finding at or above --fail-on
    2 usage error
    3 nothing could be verified: every method unverifiable (stored flagged "unverifiable")
    4 the scan could not run (no such VM, store cannot be opened)
    With --all: the worst of every VM's status (4, then 3, then 1, then 0); shut-off VMs do not count."""
    if all_vms == (vm is not None):
        raise typer.BadParameter("name one VM or give --all", param_hint="VM")
    if fail_on is not None and fail_on not in SEVERITIES:
        raise typer.BadParameter(f"{fail_on!r} is not a severity; use one of {', '.join(SEVERITIES)}",
                                 param_hint="--fail-on")
    chosen = [m.strip() for m in methods.split(",") if m.strip()] or None
    unknown = [m for m in chosen or [] if m not in available_methods()]
    if unknown:
        raise typer.BadParameter(f"unknown method(s) {', '.join(unknown)}; use some of "
                                 f"{', '.join(available_methods())}", param_hint="--methods")
    if all_vms and sync_kb:
        raise typer.BadParameter("--sync-kb scans one VM; name it instead of --all", param_hint="--sync-kb")
    if all_vms:
        raise SystemExit(_scan_all(chosen, json_out, not no_store, fail_on))
    try:
        with progress(f"scan {vm}", quiet=json_out) as log:
            if sync_kb:
                from nephoscope.service.kbsync import sync_and_rescan

                _first, report, result = sync_and_rescan(vm, chosen, 4, log, save=not no_store, symbols=symbols)
                log(f"kb sync: {len(report.packages)} packages, {report.ingest.pages_added} pages added")
            else:
                result = scan_vm(vm, chosen, save=not no_store, rollback=rollback, symbols=symbols,
                                 progress=log)
    except NephoscopeError as exc:
        err_console.print(Text(f"error: {exc}"), style="bold red")
        raise SystemExit(EXIT_ERROR) from None
    if json_out:
        emit_json(result.to_dict())
    else:
        render_scan(result)
    if notify:
        from nephoscope.cli.notices import after_scan
        after_scan(result)
    if result.status == UNVERIFIABLE:
        err_console.print(Text(f"{result.vm.name}: nothing could be verified; every method was unverifiable "
                               f"(exit status {EXIT_UNVERIFIABLE})"), style="bold")
        raise SystemExit(EXIT_UNVERIFIABLE)
    worst = result.findings_at_or_above(fail_on) if fail_on else []
    if worst:
        err_console.print(Text(f"{len(worst)} finding(s) at or above {fail_on} (exit status {EXIT_FINDINGS})"))
        raise SystemExit(EXIT_FINDINGS)


def _exit_of(result: ScanResult, fail_on: str | None) -> int:
    if result.status == UNVERIFIABLE:
        return EXIT_UNVERIFIABLE
    return EXIT_FINDINGS if fail_on and result.findings_at_or_above(fail_on) else EXIT_OK


WORST = (EXIT_OK, EXIT_FINDINGS, EXIT_UNVERIFIABLE, EXIT_ERROR)  # later is worse (docs/methods.md, Exit codes)


def _scan_all(methods: list[str] | None, json_out: bool, save: bool, fail_on: str | None) -> int:
    """Scan every VM on the host; render each; return the worst exit status of them."""
    try:
        with progress("scan --all", quiet=json_out) as log:
            scans, skipped = scan_all(methods, save=save, progress=log)
    except NephoscopeError as exc:
        err_console.print(Text(f"error: {exc}"), style="bold red")
        return EXIT_ERROR
    codes = []
    rows = []
    for s in scans:
        if s.result is None:
            code = EXIT_OK if s.error and s.error.startswith("not running") else EXIT_ERROR
            rows.append([s.name, s.kind, "error" if code else "skipped", s.error or "", code])
        else:
            code = _exit_of(s.result, fail_on)
            summary = s.result.view.summary()
            rows.append([s.name, s.kind, s.result.status, f"{summary.get('processes')} processes, "
                         f"{summary.get('findings')} findings", code])
            if not json_out:
                render_scan(s.result)
        codes.append(code)
    worst = max(codes, key=WORST.index, default=EXIT_OK)
    if json_out:
        emit_json({"vms": [s.to_dict() for s in scans], "skipped": skipped, "exit": worst})
    else:
        table(f"scan --all: {len(scans)} VMs, exit status {worst}", ["vm", "kind", "status", "what", "exit"], rows)
        for source, why in skipped.items():
            err_console.print(Text(f"{source} skipped: {why}"), style="yellow")
    return worst


def history(vm: str = typer.Argument(None, help="only this VM"),
            json_out: bool = typer.Option(False, "--json")) -> None:
    """List stored scans, newest first."""
    scans = stored_scans(vm)
    if json_out:
        emit_json([{"id": s.id, "vm": s.vm, "started": s.started, "finished": s.finished, "methods": s.methods,
                    "summary": s.summary} for s in scans])
        return
    table("scans", ["id", "vm", "when", "methods", "status", "processes", "findings"],
          [[s.id, s.vm, datetime.datetime.fromtimestamp(s.started).isoformat(timespec="seconds"),
            ",".join(s.methods), s.summary.get("status", "ok"), s.summary.get("processes"), s.summary.get("findings")]
           for s in scans])


def diff(vm: str = typer.Argument(..., help="VM name as stored"),
         old: int = typer.Option(None, "--old", help="older scan id (default: the one before --new)"),
         new: int = typer.Option(None, "--new", help="newer scan id (default: the latest)"),
         json_out: bool = typer.Option(False, "--json")) -> None:
    """Show what changed between two scans of a VM (default: the last two that obtained anything)."""
    try:
        result = diff_latest(vm, old, new)
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
    table(f"{vm}: scan {result['old']} → {result['new']}", ["change", "what"], rows)
