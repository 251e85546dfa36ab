"""The central store's tables (SQLAlchemy): tenants own VMs, hosts run them, sensors push scans, tokens carry scopes.

One set of models serves PostgreSQL (the fleet) and SQLite (one host); Alembic migrations create them
(`migrations/`), and `create_all` is never used outside tests of the migrations themselves.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JsonType = JSON().with_variant(JSONB(), "postgresql")
SCOPES = ("operator", "tenant", "sensor")


class Base(DeclarativeBase):
    """The declarative base of every fleet table."""


class Tenant(Base):
    """A customer: owns VMs, reads only their reports, findings and notices."""

    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)


class Host(Base):
    """A hypervisor host running a sensor."""

    __tablename__ = "hosts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)


class Vm(Base):
    """A VM as the fleet knows it: on a host, owned by a tenant (or none yet), its latest scan and risk."""

    __tablename__ = "vms"
    __table_args__ = (UniqueConstraint("host_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"))
    name: Mapped[str] = mapped_column(String(300))
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), nullable=True)
    high_risk: Mapped[bool] = mapped_column(Boolean, default=False)
    latest_scan_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    risk: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    response_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # last filters/notices push


class Token(Base):
    """An API token (stored as its SHA-256 only) with one scope, bound to a tenant or a host when scoped."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), nullable=True)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id"), nullable=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    created: Mapped[float] = mapped_column(Float)
    expires: Mapped[float | None] = mapped_column(Float, nullable=True)  # Unix time; None: never
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # Unix time; None: not revoked
    last_used: Mapped[float | None] = mapped_column(Float, nullable=True)  # Unix time, to the minute (throttled)


class TokenAuditRow(Base):
    """One change to a token (issued, revoked): when, by whom (an operator token or the CLI), whether forced."""

    __tablename__ = "token_audit"
    __table_args__ = (Index("token_audit_token", "token_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("tokens.id"))
    at: Mapped[float] = mapped_column(Float)
    action: Mapped[str] = mapped_column(String(32))
    actor_token_id: Mapped[int | None] = mapped_column(ForeignKey("tokens.id"), nullable=True)  # None: the CLI
    actor: Mapped[str] = mapped_column(String(300))  # "token 3 (label)" or "cli USER@HOST"
    forced: Mapped[bool] = mapped_column(Boolean, default=False)


class Scan(Base):
    """One pushed scan: the scan document as `nephoscope scan --json` writes it, plus its observations."""

    __tablename__ = "scans"
    __table_args__ = (Index("scans_vm_received", "vm_id", "id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id"))
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    started: Mapped[float] = mapped_column(Float)
    finished: Mapped[float] = mapped_column(Float)
    received: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(32))
    methods: Mapped[list[str]] = mapped_column(JsonType)
    summary: Mapped[dict[str, Any]] = mapped_column(JsonType)
    document: Mapped[dict[str, Any]] = mapped_column(JsonType)


class FindingRow(Base):
    """One finding of a scan, kept apart for findings-over-time queries."""

    __tablename__ = "findings"
    __table_args__ = (Index("findings_vm_time", "vm_id", "time"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scan_id: Mapped[int] = mapped_column(ForeignKey("scans.id", ondelete="CASCADE"))
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id"))
    time: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(100))
    severity: Mapped[str] = mapped_column(String(32))
    title: Mapped[str] = mapped_column(Text)
    evidence: Mapped[list[dict[str, Any]]] = mapped_column(JsonType)


class FilterRow(Base):
    """A filter in force for a VM as its host's sensor last reported it (a snapshot, replaced on each push)."""

    __tablename__ = "vm_filters"
    __table_args__ = (Index("vm_filters_vm", "vm_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id"))
    mitigation: Mapped[str] = mapped_column(String(200))
    cve: Mapped[str] = mapped_column(String(100))
    applied_at: Mapped[float] = mapped_column(Float)
    data: Mapped[dict[str, Any]] = mapped_column(JsonType)  # the host's record as `filters list --json` gives it


class FilterAuditRow(Base):
    """One filter change of a VM (applied, removed, expired, collected) from its host's audit log."""

    __tablename__ = "vm_filter_audit"
    __table_args__ = (UniqueConstraint("vm_id", "source_id"), Index("vm_filter_audit_vm_at", "vm_id", "at"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id"))
    source_id: Mapped[int] = mapped_column(Integer)  # the row's id in the host's audit log
    at: Mapped[float] = mapped_column(Float)
    action: Mapped[str] = mapped_column(String(32))
    cve: Mapped[str] = mapped_column(String(100))
    data: Mapped[dict[str, Any]] = mapped_column(JsonType)


class NoticeRow(Base):
    """One notice sent (or being sent) to a VM's tenant on one channel, with its delivery status, from its host."""

    __tablename__ = "vm_notices"
    __table_args__ = (UniqueConstraint("vm_id", "source_id"), Index("vm_notices_vm_created", "vm_id", "created"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id"))
    source_id: Mapped[int] = mapped_column(Integer)  # the notice's id in the host's notice log
    created: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JsonType)
