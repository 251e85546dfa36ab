"""The notice use case: turn a VM's customer report into problems and tell its tenant (response.notices).

The report (service.report) is what the customer may see, so a notice carries nothing else: its problems
are the report's running vulnerable packages and its malicious, unknown or suspicious code, and the
report itself is attached (HTML and Markdown by e-mail, JSON in the webhook). A scan that obtained
nothing (status "unverifiable") is never taken for an all-clear: it sends no "resolved" notice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nephoscope.core.errors import NephoscopeError
from nephoscope.response.notices import (
    Attachment,
    Delivery,
    Problem,
    notify_filter_change,
    notify_problems,
)
from nephoscope.response.tenants import Tenant, Tenants, find_tenants, load_tenants
from nephoscope.service.report import Report, report_from_result, report_from_store, scrub
from nephoscope.service.report_render import render_html, render_markdown
from nephoscope.store.notices import NoticeLog, NoticeRecord
from nephoscope.store.sqlite import Store

_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\b\d+\b")  # pids and addresses change across scans; the problem does not


@dataclass(slots=True)
class NoticeOutcome:
    """What notifying one VM did: the tenant, the deliveries (none: nothing to tell) and why."""

    vm: str
    tenant: str | None
    deliveries: list[NoticeRecord] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"vm": self.vm, "tenant": self.tenant, "reason": self.reason,
                "deliveries": [d.to_dict() for d in self.deliveries]}


def problems_of(report: Report) -> list[Problem]:
    """Return the problems of a report: running vulnerable packages, then suspicious code facts."""
    out = []
    for v in report.vulnerable:
        if not v.running:
            continue
        cves = sorted({c["cve"] for c in v.cves})
        title = (f"{v.package} {' or '.join(v.versions)} is running with {len(cves)} known CVE(s) "
                 f"({', '.join(cves[:8])}{', …' if len(cves) > 8 else ''}); "
                 + (f"update to {v.fixed_version}" if v.fixed_version else "no fixed version yet"))
        out.append(Problem(f"running-vulnerable:{v.package}:{','.join(v.versions)}:{','.join(cves)}",
                           "running-vulnerable", "high", title))
    for c in report.code:
        title = scrub(c.title)
        out.append(Problem(f"{c.kind}:{_NUMBERS.sub('#', title)}", c.kind, c.severity, title))
    return out


def attachments_of(report: Report) -> list[Attachment]:
    """Return the report rendered for the e-mail: HTML and Markdown (every guest string escaped)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", report.vm)[:64] or "vm"
    return [Attachment(f"report-{stem}.html", "text/html", render_html(report)),
            Attachment(f"report-{stem}.md", "text/markdown", render_markdown(report))]


def _tenant(vm: str, tenants: Tenants | None) -> tuple[Tenants, Tenant | None]:
    tenants = tenants or load_tenants()
    return tenants, tenants.find_tenant(vm)


def notify_report(report: Report, store: Store, tenants: Tenants, *, delivery: Delivery | None = None,
                  force: bool = False) -> NoticeOutcome:
    """Tell the tenant of `report.vm` what the report shows unless it was told this state already."""
    tenant = tenants.find_tenant(report.vm)
    if tenant is None:
        return NoticeOutcome(report.vm, None, reason="no tenant owns this VM (tenants file)")
    if report.status == "unverifiable":
        return NoticeOutcome(report.vm, tenant.name, reason="the scan obtained nothing; no notice (not an all-clear)")
    problems = problems_of(report)
    sent = notify_problems(tenant, report.vm, problems, NoticeLog(store), scan_id=report.scan_id,
                           report=report.to_dict(), attachments=attachments_of(report), delivery=delivery,
                           force=force)
    reason = "" if sent else ("unchanged since the last notice" if problems else "no problem, none before")
    return NoticeOutcome(report.vm, tenant.name, sent, reason)


def notify_vm(vm: str, *, store: Store | None = None, tenants: Tenants | None = None, delivery: Delivery | None = None,
              force: bool = False, ram_path: Path | None = None, vulns: Any = None, owner: Any = None
              ) -> NoticeOutcome:
    """Notify `vm`'s tenant from its latest stored scan (`notices send VM`); `vulns`/`owner` as for the report."""
    tenants, tenant = _tenant(vm, tenants)
    if tenant is None:
        raise NephoscopeError(f"no tenant owns VM {vm!r} in {tenants.path or 'the tenants file'}; add it to a "
                              "tenant's vms (docs/notices.md)")
    store = store or Store()
    if ram_path is None:  # a running lab guest: its unknown code regions are scanned with YARA, as `report` does
        from nephoscope.lab import runner

        guest = runner.load_guest(vm)
        ram_path = guest.ram_path if guest is not None and guest.alive() else None
    return notify_report(report_from_store(vm, store, vulns=vulns, ram_path=ram_path, owner=owner), store, tenants,
                         delivery=delivery,
                         force=force)


def notify_result(result: Any, *, store: Store | None = None, tenants: Tenants | None = None,
                  delivery: Delivery | None = None, vulns: Any = None) -> NoticeOutcome | None:
    """Notify after a scan (`scan --notify`): None when no tenants file exists (notices not configured)."""
    tenants = tenants or find_tenants()
    if tenants is None:
        return None
    return notify_report(report_from_result(result, vulns), store or Store(), tenants, delivery=delivery)


def filter_changed(vm: str, action: str, cve: str, summary: str, *, store: Store | None = None,
                   tenants: Tenants | None = None, delivery: Delivery | None = None) -> NoticeOutcome:
    """Tell `vm`'s tenant a filter for `cve` was applied or removed, with its latest report when there is one."""
    tenants, tenant = _tenant(vm, tenants)
    if tenant is None:
        return NoticeOutcome(vm, None, reason="no tenant owns this VM (tenants file)")
    store = store or Store()
    report = None
    if store.scans(vm, limit=1):
        report = report_from_store(vm, store)
    sent = notify_filter_change(tenant, vm, action, cve, summary, NoticeLog(store),
                                problems=problems_of(report) if report else (),
                                report=report.to_dict() if report else None,
                                attachments=attachments_of(report) if report else (), delivery=delivery,
                                scan_id=report.scan_id if report else None)
    return NoticeOutcome(vm, tenant.name, sent, "" if sent else "this filter change was notified already")


def list_notices(vm: str | None = None, tenant: str | None = None, limit: int = 100,
                 store: Store | None = None) -> list[NoticeRecord]:
    """Return the recorded notices with their delivery status, newest first."""
    return NoticeLog(store or Store()).notices(vm, tenant, limit)
