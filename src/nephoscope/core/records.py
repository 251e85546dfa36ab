"""Typed records every method produces: observations with provenance and a verdict, and findings."""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any


class Verdict(enum.StrEnum):
    """How far an observation can be trusted."""

    VERIFIED = "verified"  # derived from hardware state or cross-checked
    REPORTED = "reported"  # as the guest OS or agent claims it
    UNVERIFIABLE = "unverifiable"  # could not be obtained; `reason` says why


@dataclass(frozen=True, slots=True)
class Provenance:
    """Which method saw something, on which VM, when."""

    method: str
    vm: str
    time: float = field(default_factory=time.time)


@dataclass(slots=True)
class Observation:
    """One fact a method saw (a process, a mapping, a binary identity, a module, ...)."""

    kind: str
    key: str
    data: dict[str, Any]
    provenance: Provenance
    verdict: Verdict
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        d = asdict(self)
        d["verdict"] = str(self.verdict)
        return d


@dataclass(slots=True)
class Finding:
    """Something a user should act on, with the evidence behind it."""

    kind: str
    severity: str
    title: str
    vm: str
    evidence: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)
