"""Render a customer `Report` as Markdown or HTML; every guest string is escaped (guest text is hostile)."""

from __future__ import annotations

import datetime
import html
import json
import re
from typing import Any

from nephoscope.core.text import escape_guest
from nephoscope.service.report import Report

# inline markup anywhere in a line (`_` only where it can open or close emphasis: next to a non-word char;
# "(" only right after "]", where it would open a link target)
_MD_INLINE = re.compile(r"([\\`*\[\]|~]|(?<=\])\(|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z]))")
# block markup where a value starts a line or a list item's text: heading, quote, list, setext rule
_MD_BLOCK_START = re.compile(r"^(\s*)([#>+=-]|\d+(?=[.)]))")


NOTHING_VERIFIED = ("Nothing could be verified in this scan: every method came back unverifiable (reasons below). "
                    "This is not an all-clear.")


def md(value: Any, line_start: bool = False) -> str:
    """Return `value` as inert Markdown text: control chars, markup characters and HTML escaped.

    Only what Markdown would read as markup is escaped, so versions such as 1.22.1-9+deb12u9 stay as
    they are in the file; `line_start` also escapes block markers (a value that starts a list item)."""
    text = escape_guest("" if value is None else str(value), limit=1024).replace("\n", " ")
    text = _MD_INLINE.sub(r"\\\1", text)
    if line_start:
        text = _MD_BLOCK_START.sub(lambda m: m.group(1) + ("\\" + m.group(2) if not m.group(2)[0].isdigit()
                                                           else m.group(2) + "\\"), text)
    return html.escape(text, quote=False)


def h(value: Any) -> str:
    """Return `value` as inert HTML text."""
    return html.escape(escape_guest("" if value is None else str(value), limit=1024), quote=True)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


def _procs(procs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{p['pid']} ({p['comm']})" for p in procs) or "-"


def _cves(cves: list[dict[str, Any]]) -> str:
    return ", ".join(c["cve"] for c in cves)


def detail_text(detail: dict[str, Any]) -> str:
    """Return one evidence entry as `key=value, ...` (lists joined with commas), then who saw it."""
    fields = ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in detail.items()
                       if k not in ("methods", "verdict"))
    who = ", ".join(detail.get("methods", []))
    verdict = detail.get("verdict")
    seen = f"{who}: {verdict}" if who and verdict else who or verdict or ""
    return f"{fields} ({seen})" if seen else fields


def _seen(methods: list[str]) -> str:
    return f" (seen by {', '.join(methods)})" if methods else ""


def render_json(report: Report) -> str:
    """Return the report as JSON."""
    return json.dumps(report.to_dict(), indent=1, default=str)


def render_markdown(report: Report) -> str:
    """Return the report as Markdown for the VM's owner."""
    s = report.summary
    lines = [f"# Security report for {md(report.vm)}", "",
             f"Scanned {_when(report.scanned_at)} with methods: {md(', '.join(report.methods))}.", "",
             *([f"**{NOTHING_VERIFIED}**", ""] if report.status == "unverifiable" else []),
             f"**{s.get('running_vulnerable', 0)}** vulnerable package(s) running, "
             f"**{s.get('installed_vulnerable', 0)}** installed but not seen running, "
             f"**{s.get('cves', 0)}** distinct CVEs; **{s.get('suspicious_code', 0)}** suspicious code finding(s).",
             "", "## Vulnerable software", ""]
    if report.vulnerable:
        lines += ["| state | package | version | update to | processes | CVEs | evidence |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {'RUNNING' if v.running else 'installed'} | {md(v.package)} | {md(' or '.join(v.versions))} | "
                  f"{md(v.fixed_version or 'no fix yet')} | {md(_procs(v.processes))} | {md(_cves(v.cves))} | "
                  f"{md(v.evidence)} |" for v in report.vulnerable]
    else:
        lines.append("No known vulnerable package versions found.")
    lines += ["", "## Malicious, unknown or suspicious code", ""]
    for c in report.code:
        lines.append(f"- **{md(c.severity)}** {md(c.kind)}: {md(c.title)}{md(_seen(c.methods))}")
        lines += [f"  - {md(detail_text(d), line_start=True)}" for d in c.details]
    if not report.code:
        lines.append("Nothing suspicious found by the methods that ran.")
    if report.behaviour:
        lines += ["", "## Network behaviour", ""]
        for c in report.behaviour:
            lines.append(f"- **{md(c.severity)}** {md(c.kind)}: {md(c.title)}{md(_seen(c.methods))}")
            lines += [f"  - {md(detail_text(d), line_start=True)}" for d in c.details]
    if report.interpreters:
        lines += ["", "## What interpreters run", ""]
        for i in report.interpreters:
            lines.append(f"- pid {i['pid']} {md(i['comm'])}: {md(i['entry'] or '?')} ({md(i['runtime'])})"
                         + (f", now in {md(i['now'][0])}" if i["now"] else "")
                         + (f"; packages: {md(', '.join(i['packages']))}" if i["packages"] else "")
                         + (f"; **unknown scripts: {md(', '.join(i['unknown']))}**" if i["unknown"] else ""))
    lines += ["", "## What could not be verified", ""]
    lines += [f"- {md(u['what'], line_start=True)} ({md(u['method'])}): {md(u['reason'])}"
              for u in report.unverified] or ["- nothing"]
    return "\n".join(lines) + "\n"


def render_html(report: Report) -> str:
    """Return the report as a standalone HTML page for the VM's owner."""
    rows = "".join(
        f"<tr><td>{'RUNNING' if v.running else 'installed'}</td><td>{h(v.package)}</td>"
        f"<td>{h(' or '.join(v.versions))}</td><td>{h(v.fixed_version or 'no fix yet')}</td>"
        f"<td>{h(_procs(v.processes))}</td><td>{h(_cves(v.cves))}</td><td>{h(v.evidence)}</td></tr>"
        for v in report.vulnerable)
    code = "".join(
        f"<li><b>{h(c.severity)}</b> {h(c.kind)}: {h(c.title)}{h(_seen(c.methods))}<ul>"
        + "".join(f"<li>{h(detail_text(d))}</li>" for d in c.details)
        + "</ul></li>" for c in report.code) or "<li>Nothing suspicious found by the methods that ran.</li>"
    behaviour = "".join(
        f"<li><b>{h(c.severity)}</b> {h(c.kind)}: {h(c.title)}{h(_seen(c.methods))}<ul>"
        + "".join(f"<li>{h(detail_text(d))}</li>" for d in c.details) + "</ul></li>" for c in report.behaviour)
    interp = "".join(
        f"<li>pid {i['pid']} {h(i['comm'])}: {h(i['entry'] or '?')} ({h(i['runtime'])})"
        + (f", now in {h(i['now'][0])}" if i["now"] else "")
        + (f"; packages: {h(', '.join(i['packages']))}" if i["packages"] else "")
        + (f"; <b>unknown scripts: {h(', '.join(i['unknown']))}</b>" if i["unknown"] else "") + "</li>"
        for i in report.interpreters)
    unverified = "".join(f"<li>{h(u['what'])} ({h(u['method'])}): {h(u['reason'])}</li>"
                         for u in report.unverified) or "<li>nothing</li>"
    s = report.summary
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Security report for {h(report.vm)}</title>"
            "</head><body>"
            f"<h1>Security report for {h(report.vm)}</h1>"
            + (f"<p><b>{h(NOTHING_VERIFIED)}</b></p>" if report.status == "unverifiable" else "") +
            f"<p>Scanned {h(_when(report.scanned_at))} with methods: {h(', '.join(report.methods))}. "
            f"{s.get('running_vulnerable', 0)} vulnerable package(s) running, {s.get('installed_vulnerable', 0)} "
            f"installed only, {s.get('cves', 0)} distinct CVEs, {s.get('suspicious_code', 0)} suspicious code "
            "finding(s).</p><h2>Vulnerable software</h2>"
            "<table border='1'><tr><th>state</th><th>package</th><th>version</th><th>update to</th>"
            f"<th>processes</th><th>CVEs</th><th>evidence</th></tr>{rows}</table>"
            f"<h2>Malicious, unknown or suspicious code</h2><ul>{code}</ul>"
            + (f"<h2>Network behaviour</h2><ul>{behaviour}</ul>" if behaviour else "")
            + (f"<h2>What interpreters run</h2><ul>{interp}</ul>" if interp else "") +
            f"<h2>What could not be verified</h2><ul>{unverified}</ul></body></html>\n")


RENDERERS = {"md": render_markdown, "html": render_html, "json": render_json}
