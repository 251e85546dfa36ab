"""Debian package relations: Depends-style fields parsed into AND-groups of OR-alternatives."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from debian.debian_support import Version

_DEP_RE = re.compile(r"^\s*([a-z0-9][a-z0-9+.\-]*)(?::[a-z0-9]+)?\s*(?:\(\s*(<<|<=|=|>=|>>)\s*([^)\s]+)\s*\))?")


@dataclass(frozen=True, slots=True)
class Relation:
    """One alternative of a Depends field: a name and an optional version constraint."""

    name: str
    op: str | None = None
    version: str | None = None

    def allows(self, version: str) -> bool:
        """Return whether `version` satisfies this relation's constraint (Debian order)."""
        if self.op is None or self.version is None:
            return True
        have, want = Version(version), Version(self.version)
        return {
            "<<": have < want,
            "<=": have <= want,
            "=": have == want,
            ">=": have >= want,
            ">>": have > want,
        }[self.op]

    def __str__(self) -> str:
        return f"{self.name} ({self.op} {self.version})" if self.op else self.name


def parse_depends(field: str) -> list[list[Relation]]:
    """Parse a Depends-style field into AND-groups of OR-alternatives."""
    groups: list[list[Relation]] = []
    for group in field.split(","):
        alts = []
        for alt in group.split("|"):
            m = _DEP_RE.match(alt)
            if m:
                alts.append(Relation(m.group(1), m.group(2), m.group(3)))
        if alts:
            groups.append(alts)
    return groups


def depends_of(record: Mapping[str, str]) -> list[list[Relation]]:
    """Return the Pre-Depends and Depends groups of a package record."""
    fields = [record.get("Pre-Depends", ""), record.get("Depends", "")]
    return [g for f in fields if f for g in parse_depends(f)]
