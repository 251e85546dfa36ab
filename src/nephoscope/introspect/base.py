"""The one interface every introspection method implements."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Protocol

from nephoscope.core.payloads import Payload, Unverifiable
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.hypervisor.target import VmTarget

METHOD_NAMES = ("agent", "driver", "inspect", "checkpoint", "arch", "trap")


class Method(Protocol):
    """An introspection method: `collect` yields observations with provenance and a verdict."""

    name: str

    def collect(self, vm: VmTarget) -> Iterator[Observation]:
        """Yield what this method sees of `vm`; failures become `unverifiable` observations."""
        ...


def observe(method: str, vm: VmTarget, kind: str, key: str, payload: Payload | dict[str, Any],
            verdict: Verdict, reason: str = "") -> Observation:
    """Build an observation stamped with provenance (method, VM, now).

    `payload` is the kind's typed payload (`core.payloads`); a dict is read as its JSON form."""
    return Observation(kind=kind, key=key, payload=payload,  # type: ignore[arg-type]
                       provenance=Provenance(method, vm.name, time.time()), verdict=verdict, reason=reason)


def unverifiable(method: str, vm: VmTarget, what: str, reason: str) -> Observation:
    """Build the observation that says `what` could not be obtained, and why."""
    return observe(method, vm, "unverifiable", what, Unverifiable(what), Verdict.UNVERIFIABLE, reason)
