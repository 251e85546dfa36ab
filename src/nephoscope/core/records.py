"""Typed records every method produces: observations with provenance and a verdict, and findings."""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from nephoscope.core import payloads
from nephoscope.core.payloads import Payload

VIA_KEY = "analysis"  # the JSON key of Observation.via


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
    """One fact a method saw (a process, a mapping, a binary identity, a module, ...).

    `payload` is the typed record of `kind` (`core.payloads`); a plain dict given instead is read with
    `payloads.parse` (the compatibility path: a dict that does not fit becomes `Details` with its problem).
    `via` names the analysis a method ran to see it (checkpoint: "inspect", "arch" or "agent-in-clone"
    on its copy); JSON keeps it as the record's "analysis" key."""

    kind: str
    key: str
    payload: Payload
    provenance: Provenance
    verdict: Verdict
    reason: str = ""
    via: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.payload, dict):
            data = dict(self.payload)
            via = data.pop(VIA_KEY, None)
            if isinstance(via, str) and not self.via:
                self.via = via
            self.payload = payloads.parse(self.kind, data)
        payloads.check_kind(self.kind, self.payload)

    @property
    def data(self) -> dict[str, Any]:
        """Return the JSON dict of this observation's payload (with its "analysis" tag): the raw record."""
        out = self.payload.to_json()
        if self.via:
            out[VIA_KEY] = self.via
        return out

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"kind": self.kind, "key": self.key, "data": self.data, "provenance": asdict(self.provenance),
                "verdict": str(self.verdict), "reason": self.reason}


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
