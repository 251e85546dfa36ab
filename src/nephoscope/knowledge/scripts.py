"""Known script files: sha256 of every .py/.php/.jar/... file of ingested Debian packages (SQLite).

A separate table set from the code-page DB (its own file, `scripts.sqlite` next to the KB by default) so
its schema can grow without touching the code-page DB's: `script_files(sha256, path, package, version)`.
`ingest_package` hashes the script files of one package version (the .deb from the shared download cache,
unpacked once); `identify` returns every (package, version, path) holding a file of that hash.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from nephoscope.core.errors import KnowledgeError
from nephoscope.core.paths import cache_root

SCRIPT_SUFFIXES = (".py", ".php", ".jar", ".war", ".pl", ".pm", ".rb", ".js", ".sh", ".inc")
SCHEMA = """
CREATE TABLE IF NOT EXISTS script_packages (package TEXT NOT NULL, version TEXT NOT NULL, files INTEGER NOT NULL,
                                             PRIMARY KEY (package, version));
CREATE TABLE IF NOT EXISTS script_files (sha256 TEXT NOT NULL, path TEXT NOT NULL, package TEXT NOT NULL,
                                         version TEXT NOT NULL, size INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS script_files_sha ON script_files (sha256);
"""


@dataclass(frozen=True, slots=True)
class KnownScript:
    """A packaged file with a given hash."""

    package: str
    version: str
    path: str

    @property
    def label(self) -> str:
        return f"{self.package} {self.version}"


def default_path() -> Path:
    """Return the default script-hash DB path (<cache>/scripts.sqlite)."""
    return cache_root() / "scripts.sqlite"


class ScriptDB:
    """The script-file hash table."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path)
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise KnowledgeError(f"script DB {self.path}: {exc}") from exc

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ScriptDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, package: str, version: str) -> bool:
        """Return whether package=version is ingested."""
        return self.db.execute("SELECT 1 FROM script_packages WHERE package=? AND version=?",
                               (package, version)).fetchone() is not None

    def add_tree(self, root: Path, package: str, version: str) -> int:
        """Hash every script file below an unpacked package tree; return how many were added."""
        rows = []
        for path in sorted(root.rglob("*")):
            if path.suffix in SCRIPT_SUFFIXES and path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                rows.append((hashlib.sha256(data).hexdigest(), "/" + str(path.relative_to(root)), package,
                             version, len(data)))
        with self.db:
            self.db.execute("DELETE FROM script_files WHERE package=? AND version=?", (package, version))
            self.db.executemany("INSERT INTO script_files VALUES (?, ?, ?, ?, ?)", rows)
            self.db.execute("INSERT OR REPLACE INTO script_packages VALUES (?, ?, ?)", (package, version, len(rows)))
        return len(rows)

    def identify(self, sha256: str) -> list[KnownScript]:
        """Return every packaged file with this hash."""
        return [KnownScript(*row) for row in self.db.execute(
            "SELECT package, version, path FROM script_files WHERE sha256=? ORDER BY package, version, path",
            (sha256,))]

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM script_files").fetchone()[0])


def ingest_package(db: ScriptDB, package: str, version: str) -> int:
    """Download (cached) and hash the script files of package=version; return the number of files."""
    from nephoscope.knowledge.debian import archive

    if db.has(package, version):
        return 0
    deb = archive.download(package, version, cache_root() / "debs")
    root = archive.unpack(deb, cache_root() / "unpacked") / "root"
    return db.add_tree(root, package, version)
