"""The notice log: what each tenant was last told about each VM, and every notice with its delivery record.

`notice_state` holds one row per (tenant, VM, topic) — topic "problems" for the set of problems a scan
found, "filter:<CVE>" for a filter applied on the customer's behalf — with the fingerprint last notified,
so an unchanged state sends nothing. `notices` holds one row per notice and channel (e-mail, webhook):
attempts, status ("pending", "sent", "failed") and the last error.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

TABLES = """CREATE TABLE IF NOT EXISTS notice_state (
  tenant TEXT NOT NULL, vm TEXT NOT NULL, topic TEXT NOT NULL, fingerprint TEXT NOT NULL, problems TEXT NOT NULL,
  scan_id INTEGER, updated REAL NOT NULL, PRIMARY KEY (tenant, vm, topic));
CREATE TABLE IF NOT EXISTS notices (
  id INTEGER PRIMARY KEY, tenant TEXT NOT NULL, vm TEXT NOT NULL, event TEXT NOT NULL, fingerprint TEXT NOT NULL,
  scan_id INTEGER, channel TEXT NOT NULL, target TEXT NOT NULL, created REAL NOT NULL, status TEXT NOT NULL,
  attempts INTEGER NOT NULL, last_error TEXT NOT NULL, sent REAL);
CREATE INDEX IF NOT EXISTS notices_vm ON notices(tenant, vm, id);"""


@dataclass(frozen=True, slots=True)
class NoticeState:
    """What a tenant was last told about one topic of one VM."""

    fingerprint: str
    problems: list[dict[str, Any]]
    scan_id: int | None
    updated: float


@dataclass(frozen=True, slots=True)
class NoticeRecord:
    """One notice on one channel, with its delivery record."""

    id: int
    tenant: str
    vm: str
    event: str
    fingerprint: str
    scan_id: int | None
    channel: str
    target: str
    created: float
    status: str
    attempts: int
    last_error: str
    sent: float | None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {k: getattr(self, k) for k in self.__slots__}


class NoticeLog:
    """The `notice_state` and `notices` tables of the SQLite store (`store.sqlite.Store`)."""

    def __init__(self, store: Any) -> None:
        self.db = store.db
        with self.db:
            self.db.executescript(TABLES)

    def find_state(self, tenant: str, vm: str, topic: str) -> NoticeState | None:
        """Return what `tenant` was last told about `topic` of `vm`, or None."""
        row = self.db.execute("SELECT fingerprint, problems, scan_id, updated FROM notice_state "
                              "WHERE tenant = ? AND vm = ? AND topic = ?", (tenant, vm, topic)).fetchone()
        if row is None:
            return None
        try:
            problems = json.loads(row[1])
        except ValueError:
            problems = []
        return NoticeState(row[0], problems if isinstance(problems, list) else [], row[2], row[3])

    def set_state(self, tenant: str, vm: str, topic: str, fingerprint: str, problems: list[dict[str, Any]],
                  scan_id: int | None) -> None:
        """Record what `tenant` now knows about `topic` of `vm`."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO notice_state VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (tenant, vm, topic, fingerprint, json.dumps(problems, default=str), scan_id, time.time()))

    def add(self, tenant: str, vm: str, event: str, fingerprint: str, scan_id: int | None, channel: str,
            target: str) -> int:
        """Insert a pending notice for one channel and return its id."""
        with self.db:
            cur = self.db.execute(
                "INSERT INTO notices (tenant, vm, event, fingerprint, scan_id, channel, target, created, status, "
                "attempts, last_error, sent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, '', NULL)",
                (tenant, vm, event, fingerprint, scan_id, channel, target, time.time()))
        return int(cur.lastrowid or 0)

    def attempt(self, notice_id: int, error: str | None) -> None:
        """Record one delivery attempt: sent when `error` is None, else still pending with the error."""
        with self.db:
            if error is None:
                self.db.execute("UPDATE notices SET attempts = attempts + 1, status = 'sent', last_error = '', "
                                "sent = ? WHERE id = ?", (time.time(), notice_id))
            else:
                self.db.execute("UPDATE notices SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                                (error[:2000], notice_id))

    def give_up(self, notice_id: int) -> None:
        """Mark a notice failed (every attempt failed; the last error stays recorded)."""
        with self.db:
            self.db.execute("UPDATE notices SET status = 'failed' WHERE id = ?", (notice_id,))

    def notices(self, vm: str | None = None, tenant: str | None = None, limit: int = 100) -> list[NoticeRecord]:
        """Return the newest notices (of one VM and/or tenant), newest first."""
        query, args = "SELECT * FROM notices WHERE 1 = 1", []
        for column, value in (("vm", vm), ("tenant", tenant)):
            if value is not None:
                query += f" AND {column} = ?"
                args.append(value)
        rows = self.db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [NoticeRecord(*row) for row in rows]
