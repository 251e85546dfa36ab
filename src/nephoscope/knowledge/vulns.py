"""Vulnerability knowledge: which Debian source versions fix which CVEs, in exact dpkg version order.

Every feed (changelogs of .debs, the Debian Security Tracker, OSV) becomes the same `VulnRecord`:
a source package, a CVE, the range [introduced, fixed) of vulnerable versions in one release. A
version is vulnerable to a CVE when any record for its source says so; `fixed=None` means no fix yet.
"""

from __future__ import annotations

import bisect
import functools
import os
import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nephoscope.core.errors import KnowledgeError
from nephoscope.core.paths import cache_root

DEFAULT_RELEASE = "bookworm"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS fixes(
  release TEXT NOT NULL, source TEXT NOT NULL, cve TEXT NOT NULL, introduced TEXT NOT NULL, fixed TEXT,
  urgency TEXT NOT NULL, date TEXT NOT NULL, origin TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS fixes_source ON fixes(release, source);
CREATE TABLE IF NOT EXISTS binaries(package TEXT PRIMARY KEY, source TEXT NOT NULL);
"""

VersionKey = tuple[int, tuple, tuple]


def _part_key(text: str) -> tuple:
    """Return a tuple ordering like dpkg's verrevcmp: non-digit runs by weight, digit runs by value."""
    out: list = []
    i, n = 0, len(text)
    while True:
        weights = []
        while i < n and not text[i].isdigit():
            c = text[i]
            weights.append(-1 if c == "~" else ord(c) if c.isalpha() else ord(c) + 256)
            i += 1
        weights.append(0)  # end of run: sorts after "~", before any character
        out.append(tuple(weights))
        j = i
        while i < n and text[i].isdigit():
            i += 1
        out.append(int(text[j:i] or 0))
        if i >= n:
            out.append((0,))  # an exhausted string continues as empty runs
            return tuple(out)


@functools.lru_cache(maxsize=65536)
def version_key(version: str) -> VersionKey:
    """Return a sort key giving Debian (dpkg) version order: epoch, upstream, revision, with `~`."""
    v = version.strip()
    if not v or any(c.isspace() for c in v):
        raise KnowledgeError(f"{version!r} is not a Debian version")
    epoch, colon, rest = v.partition(":")
    if not colon:
        epoch, rest = "0", v
    if not epoch.isdigit() or not rest:
        raise KnowledgeError(f"{version!r} is not a Debian version (bad epoch)")
    upstream, dash, revision = rest.rpartition("-")
    if not dash:
        upstream, revision = rest, ""
    return int(epoch), _part_key(upstream), _part_key(revision)


def compare_versions(a: str, b: str) -> int:
    """Return -1, 0 or 1 as Debian version `a` sorts before, equal to or after `b`."""
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)


@dataclass(frozen=True, slots=True)
class VulnRecord:
    """One CVE of one source package: versions in [introduced, fixed) of `release` are vulnerable."""

    source: str
    cve: str
    fixed: str | None  # None: no fixed version yet
    introduced: str = "0"
    urgency: str = ""
    date: str = ""
    origin: str = ""  # changelog | debian-tracker | osv
    release: str = DEFAULT_RELEASE

    def affects(self, version: str) -> bool:
        """Return whether `version` lies in this record's vulnerable range."""
        key = version_key(version)
        if self.introduced not in ("", "0") and key < version_key(self.introduced):
            return False
        return self.fixed is None or key < version_key(self.fixed)


@dataclass(slots=True)
class Affected:
    """One CVE affecting a running or installed version, with the version that fixes it."""

    cve: str
    fixed: str | None
    urgency: str = ""
    origins: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class VulnStats:
    """Sizes of the vulnerability DB."""

    path: str
    records: int
    sources: int
    cves: int
    by_origin: dict[str, int]
    binaries: int


class VulnIndex:
    """Records of one release grouped by source and sorted by fixed version, for fast matching."""

    def __init__(self, records: Iterable[VulnRecord]) -> None:
        groups: dict[str, list[VulnRecord]] = defaultdict(list)
        for r in records:
            groups[r.source].append(r)
        self._unfixed: dict[str, list[VulnRecord]] = {}
        self._keys: dict[str, list[VersionKey]] = {}
        self._fixed: dict[str, list[VulnRecord]] = {}
        for source, recs in groups.items():
            fixed = sorted((r for r in recs if r.fixed is not None), key=lambda r: version_key(r.fixed or ""))
            self._fixed[source] = fixed
            self._keys[source] = [version_key(r.fixed or "") for r in fixed]
            self._unfixed[source] = [r for r in recs if r.fixed is None]

    def sources(self) -> set[str]:
        """Return the source packages with any record."""
        return set(self._fixed)

    def affecting(self, source: str, version: str) -> list[Affected]:
        """Return the CVEs affecting `source` at `version`, each with the highest fixed version seen."""
        keys = self._keys.get(source)
        if keys is None:
            return []
        key = version_key(version)
        start = bisect.bisect_right(keys, key)  # records whose fixed version sorts after `version`
        out: dict[str, Affected] = {}
        for r in [*self._fixed[source][start:], *self._unfixed[source]]:
            if r.introduced not in ("", "0") and key < version_key(r.introduced):
                continue
            hit = out.setdefault(r.cve, Affected(r.cve, r.fixed, r.urgency))
            if hit.fixed is not None and (r.fixed is None or version_key(r.fixed) > version_key(hit.fixed)):
                hit.fixed = r.fixed
            hit.urgency = hit.urgency or r.urgency
            if r.origin not in hit.origins:
                hit.origins.append(r.origin)
        return sorted(out.values(), key=lambda a: a.cve)


def default_path() -> Path:
    """Return the vulnerability DB path: NEPHOSCOPE_VULNS, else `cache_root()/vulns.sqlite`."""
    return Path(os.environ.get("NEPHOSCOPE_VULNS") or cache_root() / "vulns.sqlite")


class VulnDB:
    """The SQLite store of vulnerability records and the binary → source package map."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn

    @classmethod
    def open(cls, path: Path | None = None) -> VulnDB:
        """Open (creating if needed) the DB at `path`, default `default_path()`."""
        path = Path(path) if path is not None else default_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=60)
            conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise KnowledgeError(f"cannot open the vulnerability DB {path}: {exc}; delete it and run "
                                 "`nephoscope vulns update`") from exc
        return cls(path, conn)

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    def replace(self, origin: str, records: list[VulnRecord], binaries: dict[str, str] | None = None) -> int:
        """Replace `origin`'s records for every (release, source) in `records` atomically; return the count."""
        for r in records:
            version_key(r.fixed) if r.fixed else None
            version_key(r.introduced) if r.introduced not in ("", "0") else None
        scopes = {(r.release, r.source) for r in records}
        try:
            with self._conn:
                self._conn.executemany("DELETE FROM fixes WHERE origin=? AND release=? AND source=?",
                                       [(origin, rel, src) for rel, src in scopes])
                self._conn.executemany("INSERT INTO fixes VALUES (?,?,?,?,?,?,?,?)",
                                       [(r.release, r.source, r.cve, r.introduced or "0", r.fixed, r.urgency,
                                         r.date, origin) for r in records])
                self._conn.executemany("INSERT OR REPLACE INTO binaries VALUES (?,?)", (binaries or {}).items())
        except sqlite3.Error as exc:
            raise KnowledgeError(f"cannot write {self.path}: {exc}; nothing was imported") from exc
        return len(records)

    def records(self, release: str = DEFAULT_RELEASE, source: str | None = None) -> list[VulnRecord]:
        """Return the records of one release (and optionally one source package)."""
        query = "SELECT source, cve, fixed, introduced, urgency, date, origin, release FROM fixes WHERE release=?"
        args: tuple = (release,)
        if source is not None:
            query, args = query + " AND source=?", (release, source)
        return [VulnRecord(*row) for row in self._conn.execute(query, args)]

    def index(self, release: str = DEFAULT_RELEASE) -> VulnIndex:
        """Return a matching index over one release's records."""
        return VulnIndex(self.records(release))

    def binaries(self) -> dict[str, str]:
        """Return the known binary package → source package map."""
        return dict(self._conn.execute("SELECT package, source FROM binaries"))

    def stats(self) -> VulnStats:
        """Return the DB's sizes."""
        one = lambda sql: int(self._conn.execute(sql).fetchone()[0])  # noqa: E731
        by_origin = dict(self._conn.execute("SELECT origin, count(*) FROM fixes GROUP BY origin"))
        return VulnStats(str(self.path), one("SELECT count(*) FROM fixes"),
                         one("SELECT count(DISTINCT source) FROM fixes"), one("SELECT count(DISTINCT cve) FROM fixes"),
                         by_origin, one("SELECT count(*) FROM binaries"))
