"""Tenants: which VMs belong to which customer, and how that customer is told (e-mail, signed webhook).

The file is TOML (default `$NEPHOSCOPE_TENANTS`, else `~/.config/nephoscope/tenants.toml`), validated on
load: unknown keys, wrong types, a VM claimed by two tenants, a webhook without a secret or a recipient
with a line break are errors that name the tenant and the key. Secrets may be given inline or as
`secret_file`/`password_file` paths (read at load, never printed).

    [smtp]                       # default relay for every tenant (each key may be overridden per tenant)
    host = "localhost"
    port = 25
    sender = "nephoscope@provider.example"

    [tenants.acme]
    vms = ["web-1", "db-*"]      # VM names as nephoscope stores them; shell-style globs allowed
    emails = ["secops@acme.example"]
    webhook = "https://hooks.acme.example/nephoscope"
    secret_file = "/etc/nephoscope/acme.secret"
    [tenants.acme.smtp]
    port = 2525
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nephoscope.core.errors import NephoscopeError

MIN_SECRET = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_EMAIL = re.compile(r"[^@\s<>,;\"]+@[^@\s<>,;\"]+")
TENANT_KEYS = {"vms", "emails", "webhook", "secret", "secret_file", "smtp"}
SMTP_KEYS = {"host", "port", "sender", "starttls", "ssl", "username", "password", "password_file", "timeout"}


class TenantError(NephoscopeError):
    """The tenants file is missing, unreadable or invalid."""


@dataclass(frozen=True, slots=True)
class Smtp:
    """How to reach an SMTP relay."""

    host: str = "localhost"
    port: int = 25
    sender: str = "nephoscope@localhost"
    starttls: bool = False
    ssl: bool = False
    username: str = ""
    password: str = field(default="", repr=False)
    timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class Tenant:
    """One customer: its VMs (names or globs), its recipients and its webhook with the signing secret."""

    name: str
    vms: tuple[str, ...]
    emails: tuple[str, ...] = ()
    webhook: str = ""
    secret: str = field(default="", repr=False)
    smtp: Smtp = field(default_factory=Smtp)

    def owns(self, vm: str) -> bool:
        """Return whether `vm` is one of this tenant's VMs."""
        return any(fnmatch.fnmatchcase(vm, pattern) for pattern in self.vms)

    def describe(self) -> dict[str, Any]:
        """Return what an operator may see of the tenant (no secret, no password)."""
        return {"tenant": self.name, "vms": list(self.vms), "emails": list(self.emails), "webhook": self.webhook,
                "secret": "set" if self.secret else "", "smtp": f"{self.smtp.host}:{self.smtp.port}"}


@dataclass(frozen=True, slots=True)
class Tenants:
    """Every tenant of the file, and the file it came from."""

    tenants: tuple[Tenant, ...]
    path: Path | None = None

    def find_tenant(self, vm: str) -> Tenant | None:
        """Return the tenant owning `vm`, or None; raise TenantError when globs of two tenants match it."""
        owners = [t for t in self.tenants if t.owns(vm)]
        if len(owners) > 1:  # telling the wrong customer leaks another tenant's data: refuse
            raise TenantError(f"VM {vm!r} matches tenants {', '.join(t.name for t in owners)}; make the globs disjoint")
        return owners[0] if owners else None

    def get_tenant(self, name: str) -> Tenant:
        """Return the tenant called `name` or raise TenantError."""
        for t in self.tenants:
            if t.name == name:
                return t
        raise TenantError(f"no tenant {name!r} in {self.path or 'the tenants file'}")


def default_path() -> Path:
    """Return the tenants file ($NEPHOSCOPE_TENANTS, else $XDG_CONFIG_HOME or ~/.config, /nephoscope/tenants.toml)."""
    if os.environ.get("NEPHOSCOPE_TENANTS"):
        return Path(os.environ["NEPHOSCOPE_TENANTS"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "nephoscope" / "tenants.toml"


def _secret(where: str, table: dict[str, Any], key: str, base: Path | None) -> str:
    """Return an inline secret or the stripped content of its `<key>_file` (relative to the tenants file)."""
    inline, ref = table.get(key), table.get(f"{key}_file")
    if inline is not None and ref is not None:
        raise TenantError(f"{where}: give {key} or {key}_file, not both")
    if ref is not None:
        if not isinstance(ref, str):
            raise TenantError(f"{where}: {key}_file must be a path string")
        path = Path(ref) if Path(ref).is_absolute() or base is None else base / ref
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise TenantError(f"{where}: cannot read {key}_file {path}: {exc.strerror}") from exc
    if inline is not None and not isinstance(inline, str):
        raise TenantError(f"{where}: {key} must be a string")
    return inline or ""


def _smtp(where: str, raw: Any, default: Smtp, base: Path | None) -> Smtp:
    if raw is None:
        return default
    if not isinstance(raw, dict):
        raise TenantError(f"{where}: smtp must be a table")
    unknown = set(raw) - SMTP_KEYS
    if unknown:
        raise TenantError(f"{where}: unknown smtp key(s) {', '.join(sorted(unknown))}; "
                          f"use {', '.join(sorted(SMTP_KEYS))}")
    types = {"host": str, "port": int, "sender": str, "starttls": bool, "ssl": bool, "username": str,
             "timeout": (int, float)}
    for key, kind in types.items():
        if key in raw and (not isinstance(raw[key], kind) or (isinstance(raw[key], bool) and kind is int)):
            raise TenantError(f"{where}: smtp.{key} has the wrong type ({type(raw[key]).__name__})")
    values = {k: raw[k] for k in types if k in raw}
    if "password" in raw or "password_file" in raw:
        values["password"] = _secret(f"{where}.smtp", raw, "password", base)
    out = replace(default, **values)
    if not 0 < out.port < 65536:
        raise TenantError(f"{where}: smtp.port {out.port} is not a TCP port")
    if not _EMAIL.fullmatch(out.sender):
        raise TenantError(f"{where}: smtp.sender {out.sender!r} is not an e-mail address")
    if out.ssl and out.starttls:
        raise TenantError(f"{where}: smtp.ssl and smtp.starttls exclude each other")
    return out


def _tenant(name: str, raw: Any, smtp: Smtp, base: Path | None) -> Tenant:
    where = f"tenant {name!r}"
    if not _NAME.fullmatch(name):
        raise TenantError(f"{where}: a tenant name is 1-64 letters, digits, '.', '_' or '-'")
    if not isinstance(raw, dict):
        raise TenantError(f"{where}: must be a table")
    unknown = set(raw) - TENANT_KEYS
    if unknown:
        raise TenantError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(TENANT_KEYS))}")
    vms, emails = raw.get("vms"), raw.get("emails", [])
    if not isinstance(vms, list) or not vms or not all(isinstance(v, str) and v.strip() for v in vms):
        raise TenantError(f"{where}: vms must be a non-empty list of VM names or globs")
    if not isinstance(emails, list) or not all(isinstance(e, str) and _EMAIL.fullmatch(e) for e in emails):
        raise TenantError(f"{where}: emails must be a list of plain addresses (user@domain, no name, no line break)")
    webhook = raw.get("webhook", "")
    if not isinstance(webhook, str) or (webhook and not re.fullmatch(r"https?://[^\s]+", webhook)):
        raise TenantError(f"{where}: webhook must be an http:// or https:// URL")
    secret = _secret(where, raw, "secret", base)
    if webhook and len(secret) < MIN_SECRET:
        raise TenantError(f"{where}: a webhook needs a secret of at least {MIN_SECRET} characters to sign with")
    if not emails and not webhook:
        raise TenantError(f"{where}: give emails, a webhook, or both; otherwise nobody is told")
    return Tenant(name, tuple(vms), tuple(emails), webhook, secret, _smtp(where, raw.get("smtp"), smtp, base))


def parse_tenants(text: str, path: Path | None = None) -> Tenants:
    """Return the validated tenants of a TOML text (`path` names it in errors and anchors *_file paths)."""
    where = str(path or "the tenants file")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TenantError(f"{where} is not valid TOML: {exc}") from exc
    unknown = set(raw) - {"smtp", "tenants"}
    if unknown:
        raise TenantError(f"{where}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
                          "use [smtp] and [tenants.NAME]")
    base = path.parent if path is not None else None
    smtp = _smtp("[smtp]", raw.get("smtp"), Smtp(), base)
    tables = raw.get("tenants", {})
    if not isinstance(tables, dict) or not tables:
        raise TenantError(f"{where}: no [tenants.NAME] table")
    tenants = tuple(_tenant(name, t, smtp, base) for name, t in tables.items())
    owner: dict[str, str] = {}
    for t in tenants:
        for pattern in t.vms:
            if pattern in owner and owner[pattern] != t.name:
                raise TenantError(f"{where}: VM {pattern!r} is claimed by tenants {owner[pattern]!r} and {t.name!r}")
            owner[pattern] = t.name
    return Tenants(tenants, path)


def load_tenants(path: Path | None = None) -> Tenants:
    """Return the validated tenants file (default: `default_path()`), or raise TenantError."""
    path = path or default_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TenantError(f"cannot read the tenants file {path}: {exc.strerror}; see docs/notices.md") from exc
    return parse_tenants(text, path)


def find_tenants(path: Path | None = None) -> Tenants | None:
    """Return the tenants file when one exists (notices are configured), else None; an invalid one raises."""
    path = path or default_path()
    return load_tenants(path) if path.exists() else None
