"""`nephoscope scan`, `diff` and `history`: run methods side by side and compare scans over time."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.text import Text

from nephoscope.cli.render import emit_json, err_console, fail, progress, table
from nephoscope.cli.views import render_scan
from nephoscope.core.errors import NephoscopeError
from nephoscope.core.text import escape_guest
from nephoscope.service.methods import available_methods
from nephoscope.service.scan import SEVERITIES, UNVERIFIABLE, HostScan, ScanResult, diff_latest, scan_all, scan_vm
from nephoscope.service.scan import history as stored_scans

if TYPE_CHECKING:
    from nephoscope.service.gate import Gate

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
                                     f"{', '.join(SEVERITIES)}; every finding counts: the scan's, vulnerable "
                                     "packages (CVEs) and YARA/known-bad code as `report` finds them (default: "
                                     "findings do not change the exit status)"),
    symbols: Path | None = typer.Option(None, "--symbols", metavar="FILE",
                                        help="the kernel's types/symbols for inspect when RAM lacks them: a Volatility "
                                             "3 ISF, a vmlinux (BTF or DWARF) or a System.map"),
    sync_kb: bool = typer.Option(False, "--sync-kb", help="first fill the KB with every version of the packages "
                                 "that ship the files the VM maps (`kb sync`), then scan with it"),
    notify: bool = typer.Option(False, "--notify", help="then notify the VM's tenant if its state changed "
                                "(`nephoscope notices`; needs a tenants file); with --all each VM's, right "
                                "after its scan"),
) -> None:
    """Run introspection methods on a VM, merge per process and binary, report findings and verdicts.

    Exit status:
    0 scanned; no finding at or above --fail-on
    1 a finding at or above --fail-on (the scan's, CVEs of running or installed packages, YARA matches)
    2 usage error
    3 nothing could be verified: every method unverifiable (stored flagged "unverifiable")
    4 the scan could not run (no such VM, store cannot be opened), or --fail-on could not be checked
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
        raise SystemExit(_scan_all(chosen, json_out, not no_store, fail_on, notify))
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
    after = _follow_up(result, fail_on, _Tenants() if notify else None)
    if json_out:
        emit_json({**result.to_dict(), **after.to_dict()})
    else:
        render_scan(result)
    if after.notice is not None:
        err_console.print(Text(f"notices: {result.vm.name}: {after.notice_text()}"), soft_wrap=True)
    code = after.exit_code(result)
    if code == EXIT_UNVERIFIABLE:
        err_console.print(Text(f"{result.vm.name}: nothing could be verified; every method was unverifiable "
                               f"(exit status {EXIT_UNVERIFIABLE})"), style="bold")
    else:
        _say_gate(result.vm.name, after)
    if code != EXIT_OK:
        raise SystemExit(code)


WORST = (EXIT_OK, EXIT_FINDINGS, EXIT_UNVERIFIABLE, EXIT_ERROR)  # later is worse (docs/methods.md, Exit codes)
SHOWN = 20  # findings listed per VM in the --fail-on message; the rest are counted (`nephoscope report VM`)


class _Tenants:
    """The tenants file, read once for a whole `scan --notify` (None: notices not configured; or why not)."""

    def __init__(self) -> None:
        from nephoscope.response.tenants import find_tenants

        self.tenants: Any = None
        self.error: str | None = None
        try:
            self.tenants = find_tenants()
        except NephoscopeError as exc:
            self.error = f"tenants file: {exc}"


@dataclass(slots=True)
class FollowUp:
    """What came after one VM's scan: its --fail-on gate and its --notify notice (each None when not asked)."""

    gate: Gate | None = None
    gate_error: str | None = None  # the gate could not be evaluated: not a pass
    notice: dict[str, Any] | None = None

    def exit_code(self, result: ScanResult | None) -> int:
        """Return this VM's exit status (docs/methods.md, Exit codes)."""
        if result is not None and result.status == UNVERIFIABLE:
            return EXIT_UNVERIFIABLE
        if self.gate_error is not None:
            return EXIT_ERROR
        return EXIT_FINDINGS if self.gate is not None and self.gate.failed else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON keys this adds to the VM's scan: fail_on and notice, when asked for."""
        out: dict[str, Any] = {}
        if self.gate is not None or self.gate_error is not None:
            out["fail_on"] = {**(self.gate.to_dict() if self.gate else {}), "error": self.gate_error}
        if self.notice is not None:
            out["notice"] = self.notice
        return out

    def notice_text(self) -> str:
        """Return the notice in one line: what was sent on which channel, or why nothing."""
        n = self.notice or {}
        if n.get("error"):
            return f"error: {n['error']}"
        sent = ", ".join(f"{d['channel']} {d['status']}" for d in n.get("deliveries", []))
        if sent:
            return f"tenant {n.get('tenant')}: {n['deliveries'][0]['event']} notice: {sent}"
        return f"nothing sent ({n.get('reason')})"


def _follow_up(result: ScanResult, fail_on: str | None, tenants: _Tenants | None) -> FollowUp:
    """Gate and notify one finished scan; an error in either is recorded, never raised (the sweep goes on)."""
    out = FollowUp()
    gated = fail_on is not None and result.status != UNVERIFIABLE
    if not gated and tenants is None:
        return out
    try:
        from nephoscope.service.gate import gate_report
        from nephoscope.service.report import report_from_result

        report = report_from_result(result)
    except Exception as exc:  # one VM's report must not stop the others' notices: said, and never a pass
        why = f"the report could not be built: {_why(exc)}"
        out.gate_error = why if gated else None
        out.notice = {"error": why} if tenants is not None else None
        return out
    if gated:
        assert fail_on is not None
        out.gate = gate_report(report, fail_on)
    if tenants is not None:
        out.notice = _notify(report, tenants)
    return out


def _why(exc: Exception) -> str:
    """Return an error for people: a NephoscopeError's message, else the exception's type too (a bug to report)."""
    return str(exc) if isinstance(exc, NephoscopeError) else f"{type(exc).__name__}: {exc}"


def _notify(report: Any, tenants: _Tenants) -> dict[str, Any]:
    """Notify the report's VM's tenant unless told this state already; return what happened (errors as data)."""
    if tenants.error is not None:
        return {"vm": report.vm, "tenant": None, "deliveries": [], "reason": "", "error": tenants.error}
    if tenants.tenants is None:
        return {"vm": report.vm, "tenant": None, "deliveries": [], "error": None,
                "reason": "no tenants file: notices are not configured (docs/notices.md)"}
    from nephoscope.service.notices import notify_report
    from nephoscope.store.sqlite import Store

    try:
        outcome = notify_report(report, Store(), tenants.tenants)
    except Exception as exc:  # one VM's notice must not stop the others' (scan --all)
        return {"vm": report.vm, "tenant": None, "deliveries": [], "reason": "", "error": _why(exc)}
    return {**outcome.to_dict(), "error": None}


def _gate_lines(vm: str, after: FollowUp) -> list[str]:
    """Return the --fail-on message of one VM: the findings that caused exit 1, or why it could not be checked."""
    gate = after.gate
    if after.gate_error is not None:
        return [f"{vm}: --fail-on could not be checked: {after.gate_error} (exit status {EXIT_ERROR})"]
    if gate is None:
        return []
    lines = []
    if gate.failed:
        lines.append(f"{vm}: {len(gate.findings)} finding(s) at or above {gate.severity} "
                     f"(exit status {EXIT_FINDINGS}):")
        lines += [f"  {f.severity:<8} {f.kind}: {escape_guest(f.title, 300)}" for f in gate.findings[:SHOWN]]
        if len(gate.findings) > SHOWN:
            lines.append(f"  ... and {len(gate.findings) - SHOWN} more (nephoscope report {vm})")
    lines += [f"{vm}: not checked for --fail-on: {u['what']} ({u['method']}: {u['reason']})" for u in gate.unchecked]
    return lines


def _say_gate(vm: str, after: FollowUp) -> None:
    for line in _gate_lines(vm, after):
        err_console.print(Text(line), highlight=False, soft_wrap=True)  # one finding a line, for CI logs


def _scan_all(methods: list[str] | None, json_out: bool, save: bool, fail_on: str | None, notify: bool = False
              ) -> int:
    """Scan every VM on the host; gate and notify each right after its scan; render each; return the worst exit."""
    tenants = _Tenants() if notify else None
    follow: list[FollowUp] = []

    def after(s: HostScan) -> None:
        follow.append(_follow_up(s.result, fail_on, tenants) if s.result is not None else FollowUp())

    try:
        with progress("scan --all", quiet=json_out) as log:
            scans, skipped = scan_all(methods, save=save, progress=log, after=after)
    except NephoscopeError as exc:
        err_console.print(Text(f"error: {exc}"), style="bold red")
        return EXIT_ERROR
    codes = []
    rows = []
    for s, up in zip(scans, follow, strict=True):
        if s.result is None:
            code = EXIT_OK if s.error and s.error.startswith("not running") else EXIT_ERROR
            row = [s.name, s.kind, "error" if code else "skipped", s.error or ""]
        else:
            code = up.exit_code(s.result)
            summary = s.result.view.summary()
            what = f"{summary.get('processes')} processes, {summary.get('findings')} findings"
            if up.gate is not None:
                what += f"; {len(up.gate.findings)} at or above {fail_on}"
            elif up.gate_error is not None:
                what += "; --fail-on not checked"
            row = [s.name, s.kind, s.result.status, what]
            if not json_out:
                render_scan(s.result)
        rows.append([*row, *([up.notice_text() if up.notice is not None else "-"] if notify else []), code])
        codes.append(code)
    worst = max(codes, key=WORST.index, default=EXIT_OK)
    if json_out:
        emit_json({"vms": [{**s.to_dict(), **up.to_dict()} for s, up in zip(scans, follow, strict=True)],
                   "skipped": skipped, "exit": worst})
    else:
        table(f"scan --all: {len(scans)} VMs, exit status {worst}",
              ["vm", "kind", "status", "what", *(["notice"] if notify else []), "exit"], rows)
        for source, why in skipped.items():
            err_console.print(Text(f"{source} skipped: {why}"), style="yellow")
        for s, up in zip(scans, follow, strict=True):
            if s.result is not None and s.result.status != UNVERIFIABLE:
                _say_gate(s.name, up)
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
