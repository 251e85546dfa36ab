"""The policy library: (package, vulnerable version range, CVE) -> a host-side mitigation, as validated data.

Built-in entries are in knowledge/rules/filters.toml; a provider adds files or directories of `*.toml` in the
same schema (an entry with the same id replaces the built-in one). Versions compare in Debian (dpkg) order.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from debian.debian_support import Version

from nephoscope.core.errors import NephoscopeError

BUILTIN = Path(__file__).resolve().parents[1] / "knowledge" / "rules" / "filters.toml"
ENV = "NEPHOSCOPE_POLICY"  # extra policy files or directories, separated by ':'
NFT_KINDS = ("nft-close", "nft-allow", "nft-rate", "nft-connlimit")
KINDS = (*NFT_KINDS, "haproxy-h2")
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_VERSION = {"type": "string", "minLength": 1, "pattern": r"^[0-9][A-Za-z0-9.+~:-]*$"}
_COUNT = {"type": "integer", "minimum": 1, "maximum": 1000000}
PARAMS: dict[str, dict[str, Any]] = {  # per kind: the parameters it takes (all required)
    "nft-close": {"type": "object", "additionalProperties": False, "properties": {}},
    "nft-allow": {"type": "object", "additionalProperties": False, "required": ["allow"], "properties": {
        "allow": {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": r"^[0-9a-fA-F.:/]+$"}}}},
    "nft-rate": {"type": "object", "additionalProperties": False, "required": ["new_per_second", "burst"],
                 "properties": {"new_per_second": _COUNT, "burst": _COUNT}},
    "nft-connlimit": {"type": "object", "additionalProperties": False, "required": ["max_per_source"],
                      "properties": {"max_per_source": _COUNT, "new_per_minute": _COUNT}},
    "haproxy-h2": {"type": "object", "additionalProperties": False,
                   "required": ["max_concurrent_streams", "streams_per_conn_10s", "upstream"],
                   "properties": {"max_concurrent_streams": _COUNT, "streams_per_conn_10s": _COUNT,
                                  "upstream": {"enum": ["h1", "h2"]}}},
}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "nephoscope filter policy",
    "type": "object", "additionalProperties": False, "required": ["schema", "mitigation"],
    "properties": {
        "schema": {"const": 1},
        "mitigation": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["id", "cve", "package", "fixed", "kind", "ports", "params", "does", "does_not_stop",
                         "source"],
            "properties": {
                "id": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9-]{0,62}$"},
                "cve": {"type": "string", "pattern": r"^CVE-[0-9]{4}-[0-9]{4,}$"},
                "package": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9+.-]+$"},
                "introduced": _VERSION, "fixed": _VERSION,
                "kind": {"enum": list(KINDS)},
                "ports": {"type": "array", "minItems": 1, "uniqueItems": True, "items": _PORT},
                "params": {"type": "object"},
                "does": {"type": "string", "minLength": 10},
                "does_not_stop": {"type": "string", "minLength": 10},
                "source": {"type": "string", "minLength": 5},
            },
            "allOf": [{"if": {"properties": {"kind": {"const": k}}}, "then": {"properties": {"params": s}}}
                      for k, s in PARAMS.items()],
        }},
    },
}


class PolicyError(NephoscopeError):
    """A policy file is unreadable or does not fit the schema."""


@dataclass(frozen=True, slots=True)
class Mitigation:
    """One policy entry: which running package versions it covers, the filter, and its honest limits."""

    id: str
    cve: str
    package: str
    fixed: str
    kind: str
    ports: tuple[int, ...]
    params: dict[str, Any] = field(hash=False)
    does: str = ""
    does_not_stop: str = ""
    source: str = ""
    introduced: str = ""
    origin: str = ""  # the file it came from

    def covers(self, version: str) -> bool:
        """Return whether `version` (Debian order) is in [introduced, fixed)."""
        try:
            v = Version(version)
            return (not self.introduced or v >= Version(self.introduced)) and v < Version(self.fixed)
        except ValueError:
            return False

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"id": self.id, "cve": self.cve, "package": self.package, "introduced": self.introduced,
                "fixed": self.fixed, "kind": self.kind, "ports": list(self.ports), "params": self.params,
                "does": self.does, "does_not_stop": self.does_not_stop, "source": self.source,
                "origin": self.origin}


def validate(data: Any, origin: str) -> list[Mitigation]:
    """Return the mitigations of one parsed policy document, or raise PolicyError naming the first problem."""
    import jsonschema

    try:
        jsonschema.validate(data, SCHEMA)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top)"
        raise PolicyError(f"{origin}: {where}: {exc.message}; see docs/filters.md for the policy schema") from None
    out, seen = [], set()
    for m in data["mitigation"]:
        if m["id"] in seen:
            raise PolicyError(f"{origin}: mitigation id {m['id']!r} appears twice")
        seen.add(m["id"])
        for key in ("introduced", "fixed"):
            if key in m:
                try:
                    Version(m[key])
                except ValueError as exc:
                    raise PolicyError(f"{origin}: {m['id']}: {key} {m[key]!r} is not a Debian version") from exc
        if m.get("introduced") and Version(m["introduced"]) >= Version(m["fixed"]):
            raise PolicyError(f"{origin}: {m['id']}: introduced {m['introduced']} is not below fixed {m['fixed']}")
        out.append(Mitigation(m["id"], m["cve"], m["package"], m["fixed"], m["kind"], tuple(m["ports"]),
                              dict(m["params"]), m["does"].strip(), m["does_not_stop"].strip(), m["source"].strip(),
                              m.get("introduced", ""), origin))
    return out


def load_file(path: Path) -> list[Mitigation]:
    """Return the validated mitigations of one TOML policy file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"cannot read policy {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy {path} is not valid TOML: {exc}") from exc
    return validate(data, str(path))


def load_policy(extra: list[Path] | None = None, builtin: bool = True) -> dict[str, Mitigation]:
    """Return id -> mitigation: the built-in library, then NEPHOSCOPE_POLICY, then `extra` (files or dirs)."""
    paths = [BUILTIN] if builtin else []
    paths += [Path(p) for p in os.environ.get(ENV, "").split(":") if p]
    paths += list(extra or [])
    out: dict[str, Mitigation] = {}
    for p in paths:
        files = sorted(p.glob("*.toml")) if p.is_dir() else [p]
        for f in files:
            for m in load_file(f):
                out[m.id] = m
    return out
