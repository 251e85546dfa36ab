"""Consistent copies of the knowledge DBs the server hands to sensors, each with a content ETag.

An SQLite file read while a writer commits (the vulnerability DB is in rollback-journal mode, and
`nephoscope vulns update` rewrites it in place) can be torn; so the server copies it with SQLite's online
backup into a snapshot file whenever the source's size or mtime changed, and serves that copy. The ETag is
the copy's SHA-256, so an unchanged DB is never downloaded twice, and a rebuilt but identical one is not either.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from nephoscope.core.errors import NephoscopeError


class SnapshotError(NephoscopeError):
    """A knowledge DB could not be copied for serving."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent copy of a source DB: its file and its ETag (quoted SHA-256 prefix)."""

    path: Path
    etag: str


class SnapshotCache:
    """The current snapshot of one SQLite source file, re-taken when the source changes (thread-safe)."""

    def __init__(self, source: Path, directory: Path | None = None) -> None:
        self.source = source
        self.dir = directory  # default: a temporary directory made at the first snapshot
        self._lock = threading.Lock()
        self._signature: tuple[int, int] | None = None
        self._current: Snapshot | None = None

    def find(self) -> Snapshot | None:
        """Return the current snapshot, taking a new one if the source changed; None when there is no source."""
        try:
            st = self.source.stat()
        except OSError:
            return None
        signature = (st.st_size, st.st_mtime_ns)
        with self._lock:
            if self._current is None or signature != self._signature:
                self._current = self._take()
                self._signature = signature
            return self._current

    def _take(self) -> Snapshot:
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="nephoscope-snap-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.dir, suffix=".sqlite")
        os.close(fd)
        tmp = Path(name)
        try:
            src = sqlite3.connect(f"file:{self.source}?mode=ro", uri=True, timeout=60)
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)
            finally:
                dst.close()
                src.close()
            digest = hashlib.sha256()
            with tmp.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except (sqlite3.Error, OSError) as exc:
            tmp.unlink(missing_ok=True)
            raise SnapshotError(f"cannot copy {self.source} for sensors: {exc}") from exc
        final = self.dir / f"{self.source.stem}-{digest.hexdigest()[:16]}.sqlite"
        os.replace(tmp, final)
        for old in self.dir.glob(f"{self.source.stem}-*.sqlite"):
            if old != final:
                old.unlink(missing_ok=True)  # a download in progress keeps its open file
        return Snapshot(final, f'"{digest.hexdigest()[:32]}"')
