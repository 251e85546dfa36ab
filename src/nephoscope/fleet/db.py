"""The central store's use cases: open and migrate the database, tokens and scopes, ingest and query scans.

Everything the API does to the database goes through here, so the same calls serve PostgreSQL and SQLite.
Nothing here trusts a pushed document beyond its shape: risk counts are derived from it, strings stay
data (the dashboard renders them as text).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from nephoscope.core.errors import NephoscopeError
from nephoscope.fleet.models import (
    SCOPES,
    FilterAuditRow,
    FilterRow,
    FindingRow,
    Host,
    NoticeRow,
    Scan,
    Tenant,
    Token,
    TokenAuditRow,
    Vm,
)
from nephoscope.service.report import CODE_KINDS, scrub

MIGRATIONS = Path(__file__).with_name("migrations")
RISKS = ("running_vulnerable", "malicious_unknown", "unverifiable")


class FleetError(NephoscopeError):
    """The fleet store refused a request (unknown token, wrong scope, bad document)."""


class LastOperatorError(FleetError):
    """Revoking this token would leave no active operator token (pass force to do it anyway)."""


LAST_USED_EVERY_S = 60.0  # `tokens.last_used` is written at most this often per token (not a write per request)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a token speaks for: its scope and the tenant or host it is bound to."""

    scope: str
    tenant_id: int | None = None
    host_id: int | None = None
    token_id: int | None = None


def sqlite_url(path: Path) -> str:
    """Return the SQLAlchemy URL of an SQLite file (the single-host store)."""
    return f"sqlite:///{path}"


def open_engine(url: str) -> Engine:
    """Return an engine for `url` (postgresql+psycopg://... or sqlite:///...), pooled and pre-pinged."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA journal_mode = WAL")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the database to `revision` with the Alembic migrations shipped in this package."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


class FleetStore:
    """The central store: one engine, short sessions per call."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Yield a session that commits on success and rolls back on error."""
        with self.sessions() as s, s.begin():
            yield s

    # ---------------------------------------------------------------- tenants, hosts, tokens

    def add_tenant(self, name: str) -> int:
        """Create a tenant (or return the existing one's id)."""
        with self.session() as s:
            found = s.scalar(select(Tenant).where(Tenant.name == name))
            if found is not None:
                return found.id
            t = Tenant(name=name)
            s.add(t)
            s.flush()
            return t.id

    def _host(self, s: Session, name: str) -> Host:
        host = s.scalar(select(Host).where(Host.name == name))
        if host is None:
            host = Host(name=name)
            s.add(host)
            s.flush()
        return host

    def add_host(self, name: str) -> int:
        """Create a host (or return the existing one's id)."""
        with self.session() as s:
            return self._host(s, name).id

    def issue_token(self, scope: str, *, tenant_id: int | None = None, host_id: int | None = None,
                    label: str = "", expires: float | None = None, by: Principal | None = None) -> str:
        """Create a token of `scope` and return its secret (only its SHA-256 is stored).

        `expires`: the Unix time from which the token is refused (401); None: it never expires."""
        return self.issue(scope, tenant_id=tenant_id, host_id=host_id, label=label, expires=expires, by=by)[1]

    def issue(self, scope: str, *, tenant_id: int | None = None, host_id: int | None = None, label: str = "",
              expires: float | None = None, by: Principal | None = None) -> tuple[int, str]:
        """Create a token of `scope`; return its id and its secret (only the secret's SHA-256 is stored).

        The issue is audited with who asked: `by` (an operator's token) or, when None, the CLI's user."""
        if scope not in SCOPES:
            raise FleetError(f"unknown scope {scope!r}; one of {', '.join(SCOPES)}")
        if scope == "tenant" and tenant_id is None:
            raise FleetError("a tenant token needs a tenant")
        if scope == "sensor" and host_id is None:
            raise FleetError("a sensor token needs a host")
        secret = "nph_" + secrets.token_urlsafe(32)
        now = time.time()
        with self.session() as s:
            row = Token(digest=token_digest(secret), scope=scope, tenant_id=tenant_id if scope == "tenant" else None,
                        host_id=host_id if scope == "sensor" else None, label=label, created=now, expires=expires)
            s.add(row)
            s.flush()
            s.add(TokenAuditRow(token_id=row.id, at=now, action="issued", forced=False, **_actor(s, by)))
            return row.id, secret

    def has_operator(self) -> bool:
        """Return whether any operator token exists (the server creates the first one)."""
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(Token).where(Token.scope == "operator")) > 0

    def find_principal(self, secret: str) -> Principal | None:
        """Return who a token secret speaks for, or None when it is unknown, expired or revoked.

        Nothing is cached: a token revoked a moment ago is refused by the next request, on every replica."""
        if "\x00" in secret:
            return None
        now = time.time()
        with self.session() as s:
            t = s.scalar(select(Token).where(Token.digest == token_digest(secret)))
            if t is None or t.revoked_at is not None or (t.expires is not None and now >= t.expires):
                return None
            who = Principal(t.scope, t.tenant_id, t.host_id, t.id)
            stale = t.last_used is None or now - t.last_used >= LAST_USED_EVERY_S
        if stale:
            try:  # best effort: a busy SQLite file or a lock wait must not fail the request
                with self.session() as s:
                    s.execute(update(Token).where(Token.id == who.token_id, or_(
                        Token.last_used.is_(None), Token.last_used < now - LAST_USED_EVERY_S)).values(last_used=now))
            except OperationalError:
                pass
        return who

    def list_tokens(self) -> list[dict[str, Any]]:
        """Return every token (never its secret or digest): scope, binding, label, times, state, who issued
        and who revoked it; oldest first."""
        with self.session() as s:  # four queries whatever the number of tokens (a fleet has a sensor per host)
            return self._token_dicts(s, list(s.scalars(select(Token).order_by(Token.id))), all_rows=True)

    def revoke_token(self, token_id: int, *, by: Principal | None = None, force: bool = False
                     ) -> dict[str, Any] | None:
        """Revoke a token from now on (401 on every endpoint); return it as `list_tokens` does, None if unknown.

        Audited with who revoked it: `by` (an operator's token) or, when None, the CLI's user. Idempotent:
        revoking a revoked token changes nothing (its first revocation stays the audited one).
        The last active operator token (not revoked, not expired) is refused with LastOperatorError unless
        `force`: without one, only `nephoscope server --new-token operator` on the database gets back in."""
        now = time.time()
        with self.session() as s:
            t = s.get(Token, token_id)
            if t is None:
                return None
            if t.revoked_at is None:
                if t.scope == "operator" and not force:
                    active = s.scalars(select(Token.id).where(
                        Token.scope == "operator", Token.revoked_at.is_(None),
                        or_(Token.expires.is_(None), Token.expires > now)).with_for_update()).all()
                    if not set(active) - {t.id}:
                        raise LastOperatorError(
                            f"token {t.id} is the last active operator token: revoking it locks every operator "
                            "out; issue another operator token first, or force it")
                t.revoked_at = now
                s.add(TokenAuditRow(token_id=t.id, at=now, action="revoked", forced=force, **_actor(s, by)))
                s.flush()
            return self._token_dicts(s, [t])[0]

    def token_audit(self, limit: int = 500) -> list[dict[str, Any]]:
        """Return the newest token changes (issued, revoked), newest first."""
        with self.session() as s:
            rows = s.scalars(select(TokenAuditRow).order_by(TokenAuditRow.id.desc()).limit(limit))
            return [{"id": r.id, "token_id": r.token_id, "at": r.at, "action": r.action,
                     "actor_token_id": r.actor_token_id, "actor": r.actor, "forced": r.forced} for r in rows]

    @staticmethod
    def _token_dicts(s: Session, tokens: list[Token], all_rows: bool = False) -> list[dict[str, Any]]:
        """Return tokens as the API lists them; `all_rows`: `tokens` is every token (read the audit whole)."""
        ids = [t.id for t in tokens]
        audit = select(TokenAuditRow).order_by(TokenAuditRow.id.desc())
        events: dict[tuple[int, str], TokenAuditRow] = {  # the first of each kind per token (oldest wins)
            (r.token_id, r.action): r for r in s.scalars(audit if all_rows else audit.where(
                TokenAuditRow.token_id.in_(ids)))}
        tenants = {i: n for i, n in s.execute(select(Tenant.id, Tenant.name).where(
            Tenant.id.in_({t.tenant_id for t in tokens if t.tenant_id is not None})))}
        hosts = {i: n for i, n in s.execute(select(Host.id, Host.name).where(
            Host.id.in_({t.host_id for t in tokens if t.host_id is not None})))}
        now = time.time()
        out = []
        for t in tokens:
            state = ("revoked" if t.revoked_at is not None
                     else "expired" if t.expires is not None and now >= t.expires else "active")
            issued, revoked = events.get((t.id, "issued")), events.get((t.id, "revoked"))
            out.append({"id": t.id, "scope": t.scope, "tenant_id": t.tenant_id, "tenant": tenants.get(t.tenant_id),
                        "host_id": t.host_id, "host": hosts.get(t.host_id), "label": t.label, "created": t.created,
                        "expires": t.expires, "state": state, "revoked_at": t.revoked_at,
                        "revoked_by": revoked.actor if revoked else None, "forced": bool(revoked and revoked.forced),
                        "issued_by": issued.actor if issued else None, "last_used": t.last_used})
        return out

    # ---------------------------------------------------------------- ingest

    def ingest(self, host_id: int, push: dict[str, Any]) -> tuple[int, bool, bool]:
        """Store one pushed scan; return (scan id, whether it was new, the VM's high-risk flag).

        The idempotency key makes a retry of a push that already landed a no-op returning the same id."""
        push = without_nul(push)
        for _attempt in range(3):
            try:
                return self._ingest_once(host_id, push)
            except IntegrityError:  # another writer created the same key or the same new VM first
                with self.session() as s:
                    existing = s.scalar(select(Scan).where(Scan.idempotency_key == str(push["idempotency_key"])))
                    if existing is not None:
                        vm = s.get(Vm, existing.vm_id)
                        return existing.id, False, bool(vm and vm.high_risk)
        return self._ingest_once(host_id, push)

    def _ingest_once(self, host_id: int, push: dict[str, Any]) -> tuple[int, bool, bool]:
        key = str(push["idempotency_key"])
        doc = push["document"]
        scan = doc.get("scan", {})
        with self.session() as s:
            existing = s.scalar(select(Scan).where(Scan.idempotency_key == key))
            if existing is not None:
                vm = s.get(Vm, existing.vm_id)
                return existing.id, False, bool(vm and vm.high_risk)
        with self.session() as s:
            vm = s.scalar(select(Vm).where(Vm.host_id == host_id, Vm.name == push["vm"]))
            if vm is None:
                vm = Vm(host_id=host_id, name=push["vm"], high_risk=False, risk={})
                s.add(vm)
                s.flush()
            now = time.time()
            row = Scan(vm_id=vm.id, idempotency_key=key, started=float(push["started"]),
                       finished=float(push["finished"]), received=now, status=str(scan.get("status", "ok")),
                       methods=list(scan.get("methods", [])), summary=dict(scan.get("summary", {})),
                       document=doc)
            s.add(row)
            s.flush()
            for f in scan.get("findings", []):
                s.add(FindingRow(scan_id=row.id, vm_id=vm.id, time=float(push["finished"]),
                                 kind=str(f.get("kind", "")), severity=str(f.get("severity", "")),
                                 title=str(f.get("title", "")), evidence=list(f.get("evidence", []))))
            if vm.latest_scan_id is None or row.finished >= self._finished(s, vm.latest_scan_id):
                vm.latest_scan_id = row.id
                vm.risk = risk_of(doc)
            return row.id, True, vm.high_risk

    def ingest_response(self, host_id: int, push: dict[str, Any]) -> int:
        """Store a VM's filters in force (replacing the last snapshot), filter audit rows and notices; return its id.

        Idempotent: audit rows and notices are keyed by their id in the host's log (a notice's later delivery
        status replaces the earlier one), the filters are the host's whole current set for the VM."""
        push = without_nul(push)
        filters = [dict(f) for f in push.get("filters", [])]
        audit = [dict(a) for a in push.get("audit", [])]
        notices = [dict(n) for n in push.get("notices", [])]
        for _attempt in range(3):
            try:
                return self._ingest_response_once(host_id, str(push["vm"]), filters, audit, notices)
            except IntegrityError:  # a concurrent push created the same VM or row first: the retry finds it
                continue
        return self._ingest_response_once(host_id, str(push["vm"]), filters, audit, notices)

    def _ingest_response_once(self, host_id: int, name: str, filters: list[dict[str, Any]],
                              audit: list[dict[str, Any]], notices: list[dict[str, Any]]) -> int:
        with self.session() as s:
            vm = s.scalar(select(Vm).where(Vm.host_id == host_id, Vm.name == name))
            if vm is None:
                vm = Vm(host_id=host_id, name=name, high_risk=False, risk={})
                s.add(vm)
                s.flush()
            for old in s.scalars(select(FilterRow).where(FilterRow.vm_id == vm.id)):
                s.delete(old)
            for f in filters:
                s.add(FilterRow(vm_id=vm.id, mitigation=str(f.get("mitigation", ""))[:200],
                                cve=str(f.get("cve", ""))[:100],
                                applied_at=float(f.get("applied_at") or 0.0), data=f))
            known = {r.source_id: r for r in s.scalars(select(FilterAuditRow).where(FilterAuditRow.vm_id == vm.id))}
            for a in audit:
                source_id = _source_id(a)
                if source_id not in known:
                    s.add(FilterAuditRow(vm_id=vm.id, source_id=source_id, at=float(a.get("at") or 0.0),
                                         action=str(a.get("action", ""))[:32], cve=str(a.get("cve", ""))[:100],
                                         data=a))
            sent = {r.source_id: r for r in s.scalars(select(NoticeRow).where(NoticeRow.vm_id == vm.id))}
            for n in notices:
                source_id = _source_id(n)
                row = sent.get(source_id)
                if row is None:
                    row = NoticeRow(vm_id=vm.id, source_id=source_id)
                    s.add(row)
                    sent[source_id] = row
                row.created, row.status, row.data = float(n.get("created") or 0.0), str(n.get("status", ""))[:32], n
            vm.response_at = time.time()
            return vm.id

    def vm_response(self, who: Principal, vm_id: int, limit: int = 200) -> dict[str, Any] | None:
        """Return a visible VM's filters in force, filter changes and notices (None when not visible).

        A tenant sees what concerns it (the CVE, what a filter does and does not stop, when it was applied
        or removed, whether a notice was delivered), never the host's rule text, tap device, addresses of
        the host side, operator names or delivery errors."""
        tenant = who.scope == "tenant"
        with self.session() as s:
            row = s.execute(self._visible(who).where(Vm.id == vm_id)).first()
            if row is None:
                return None
            vm, host = row[0], row[1]
            filters = s.scalars(select(FilterRow).where(FilterRow.vm_id == vm_id).order_by(FilterRow.applied_at))
            audit = s.scalars(select(FilterAuditRow).where(FilterAuditRow.vm_id == vm_id)
                              .order_by(FilterAuditRow.at.desc(), FilterAuditRow.id.desc()).limit(limit))
            notices = s.scalars(select(NoticeRow).where(NoticeRow.vm_id == vm_id)
                                .order_by(NoticeRow.created.desc(), NoticeRow.id.desc()).limit(limit))
            return {"recorded": vm.response_at is not None, "reported_at": vm.response_at,
                    "view": "tenant" if tenant else "operator",
                    "filters": [_tenant_record(r.data, TENANT_FILTER_KEYS, host) if tenant else r.data
                                for r in filters],
                    "audit": [_tenant_record(r.data, TENANT_AUDIT_KEYS, host) if tenant else r.data for r in audit],
                    "notices": [_tenant_record(r.data, TENANT_NOTICE_KEYS, host) if tenant else r.data
                                for r in notices]}

    @staticmethod
    def _finished(s: Session, scan_id: int) -> float:
        return float(s.scalar(select(Scan.finished).where(Scan.id == scan_id)) or 0.0)

    # ---------------------------------------------------------------- queries (scope-checked)

    def _visible(self, who: Principal) -> Any:
        q = select(Vm, Host.name, Tenant.name).join(Host, Vm.host_id == Host.id).outerjoin(
            Tenant, Vm.tenant_id == Tenant.id)
        if who.scope == "tenant":
            q = q.where(Vm.tenant_id == who.tenant_id)
        elif who.scope != "operator":
            q = q.where(False)
        return q

    def list_vms(self, who: Principal, host: str | None = None, tenant: str | None = None,
                 risk: str | None = None) -> list[dict[str, Any]]:
        """Return the VMs `who` may see (filtered by host, tenant name, or a risk with a non-zero count).

        A tenant reads no host: its VMs' `host` is None and filtering by host is refused (FleetError), so
        the answer cannot confirm which host runs a VM."""
        q = self._visible(who)
        if host and who.scope == "tenant":
            raise FleetError("a tenant token cannot filter by host: tenants do not see the provider's hosts")
        if host:
            q = q.where(Host.name == host)
        if tenant:
            q = q.where(Tenant.name == tenant)
        tenant_view = who.scope == "tenant"
        with self.session() as s:
            rows = [_vm_dict(vm, h, t, tenant_view) for vm, h, t in s.execute(q.order_by(Vm.id))]
        if risk:
            rows = [r for r in rows if r["risk"].get(risk)]
        return rows

    def get_vm(self, who: Principal, vm_id: int) -> dict[str, Any] | None:
        """Return one VM `who` may see with its latest scan document, or None (unknown or not theirs)."""
        with self.session() as s:
            row = s.execute(self._visible(who).where(Vm.id == vm_id)).first()
            if row is None:
                return None
            vm, h, t = row
            tenant_view = who.scope == "tenant"
            out = _vm_dict(vm, h, t, tenant_view)
            latest = s.get(Scan, vm.latest_scan_id) if vm.latest_scan_id else None
            out["latest"] = _scan_dict(latest, with_document=True, tenant_host=h if tenant_view else None
                                       ) if latest else None
            return out

    def vm_scans(self, who: Principal, vm_id: int, limit: int = 50) -> list[dict[str, Any]] | None:
        """Return a visible VM's scans, newest first (None when the VM is not visible)."""
        with self.session() as s:
            if s.execute(self._visible(who).where(Vm.id == vm_id)).first() is None:
                return None
            rows = s.scalars(select(Scan).where(Scan.vm_id == vm_id).order_by(Scan.id.desc()).limit(limit))
            return [_scan_dict(r, tenant_host="" if who.scope == "tenant" else None) for r in rows]

    def get_scan(self, who: Principal, scan_id: int) -> dict[str, Any] | None:
        """Return one scan with its document when `who` may see its VM, else None."""
        with self.session() as s:
            row = s.get(Scan, scan_id)
            vm = s.execute(self._visible(who).where(Vm.id == row.vm_id)).first() if row is not None else None
            if row is None or vm is None:
                return None
            return _scan_dict(row, with_document=True, tenant_host=vm[1] if who.scope == "tenant" else None)

    def vm_findings(self, who: Principal, vm_id: int, limit: int = 500) -> list[dict[str, Any]] | None:
        """Return a visible VM's findings over time, newest first (None when not visible)."""
        with self.session() as s:
            vm = s.execute(self._visible(who).where(Vm.id == vm_id)).first()
            if vm is None:
                return None
            rows = s.scalars(select(FindingRow).where(FindingRow.vm_id == vm_id)
                             .order_by(FindingRow.time.desc(), FindingRow.id).limit(limit))
            tenant = who.scope == "tenant"  # a tenant's copy of host-produced text is scrubbed of host internals
            host = vm[1]
            return [{"scan_id": r.scan_id, "time": r.time, "kind": r.kind, "severity": r.severity,
                     "title": tenant_text(r.title, host) if tenant else r.title,
                     "evidence": scrubbed(r.evidence, host) if tenant else r.evidence} for r in rows]

    def overview(self, who: Principal) -> dict[str, Any]:
        """Return VM counts by risk, per host and per tenant, over the VMs `who` may see.

        A tenant gets no per-host breakdown (`by_host` is None): how its VMs spread over the provider's
        hosts is the provider's."""
        vms = self.list_vms(who)
        tenant_view = who.scope == "tenant"
        def group(key: str) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for vm in vms:
                g = out.setdefault(vm[key] or "(no tenant)", {"vms": 0, **dict.fromkeys(RISKS, 0)})
                g["vms"] += 1
                for r in RISKS:
                    g[r] += 1 if vm["risk"].get(r) else 0
            return out
        return {"view": "tenant" if tenant_view else "operator", "vms": len(vms),
                "by_host": None if tenant_view else group("host"), "by_tenant": group("tenant"),
                "totals": {r: sum(1 for v in vms if v["risk"].get(r)) for r in RISKS}}

    def set_vm(self, vm_id: int, *, tenant_id: int | None = None, high_risk: bool | None = None) -> bool:
        """Assign a VM to a tenant and/or flag it high-risk (operator); False when there is no such VM."""
        with self.session() as s:
            vm = s.get(Vm, vm_id)
            if vm is None:
                return False
            if tenant_id is not None:
                vm.tenant_id = tenant_id
            if high_risk is not None:
                vm.high_risk = high_risk
            return True

    def tenant_exists(self, tenant_id: int) -> bool:
        """Return whether a tenant id exists."""
        with self.session() as s:
            return s.get(Tenant, tenant_id) is not None

    def host_exists(self, host_id: int) -> bool:
        """Return whether a host id exists."""
        with self.session() as s:
            return s.get(Host, host_id) is not None

    def host_name(self, host_id: int) -> str | None:
        """Return a host's name, or None."""
        with self.session() as s:
            h = s.get(Host, host_id)
            return h.name if h else None

    def count_scans(self) -> int:
        """Return how many scans are stored (the bench's loss/duplicate check)."""
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(Scan)) or 0)


def without_nul(value: Any) -> Any:
    """Return a JSON value with every NUL character replaced by U+FFFD in keys and strings.

    Guest strings may hold NULs; PostgreSQL's text and JSONB cannot store them (SQLite could), so the
    same document must not be accepted by one store and refused by the other."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nul(v) for v in value]
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Return the seconds of a duration such as `3600`, `90s`, `30m`, `12h`, `30d` or `2w` (positive)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text or "")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"] if m else 0.0
    if not m or seconds <= 0:
        raise FleetError(f"{text!r} is not a duration: give a positive number with s, m, h, d or w (e.g. 30d)")
    return seconds


def _source_id(record: dict[str, Any]) -> int:
    value = record.get("id")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
        raise FleetError(f"a filter audit row or notice needs its host-side integer id, not {value!r}")
    return value


# what a tenant reads of its VMs' filters, filter changes and notices (whitelists: anything else is the host's)
TENANT_FILTER_KEYS = ("mitigation", "cve", "package", "version", "fixed", "kind", "ports", "reason", "applied_at",
                      "does", "does_not_stop")
TENANT_AUDIT_KEYS = ("at", "action", "mitigation", "cve", "package", "version", "reason")
TENANT_NOTICE_KEYS = ("event", "channel", "created", "status", "attempts", "sent")


def _tenant_record(record: dict[str, Any], keys: tuple[str, ...], host: str) -> dict[str, Any]:
    """Return the whitelisted fields of a host record, host-produced strings scrubbed of host internals."""
    return {k: scrubbed(record[k], host) for k in keys if k in record}


def _host_name_pattern(host: str) -> re.Pattern[str]:
    """Return the pattern of `host` as a whole name in a text (not inside a longer name: `hv-1` not in `hv-12`)."""
    return re.compile(rf"(?<![\w.-]){re.escape(host)}(?![\w-])")


def tenant_text(text: str, host: str = "") -> str:
    """Return a host-produced message as a tenant reads it: host paths, sockets and page-table roots
    scrubbed (`service.report.scrub`) and the name of the VM's host replaced by `<host>`."""
    text = scrub(text)
    return _host_name_pattern(host).sub("<host>", text) if host and host in text else text


def cli_actor() -> str:
    """Return who acts from the command line, for the token audit: `cli USER@HOST`."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers)
        user = str(os.getuid())
    return f"cli {user}@{socket.gethostname()}"


def _actor(s: Session, by: Principal | None) -> dict[str, Any]:
    """Return the audit columns naming who acts: an API caller as `token ID (label)`, else the CLI's user."""
    if by is None or by.token_id is None:
        return {"actor_token_id": None, "actor": cli_actor()[:300]}
    row = s.get(Token, by.token_id)
    label = row.label if row is not None else ""
    return {"actor_token_id": by.token_id, "actor": (f"token {by.token_id}" + (f" ({label})" if label else ""))[:300]}


def token_digest(secret: str) -> str:
    """Return the stored form of a token secret (hex SHA-256)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def risk_of(document: dict[str, Any]) -> dict[str, Any]:
    """Return a scan document's risk counts: running-vulnerable packages, malicious/unknown code, unverifiable."""
    scan = document.get("scan", {}) if isinstance(document, dict) else {}
    report = document.get("report") if isinstance(document, dict) else None
    findings = [f for f in scan.get("findings", []) if isinstance(f, dict)]
    vulnerable = 0
    if isinstance(report, dict):
        vulnerable = sum(1 for v in report.get("vulnerable", []) if isinstance(v, dict) and v.get("running"))
    else:
        vulnerable = sum(1 for f in findings if f.get("kind") == "running-vulnerable")
    code = sum(1 for f in findings if f.get("kind") in CODE_KINDS)
    unverifiable = scan.get("status") == "unverifiable"
    return {"running_vulnerable": vulnerable, "malicious_unknown": code, "unverifiable": 1 if unverifiable else 0,
            "unverified_items": len(scan.get("unverifiable", []) or []), "findings": len(findings)}


def _vm_dict(vm: Vm, host: str, tenant: str | None, tenant_view: bool = False) -> dict[str, Any]:
    """Return a VM as the API gives it; a tenant's copy names no host (`host` None)."""
    return {"id": vm.id, "name": vm.name, "host": None if tenant_view else host, "tenant": tenant,
            "high_risk": vm.high_risk, "latest_scan_id": vm.latest_scan_id, "risk": vm.risk or {}}


TENANT_HIDDEN = ("observations", "timings")  # raw records and host timings: the operator's, not the tenant's


def _scan_dict(row: Scan, with_document: bool = False, tenant_host: str | None = None) -> dict[str, Any]:
    """Return a scan as the API gives it; `tenant_host` (the VM's host name) not None: a tenant's copy,
    without the idempotency key (the sensor makes it from its host name) and with a tenant's document."""
    tenant = tenant_host is not None
    out: dict[str, Any] = {"id": row.id, "vm_id": row.vm_id, "idempotency_key": None if tenant else row.idempotency_key,
                           "started": row.started, "finished": row.finished, "received": row.received,
                           "status": row.status, "methods": row.methods, "summary": row.summary}
    if with_document:
        out["document"] = tenant_document(row.document, tenant_host or "") if tenant else dict(row.document)
    return out


def scrubbed(value: Any, host: str = "") -> Any:
    """Return a JSON value with every string passed through `tenant_text` (keys kept)."""
    if isinstance(value, str):
        return tenant_text(value, host)
    if isinstance(value, dict):
        return {k: scrubbed(v, host) for k, v in value.items()}
    if isinstance(value, list):
        return [scrubbed(v, host) for v in value]
    return value


SCAN_MESSAGES = ("findings", "unverifiable", "error", "errors")  # host-produced text in `scan --json`'s document


def tenant_document(document: dict[str, Any], host: str = "") -> dict[str, Any]:
    """Return what a tenant reads of a stored scan document: no raw observations or host timings, and the
    host-produced messages (finding titles and evidence, unverifiable items, errors) scrubbed of host
    internals (RAM files, QMP sockets, /run/nephoscope paths, page-table roots, the name `host` of the
    VM's host). Guest data (processes, binaries) stays as the guest has it; the operator's view is the
    document as pushed."""
    doc = {k: v for k, v in document.items() if k not in TENANT_HIDDEN}
    if isinstance(doc.get("scan"), dict):
        doc["scan"] = {k: scrubbed(v, host) if k in SCAN_MESSAGES else v for k, v in doc["scan"].items()
                       if k not in TENANT_HIDDEN}
    report = doc.get("report")
    if isinstance(report, dict):  # built by service.report (already scrubbed there); again, for older sensors
        report = dict(report)
        for key in ("code", "behaviour"):
            if isinstance(report.get(key), list):
                report[key] = [{**item, "title": scrubbed(item.get("title", ""), host)} if isinstance(item, dict)
                               else item for item in report[key]]
        if "unverified" in report:
            report["unverified"] = scrubbed(report["unverified"], host)
        doc["report"] = report
    if "report_error" in doc:
        doc["report_error"] = scrubbed(doc["report_error"], host)
    return doc
