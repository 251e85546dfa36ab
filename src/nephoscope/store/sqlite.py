"""The embedded scan store: every scan's observations and findings, with history per VM."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nephoscope.core import payloads
from nephoscope.core.errors import NephoscopeError
from nephoscope.core.paths import store_path
from nephoscope.core.records import VIA_KEY, Finding, Observation, Provenance, Verdict

SCHEMA = """
CREATE TABLE IF NOT EXISTS scans (
  id INTEGER PRIMARY KEY, vm TEXT NOT NULL, started REAL NOT NULL, finished REAL NOT NULL,
  methods TEXT NOT NULL, summary TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS scans_vm ON scans(vm, id);
CREATE TABLE IF NOT EXISTS observations (
  scan_id INTEGER NOT NULL REFERENCES scans(id) ON DELETE CASCADE, method TEXT NOT NULL, kind TEXT NOT NULL,
  key TEXT NOT NULL, verdict TEXT NOT NULL, reason TEXT NOT NULL, time REAL NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS observations_scan ON observations(scan_id, kind);
CREATE TABLE IF NOT EXISTS findings (
  scan_id INTEGER NOT NULL REFERENCES scans(id) ON DELETE CASCADE, kind TEXT NOT NULL, severity TEXT NOT NULL,
  title TEXT NOT NULL, evidence TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS findings_scan ON findings(scan_id);
"""


class StoreError(NephoscopeError):
    """The scan store could not be read or written."""


@dataclass(frozen=True, slots=True)
class ScanRecord:
    """One stored scan."""

    id: int
    vm: str
    started: float
    finished: float
    methods: list[str]
    summary: dict[str, Any]


class Store:
    """SQLite-backed history of scans."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or store_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30)
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the scan store {self.path}: {exc}; move it aside to start afresh") from exc

    def save_scan(self, vm: str, methods: list[str], observations: list[Observation], findings: list[Finding],
                  summary: dict[str, Any], started: float, finished: float | None = None) -> int:
        """Store one scan atomically and return its id."""
        with self.db:
            cur = self.db.execute(
                "INSERT INTO scans(vm, started, finished, methods, summary) VALUES (?, ?, ?, ?, ?)",
                (vm, started, finished or time.time(), json.dumps(methods), json.dumps(summary, default=str)))
            scan_id = int(cur.lastrowid or 0)
            self.db.executemany(
                "INSERT INTO observations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(scan_id, o.provenance.method, o.kind, o.key, str(o.verdict), o.reason, o.provenance.time,
                  json.dumps(o.data, default=str)) for o in observations])
            self.db.executemany(
                "INSERT INTO findings VALUES (?, ?, ?, ?, ?)",
                [(scan_id, f.kind, f.severity, f.title, json.dumps(f.evidence, default=str)) for f in findings])
        return scan_id

    def scans(self, vm: str | None = None, limit: int = 50) -> list[ScanRecord]:
        """Return the newest scans (of one VM, or all), newest first."""
        query = "SELECT id, vm, started, finished, methods, summary FROM scans"
        args: tuple[Any, ...] = ()
        if vm is not None:
            query += " WHERE vm = ?"
            args = (vm,)
        rows = self.db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [ScanRecord(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5])) for r in rows]

    def get_scan(self, scan_id: int) -> ScanRecord:
        """Return one scan or raise StoreError."""
        row = self.db.execute("SELECT id, vm, started, finished, methods, summary FROM scans WHERE id = ?",
                              (scan_id,)).fetchone()
        if row is None:
            raise StoreError(f"no scan {scan_id} in {self.path}; `nephoscope history` lists them")
        return ScanRecord(row[0], row[1], row[2], row[3], json.loads(row[4]), json.loads(row[5]))

    def _observation_rows(self, scan_id: int, kind: str | None) -> list[tuple[Any, ...]]:
        query = "SELECT method, kind, key, verdict, reason, time, data FROM observations WHERE scan_id = ?"
        args: tuple[Any, ...] = (scan_id,)
        if kind:
            query += " AND kind = ?"
            args += (kind,)
        return self.db.execute(query, args).fetchall()

    def observations(self, scan_id: int, kind: str | None = None) -> list[dict[str, Any]]:
        """Return a scan's observations as stored (JSON dicts)."""
        return [{"method": r[0], "kind": r[1], "key": r[2], "verdict": r[3], "reason": r[4], "time": r[5],
                 "data": json.loads(r[6])} for r in self._observation_rows(scan_id, kind)]

    def load_observations(self, scan_id: int, vm: str, kind: str | None = None) -> list[Observation]:
        """Return a scan's observations rebuilt with typed payloads through the payload registry.

        A record that does not fit its kind (or is not JSON) comes back as `Details` naming the problem,
        and a verdict this version does not know counts as unverifiable: a damaged store feeds no finding."""
        out = []
        for method, kind_, key, verdict, reason, at, text in self._observation_rows(scan_id, kind):
            try:
                data = json.loads(text)
            except (TypeError, ValueError) as exc:
                payload: payloads.Payload = payloads.Details({}, f"the stored record is not JSON ({exc})")
                data = None
            via = data.pop(VIA_KEY, "") if isinstance(data, dict) else ""
            if data is not None:
                payload = payloads.parse(str(kind_), data)
            known = verdict in set(Verdict)
            out.append(Observation(str(kind_), str(key), payload, Provenance(str(method), vm, at),
                                   Verdict(verdict) if known else Verdict.UNVERIFIABLE,
                                   str(reason) if known else f"unknown verdict {verdict!r} in the store",
                                   via if isinstance(via, str) else ""))
        return out

    def findings(self, scan_id: int) -> list[dict[str, Any]]:
        """Return a scan's findings as dicts."""
        return [{"kind": r[0], "severity": r[1], "title": r[2], "evidence": json.loads(r[3])}
                for r in self.db.execute("SELECT kind, severity, title, evidence FROM findings WHERE scan_id = ?",
                                         (scan_id,))]

    def close(self) -> None:
        """Close the database."""
        self.db.close()
