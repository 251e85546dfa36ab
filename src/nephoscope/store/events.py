"""The trap event log: every trapped kernel event of a VM, appended as it is seen, in the SQLite store.

An exec's code identity is a second row (kind `identity`) that names its exec by `exec_time` and pid
(and by `exec_seq`, the event number within one watch) in its detail.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

TABLE = """CREATE TABLE IF NOT EXISTS trap_events (
  id INTEGER PRIMARY KEY, vm TEXT NOT NULL, time REAL NOT NULL, kind TEXT NOT NULL, pid INTEGER,
  ppid INTEGER, comm TEXT NOT NULL, detail TEXT NOT NULL, error TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS trap_events_vm ON trap_events(vm, time);"""
COMMIT_EVERY_S = 0.25  # a burst is committed in batches; a quiet watch commits each event at once


class StoredEvent(Protocol):
    """What the log stores of an event (nephoscope.introspect.trap.TrapEvent)."""

    kind: str
    time: float
    pid: int | None
    ppid: int | None
    comm: str
    detail: dict[str, Any]
    error: str


class EventLog:
    """Append trapped events to the `trap_events` table of the SQLite store."""

    def __init__(self, store: Any, vm: str, commit_every: float = COMMIT_EVERY_S) -> None:
        self.db, self.vm, self.commit_every = store.db, vm, commit_every
        self._last, self._pending = 0.0, 0
        self.db.executescript(TABLE)

    def add(self, ev: StoredEvent) -> None:
        """Insert one event and commit it (batched with the next ones if the last commit was very recent)."""
        self.db.execute("INSERT INTO trap_events (vm, time, kind, pid, ppid, comm, detail, error) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (self.vm, ev.time, ev.kind, ev.pid, ev.ppid, ev.comm,
                                                             json.dumps(ev.detail), ev.error))
        self._pending += 1
        self.tick()

    def tick(self) -> None:
        """Commit pending inserts unless the last commit was less than `commit_every` seconds ago."""
        if self._pending and time.monotonic() - self._last >= self.commit_every:
            self.flush()

    def flush(self) -> None:
        """Commit pending inserts."""
        self.db.commit()
        self._last, self._pending = time.monotonic(), 0


def recent_events(store: Any, vm: str, limit: int = 1000) -> list[dict[str, Any]]:
    """Return the newest `limit` stored events of `vm`, oldest first."""
    store.db.executescript(TABLE)
    rows = store.db.execute("SELECT time, kind, pid, ppid, comm, detail, error FROM trap_events WHERE vm = ? "
                            "ORDER BY id DESC LIMIT ?", (vm, limit)).fetchall()
    return [{"time": t, "kind": k, "pid": p, "ppid": pp, "comm": c, "detail": json.loads(d), "error": e}
            for t, k, p, pp, c, d, e in reversed(rows)]
