"""Terminal views shared by several commands: a scan, and the customer report, for people.

Rendering only: every decision (which binary is the main one, which findings are one fact) is made in
`analysis`/`service`. Every guest string is printed as inert text (no markup, control chars escaped).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from nephoscope.cli.render import console, table
from nephoscope.core.text import escape_guest

if TYPE_CHECKING:
    from nephoscope.analysis.code import CodeSummary
    from nephoscope.service.report import CodeItem, Report
    from nephoscope.service.scan import ScanResult

SEVERITY_STYLE = {"critical": "bold", "high": "bold", "medium": "", "low": "dim"}


def safe(value: Any, style: str = "") -> Text:
    """Return `value` as inert terminal text: no markup, control characters and escapes shown escaped."""
    return Text(escape_guest("" if value is None else str(value)), style=style)


def code_summary_text(summary: CodeSummary) -> str:
    """Return a code summary in one line: main package and version first, then libraries, unknown code."""
    parts = []
    if summary.main is not None:
        flag = " MODIFIED" if summary.main.modified else ""
        parts.append(f"{summary.main.package or '?'} {','.join(summary.main.versions)}{flag}")
    if summary.libraries:
        parts.append(f"+{summary.libraries} libs")
    if summary.unknown_regions:
        parts.append(f"{summary.unknown_regions} UNKNOWN region(s)")
    if summary.modified_libraries:
        parts.append(f"{summary.modified_libraries} modified")
    return "; ".join(parts)


def render_scan(result: ScanResult) -> None:
    """Print a scan for people: processes with who saw them, findings, and what is unverifiable."""
    code = result.code()
    rows = []
    for p in sorted(result.view.processes.values(), key=lambda p: p.pid):
        seen = " ".join(f"{m}:{v[0]}" for m, v in sorted(p.seen_by.items()))
        rows.append([p.pid, p.comm, p.exe, seen, code_summary_text(code[p.pid]), p.verdict])
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
    if result.status != "ok":
        console.print(Text("nothing could be verified: every method came back unverifiable", style="bold"))
    console.print("timings: " + ", ".join(f"{m} {t['wall_s']:.2f}s" for m, t in result.timings.items())
                  + (f"; stored as scan {result.scan_id}" if result.scan_id else ""))


def _table(title: str, columns: Sequence[str]) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    return t



def _print_items(out: Console, items: Sequence[CodeItem]) -> None:
    """Print report items (code or network behaviour): severity, kind, title, who saw it, then each detail."""
    from nephoscope.service.report_render import detail_text

    for c in items:
        line = safe(f"{c.severity.upper():<8} ", SEVERITY_STYLE.get(c.severity, ""))
        line.append_text(safe(f"{c.kind}: {c.title}"))
        if c.methods:
            line.append_text(safe(f"  (seen by {', '.join(c.methods)})", "dim"))
        out.print(line)
        for d in c.details:
            out.print(Padding(safe(f"- {detail_text(d)}", "dim"), (0, 0, 0, 4)))


def render_report(report: Report, out: Console | None = None) -> None:
    """Print the customer report for a terminal: headings and tables, every guest string inert."""
    from nephoscope.service.report_render import NOTHING_VERIFIED

    out = out or console
    s = report.summary
    when = datetime.datetime.fromtimestamp(report.scanned_at, datetime.UTC).isoformat(timespec="seconds")
    out.rule(safe(f"Security report for {report.vm}", "bold"))
    out.print(safe(f"Scanned {when} with methods: {', '.join(report.methods)}."))
    if report.status == "unverifiable":
        out.print(Text(NOTHING_VERIFIED, style="bold"))
    out.print(safe(f"{s.get('running_vulnerable', 0)} vulnerable package(s) running, "
                   f"{s.get('installed_vulnerable', 0)} installed but not seen running, {s.get('cves', 0)} distinct "
                   f"CVEs; {s.get('suspicious_code', 0)} suspicious code finding(s)."))
    if report.vulnerable:
        vt = _table("Vulnerable software", ["state", "package", "version", "update to", "processes", "CVEs",
                                            "evidence"])
        for v in report.vulnerable:
            procs = ", ".join(f"{p['pid']} ({p['comm']})" for p in v.processes) or "-"
            vt.add_row(safe("RUNNING" if v.running else "installed", "bold" if v.running else ""), safe(v.package),
                       safe(" or ".join(v.versions)), safe(v.fixed_version or "no fix yet"), safe(procs),
                       safe(", ".join(c["cve"] for c in v.cves)), safe(v.evidence))
        out.print(vt)
    else:
        out.print(Text("Vulnerable software: no known vulnerable package versions found."))
    out.print()
    out.print(Text("Malicious, unknown or suspicious code", style="bold"))
    _print_items(out, report.code)
    if not report.code:
        out.print(Text("  nothing found by the methods that ran."))
    if report.behaviour:
        out.print()
        out.print(Text("Network behaviour", style="bold"))
        _print_items(out, report.behaviour)
    out.print()
    ut = _table("What could not be verified", ["what", "method", "why"])
    for u in report.unverified:
        ut.add_row(safe(u["what"]), safe(u["method"]), safe(u["reason"]))
    out.print(ut if report.unverified else Text("What could not be verified: nothing."))
