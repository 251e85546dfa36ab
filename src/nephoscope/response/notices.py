"""Notices to a VM's owner: e-mail (SMTP, the report attached) and a signed JSON webhook, once per state.

A notice is about one VM of one tenant. Its problems (running vulnerable packages, malicious or unknown
code: `Problem`, built from the customer report by `service.notices`) are fingerprinted; a notice goes out
when the fingerprint differs from the one last notified ("problem"), when the problems are gone
("resolved"), or when a filter is applied or removed on the customer's behalf ("filter",
`notify_filter_change`). Each channel's delivery is retried with exponential backoff and every attempt is
recorded in the store (`store.notices.NoticeLog`).

Notices carry only what the customer report carries (no host paths, QEMU PIDs, other tenants' VMs);
guest strings are escaped for the medium: control characters always, HTML in HTML bodies.
Webhook signature: `X-Nephoscope-Signature: sha256=HEX(HMAC-SHA256(secret, TIMESTAMP + "." + BODY))` with
`X-Nephoscope-Timestamp: TIMESTAMP` (Unix seconds); `verify_signature` is the receiver's check.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import html
import json
import smtplib
import ssl
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from nephoscope import __version__
from nephoscope.core.text import escape_guest
from nephoscope.response.tenants import Smtp, Tenant
from nephoscope.store.notices import NoticeLog, NoticeRecord

PROBLEM, RESOLVED, FILTER = "problem", "resolved", "filter"
EVENTS = (PROBLEM, RESOLVED, FILTER)
FILTER_ACTIONS = ("applied", "removed")
TOPIC = "problems"
SCHEMA = "nephoscope.notice/1"
SIGNATURE_HEADER, TIMESTAMP_HEADER, EVENT_HEADER = "X-Nephoscope-Signature", "X-Nephoscope-Timestamp", \
    "X-Nephoscope-Event"
ATTEMPTS, BACKOFF_S, TIMEOUT_S = 4, 2.0, 15.0
SIGNATURE_TOLERANCE_S = 300


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing the VM's owner should act on: `key` is its stable identity across scans (no pids)."""

    key: str
    kind: str
    severity: str
    title: str

    def to_dict(self) -> dict[str, str]:
        """Return a JSON-ready dict (control characters of guest text escaped)."""
        return {"key": escape_guest(self.key, 512), "kind": self.kind, "severity": self.severity,
                "title": escape_guest(self.title, 1024)}


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file attached to the e-mail (the rendered customer report)."""

    filename: str
    content_type: str  # "text/html" or "text/markdown"
    text: str


@dataclass(slots=True)
class Notice:
    """One notice to one tenant about one VM, before it is sent on each channel."""

    tenant: str
    vm: str
    event: str
    fingerprint: str
    problems: list[Problem]
    new: list[Problem] = field(default_factory=list)
    gone: list[Problem] = field(default_factory=list)
    scan_id: int | None = None
    report: dict[str, Any] | None = None  # the customer report as JSON (service.report.Report.to_dict)
    attachments: list[Attachment] = field(default_factory=list)
    filter: dict[str, str] | None = None  # {"action", "cve", "summary"} for a filter event
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created: float = field(default_factory=time.time)

    def payload(self) -> dict[str, Any]:
        """Return the webhook's JSON document."""
        return {"schema": SCHEMA, "id": self.id, "event": self.event, "tenant": self.tenant, "vm": self.vm,
                "created": _iso(self.created), "scan_id": self.scan_id, "fingerprint": self.fingerprint,
                "summary": escape_guest(subject(self), 1024),
                "problems": [p.to_dict() for p in self.problems], "new": [p.to_dict() for p in self.new],
                "gone": [p.to_dict() for p in self.gone],
                "filter": {k: escape_guest(v, 1024) for k, v in self.filter.items()} if self.filter else None,
                "report": self.report, "generator": f"nephoscope {__version__}"}


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


def fingerprint(problems: Iterable[Problem]) -> str:
    """Return the fingerprint of a set of problems (order and duplicates do not matter)."""
    keys = sorted({p.key for p in problems})
    return hashlib.sha256("\n".join(keys).encode("utf-8", "backslashreplace")).hexdigest()


def problems_from(stored: list[dict[str, Any]]) -> list[Problem]:
    """Return problems recorded in the notice state (malformed rows are skipped)."""
    out = []
    for p in stored:
        if isinstance(p, dict) and all(isinstance(p.get(k), str) for k in ("key", "kind", "severity", "title")):
            out.append(Problem(p["key"], p["kind"], p["severity"], p["title"]))
    return out


def subject(notice: Notice) -> str:
    """Return the one-line summary of a notice (e-mail subject, webhook summary)."""
    vm = _header_safe(notice.vm)
    if notice.event == RESOLVED:
        return f"[nephoscope] {vm}: the problems reported earlier are gone"
    if notice.event == FILTER and notice.filter:
        f = notice.filter
        verb = "applied to" if f.get("action") == "applied" else "removed from"
        return f"[nephoscope] {vm}: a filter for {_header_safe(f.get('cve', ''))} was {verb} its network path"
    extra = f", {len(notice.new)} new" if notice.new else ""
    extra += f", {len(notice.gone)} gone" if notice.gone else ""
    return f"[nephoscope] {vm} runs vulnerable or malicious code: {len(notice.problems)} problem(s){extra}"


def _header_safe(text: str) -> str:
    return escape_guest(text, 200).replace("\\x0a", " ").replace("\\x0d", " ")


def _text_body(notice: Notice) -> str:
    lines = [subject(notice), ""]
    if notice.filter:
        lines += [f"Filter {escape_guest(notice.filter.get('action', ''))} for "
                  f"{escape_guest(notice.filter.get('cve', ''))}: {escape_guest(notice.filter.get('summary', ''))}",
                  ""]
    for title, items in (("Problems now", notice.problems), ("New since the last notice", notice.new),
                         ("Gone since the last notice", notice.gone)):
        if items:
            lines += [f"{title}:"] + [f"  - [{p.severity}] {escape_guest(p.title, 1024)}" for p in items] + [""]
    if notice.event == RESOLVED:
        lines += ["The latest scan shows none of the problems of the last notice.", ""]
    lines += [f"VM: {escape_guest(notice.vm)}", f"Scan: {notice.scan_id}", f"When: {_iso(notice.created)}",
              f"Notice: {notice.id}", "", "The customer report is attached (HTML and Markdown)."
              if notice.attachments else "No report is attached."]
    return "\n".join(lines) + "\n"


def _html_body(notice: Notice) -> str:
    def esc(value: str) -> str:
        return html.escape(escape_guest(value, 1024), quote=True)

    parts = [f"<p><b>{esc(subject(notice))}</b></p>"]
    if notice.filter:
        parts.append(f"<p>Filter {esc(notice.filter.get('action', ''))} for {esc(notice.filter.get('cve', ''))}: "
                     f"{esc(notice.filter.get('summary', ''))}</p>")
    for title, items in (("Problems now", notice.problems), ("New since the last notice", notice.new),
                         ("Gone since the last notice", notice.gone)):
        if items:
            parts.append(f"<h3>{title}</h3><ul>" + "".join(
                f"<li>[{esc(p.severity)}] {esc(p.title)}</li>" for p in items) + "</ul>")
    parts.append(f"<p>VM {esc(notice.vm)}, scan {notice.scan_id}, {esc(_iso(notice.created))}, "
                 f"notice {esc(notice.id)}</p>")
    return "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>" + "".join(parts) + "</body></html>\n"


def compose_email(notice: Notice, tenant: Tenant) -> EmailMessage:
    """Return the notice as a multipart e-mail: text and HTML bodies, the report files attached."""
    msg = EmailMessage()
    msg["Subject"] = subject(notice)
    msg["From"] = tenant.smtp.sender
    msg["To"] = ", ".join(tenant.emails)
    msg["Date"] = formatdate(notice.created, usegmt=True)
    msg["Message-ID"] = make_msgid("nephoscope")
    msg[EVENT_HEADER] = notice.event
    msg.set_content(_text_body(notice))
    msg.add_alternative(_html_body(notice), subtype="html")
    for a in notice.attachments:
        maintype, subtype = a.content_type.split("/", 1)
        msg.add_attachment(a.text.encode("utf-8"), maintype=maintype, subtype=subtype, filename=a.filename)
    return msg


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """Return the signature header value of a webhook body sent at `timestamp`."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(secret: str, timestamp: str, body: bytes, signature: str, *, now: float | None = None,
                     tolerance: float = SIGNATURE_TOLERANCE_S) -> bool:
    """Return whether a received webhook is signed with `secret` and recent (the receiver's side)."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except (TypeError, ValueError):
        return False
    return age <= tolerance and hmac.compare_digest(sign(secret, timestamp, body), signature or "")


def send_email(msg: EmailMessage, smtp: Smtp) -> None:
    """Send one message through the relay; raise OSError or smtplib.SMTPException on failure."""
    context = ssl.create_default_context()
    cls = smtplib.SMTP_SSL if smtp.ssl else smtplib.SMTP
    kwargs: dict[str, Any] = {"context": context} if smtp.ssl else {}
    with cls(smtp.host, smtp.port, timeout=smtp.timeout, **kwargs) as conn:
        if smtp.starttls:
            conn.starttls(context=context)
        if smtp.username:
            conn.login(smtp.username, smtp.password)
        conn.send_message(msg)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: a signed notice goes to the configured URL or nowhere (a 3xx is a failed attempt)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def post_webhook(url: str, body: bytes, secret: str, event: str, timeout: float = TIMEOUT_S) -> None:
    """POST a signed JSON body; raise OSError (urllib's errors included) unless the answer is 2xx."""
    stamp = str(int(time.time()))
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"nephoscope/{__version__}", EVENT_HEADER: event,
        TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(secret, stamp, body)})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        if not 200 <= answer.status < 300:
            raise OSError(f"the webhook answered HTTP {answer.status}")


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


@dataclass(slots=True)
class Delivery:
    """How notices are delivered: attempts per channel, backoff between them (doubling), timeouts."""

    attempts: int = ATTEMPTS
    backoff: float = BACKOFF_S
    timeout: float = TIMEOUT_S
    sleep: Callable[[float], None] = time.sleep

    def retry(self, log: NoticeLog, notice_id: int, send: Callable[[], None]) -> None:
        """Call `send` until it succeeds or the attempts are used up; record every attempt."""
        for attempt in range(max(1, self.attempts)):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                send()
            except (OSError, smtplib.SMTPException, ValueError) as exc:  # ValueError: a malformed URL or answer
                log.attempt(notice_id, _error_text(exc))
                continue
            log.attempt(notice_id, None)
            return
        log.give_up(notice_id)


def deliver(notice: Notice, tenant: Tenant, log: NoticeLog, delivery: Delivery | None = None) -> list[NoticeRecord]:
    """Send a notice on each of the tenant's channels (e-mail, webhook) and return the delivery records."""
    delivery = delivery or Delivery()
    ids = []
    if tenant.emails:
        msg = compose_email(notice, tenant)
        nid = log.add(tenant.name, notice.vm, notice.event, notice.fingerprint, notice.scan_id, "email",
                      ", ".join(tenant.emails))
        smtp = replace(tenant.smtp, timeout=min(tenant.smtp.timeout, delivery.timeout))
        delivery.retry(log, nid, lambda: send_email(msg, smtp))
        ids.append(nid)
    if tenant.webhook:
        body = json.dumps(notice.payload(), sort_keys=True, default=str).encode("utf-8")
        nid = log.add(tenant.name, notice.vm, notice.event, notice.fingerprint, notice.scan_id, "webhook",
                      tenant.webhook)
        delivery.retry(log, nid, lambda: post_webhook(tenant.webhook, body, tenant.secret, notice.event,
                                                      delivery.timeout))
        ids.append(nid)
    by_id = {r.id: r for r in log.notices(notice.vm, tenant.name, limit=max(10, 2 * len(ids)))}
    return [by_id[i] for i in ids if i in by_id]


def decide(previous: list[Problem] | None, previous_fingerprint: str | None, problems: list[Problem]) -> str | None:
    """Return the event a new set of problems calls for ("problem", "resolved") or None (nothing to tell)."""
    if not problems:
        return RESOLVED if previous else None
    return PROBLEM if fingerprint(problems) != previous_fingerprint else None


def _undelivered(log: NoticeLog, tenant: str, vm: str, mark: str) -> bool:
    """Return whether the last notice of this state reached none of its channels."""
    latest: dict[str, str] = {}
    for r in log.notices(vm, tenant, limit=20):  # newest first: the first row per channel is its latest
        if r.event != FILTER and r.fingerprint == mark:
            latest.setdefault(r.channel, r.status)
    return bool(latest) and all(status == "failed" for status in latest.values())


def notify_problems(tenant: Tenant, vm: str, problems: list[Problem], log: NoticeLog, *, scan_id: int | None = None,
                    report: dict[str, Any] | None = None, attachments: Iterable[Attachment] = (),
                    delivery: Delivery | None = None, force: bool = False) -> list[NoticeRecord]:
    """Tell `tenant` about `vm`'s problems unless it was already told this state; return the deliveries.

    `force` sends the current state even when it is unchanged. The new state is recorded whether or not
    delivery succeeded (a failed delivery is recorded as failed, and `notices send --force` resends)."""
    state = log.find_state(tenant.name, vm, TOPIC)
    previous = problems_from(state.problems) if state else None
    event = decide(previous, state.fingerprint if state else None, problems)
    if event is None and problems and _undelivered(log, tenant.name, vm, fingerprint(problems)):
        event = PROBLEM  # every channel failed last time: a later scan tries again
    if event is None and force:
        event = PROBLEM if problems else RESOLVED
    if event is None:
        return []
    before = {p.key for p in previous or []}
    now = {p.key for p in problems}
    notice = Notice(tenant.name, vm, event, fingerprint(problems), sorted(problems, key=lambda p: p.key),
                    [p for p in problems if p.key not in before], [p for p in previous or [] if p.key not in now],
                    scan_id, report, list(attachments))
    log.set_state(tenant.name, vm, TOPIC, notice.fingerprint, [asdict(p) for p in problems], scan_id)
    return deliver(notice, tenant, log, delivery)


def notify_filter_change(tenant: Tenant, vm: str, action: str, cve: str, summary: str, log: NoticeLog | None = None,
                         *, problems: Iterable[Problem] = (), report: dict[str, Any] | None = None,
                         attachments: Iterable[Attachment] = (), delivery: Delivery | None = None,
                         scan_id: int | None = None) -> list[NoticeRecord]:
    """Tell `tenant` that a filter for `cve` was applied to or removed from `vm`'s network path.

    The entry point for `response.filters`: `action` is "applied" or "removed", `summary` says what the
    filter does and does not stop; `log` defaults to the default store's notice log. Re-applying an
    unchanged filter sends nothing (state "filter:<cve>")."""
    if action not in FILTER_ACTIONS:
        raise ValueError(f"filter action {action!r} is not one of {', '.join(FILTER_ACTIONS)}")
    if log is None:
        from nephoscope.store.sqlite import Store

        log = NoticeLog(Store())
    topic = f"filter:{cve}"
    mark = hashlib.sha256(f"{action}\n{summary}".encode("utf-8", "backslashreplace")).hexdigest()
    state = log.find_state(tenant.name, vm, topic)
    if state is not None and state.fingerprint == mark:
        return []
    current = list(problems)
    notice = Notice(tenant.name, vm, FILTER, mark, current, scan_id=scan_id, report=report,
                    attachments=list(attachments), filter={"action": action, "cve": cve, "summary": summary})
    log.set_state(tenant.name, vm, topic, mark, [{"action": action, "cve": cve}], scan_id)
    return deliver(notice, tenant, log, delivery)
