"""The `scan --fail-on` gate: every finding a scan's user is told of, at or above a severity.

A scan's merged view holds what the methods' cross-checks found (hidden, unknown, modified code...). The
checks against knowledge are the report's (service.report): running and installed vulnerable package
versions (CVEs), vulnerable interpreted scripts, YARA rules and known-bad page hashes over the unknown
code regions (when the VM's RAM can be read). The gate takes the report's findings — the view's and
those, one per fact — so `--fail-on` fails on everything `scan` and `report` show.

Severities are the project's one scale (critical, high, medium, low): running-vulnerable (a package
version with known CVEs is executing) and running-vulnerable-script are high, installed-vulnerable is
medium (analysis.vulnerable, analysis.scripts); a YARA match takes its rule's `severity` meta (default
high, analysis.malware.rule_severity); a known-bad page hash is critical. What the report could not
check (empty vulnerability knowledge, RAM not readable for YARA) is listed in `unchecked`: a clean gate
says only what was checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nephoscope.analysis.facts import SEVERITY_RANK
from nephoscope.core.records import Finding
from nephoscope.service.report import Report, report_from_result

UNCHECKED_METHODS = ("knowledge", "yara")  # the report's unverified entries that are checks the gate relies on


def at_or_above(findings: list[Finding], severity: str) -> list[Finding]:
    """Return the findings whose severity is `severity` or worse, most severe first (a severity of SEVERITY_RANK)."""
    limit = SEVERITY_RANK[severity]
    hits = [f for f in findings if SEVERITY_RANK.get(f.severity, len(SEVERITY_RANK)) <= limit]
    return sorted(hits, key=lambda f: SEVERITY_RANK[f.severity])


@dataclass(slots=True)
class Gate:
    """What `--fail-on SEVERITY` saw in one scan: the findings at or above it, and what was not checked."""

    severity: str
    findings: list[Finding] = field(default_factory=list)
    unchecked: list[dict[str, str]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Return whether some finding is at or above the severity."""
        return bool(self.findings)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (each finding as severity, kind and title)."""
        return {"severity": self.severity, "failed": self.failed,
                "findings": [{"severity": f.severity, "kind": f.kind, "title": f.title} for f in self.findings],
                "unchecked": self.unchecked}


def gate_report(report: Report, severity: str) -> Gate:
    """Return the gate over a report's findings (the scan view's and the knowledge checks', one per fact)."""
    unchecked = [u for u in report.unverified if u.get("method") in UNCHECKED_METHODS]
    return Gate(severity, at_or_above(report.findings, severity), unchecked)


def gate_result(result: Any, severity: str, vulns: Any = None) -> tuple[Report, Gate]:
    """Return the report of a finished scan and its gate (YARA reads the VM's RAM when it is a file; no pause)."""
    report = report_from_result(result, vulns)
    return report, gate_report(report, severity)
