"""Known script files: sha256 of every .py/.php/.jar/... file of ingested Debian packages.

Two tables in the code-page KB's SQLite file (`script_packages`, `script_files(sha256, path, package,
version)`), kept by their own class so the code-page DB's schema and index stay as they are. Every KB
ingest of a package (knowledge/ingest.py) fills them; `ingest_package` adds a package already in the KB
(the .deb from the shared download cache, unpacked once); `identify` returns every (package, version,
path) holding a file of that hash. For Python sources the table also holds the pycs CPython writes for
them at install (see PYC_COMPILER).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nephoscope.core.errors import KnowledgeError
from nephoscope.core.paths import cache_root

SCRIPT_SUFFIXES = (".py", ".php", ".jar", ".war", ".pl", ".pm", ".rb", ".js", ".sh", ".inc")
# Debian Policy 9.1: packages never install below these (local administrator's and add-on software)
NOT_PACKAGED = ("/opt/", "/usr/local/", "/srv/", "/home/", "/root/", "/tmp/", "/var/tmp/", "/var/www/", "/dev/shm/",
                "/run/")
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


# Compiles each packaged .py as the guest's CPython does at install (py3compile: timestamp pycs holding the
# source's mtime and size), printing {pyc path: sha256}. CPython 3.11 writes the same bytes for the same
# source, mtime and version (checked: python3-flask's app.py, host 3.11.2 vs the guest's own pyc).
PYC_COMPILER = r"""
import hashlib, importlib._bootstrap_external as b, importlib.util, json, os, sys
out = {}
for real, guest in json.load(sys.stdin):
    try:
        src = open(real, "rb").read()
        code = compile(src, guest, "exec", dont_inherit=True)
        data = b._code_to_timestamp_pyc(code, int(os.stat(real).st_mtime), len(src))
    except (SyntaxError, ValueError, OSError, RecursionError, MemoryError):
        continue
    out[importlib.util.cache_from_source(guest)] = hashlib.sha256(data).hexdigest()
print(json.dumps(out))
"""
PYC_PYTHONS = ("python3.11",)  # the guest CPython versions whose pycs are computed (the compiler must match)


def pyc_compiler(minor: str) -> str | None:
    """Return the host's python{minor} to compile pycs with, if it has one."""
    return shutil.which(f"python{minor}", path="/usr/bin:/bin")


def default_path() -> Path:
    """Return the default script-hash DB path: the code-page KB's file (NEPHOSCOPE_KB or <cache>/kb.sqlite)."""
    from nephoscope.knowledge.binaries import default_path as kb_path

    return kb_path()


class ScriptDB:
    """The script-file hash table."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=60)
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
        rows += self._pycs(root, package, version)
        with self.db:
            self.db.execute("DELETE FROM script_files WHERE package=? AND version=?", (package, version))
            self.db.executemany("INSERT INTO script_files VALUES (?, ?, ?, ?, ?)", rows)
            self.db.execute("INSERT OR REPLACE INTO script_packages VALUES (?, ?, ?)", (package, version, len(rows)))
        return len(rows)

    @staticmethod
    def _pycs(root: Path, package: str, version: str) -> list[tuple[str, str, str, str, int]]:
        """Return rows for the pycs the guest's CPython compiles from this package's .py files at install."""
        sources = [(str(p), "/" + str(p.relative_to(root))) for p in sorted(root.rglob("*.py"))
                   if p.is_file() and not p.is_symlink() and "/python3" in "/" + str(p.relative_to(root))]
        rows: list[tuple[str, str, str, str, int]] = []
        for name in PYC_PYTHONS:
            compiler = pyc_compiler(name.removeprefix("python"))
            if compiler is None or not sources:
                continue
            try:
                done = subprocess.run([compiler, "-I", "-c", PYC_COMPILER], input=json.dumps(sources), text=True,
                                      capture_output=True, timeout=600, check=True)
                pycs = json.loads(done.stdout)
            except (OSError, subprocess.SubprocessError, ValueError) as exc:
                raise KnowledgeError(f"compiling the .py files of {package} {version} with {compiler} failed: "
                                     f"{exc}") from exc
            rows += [(digest, path, package, version, 0) for path, digest in pycs.items()]
        return rows

    def identify(self, sha256: str) -> list[KnownScript]:
        """Return every packaged file with this hash."""
        return [KnownScript(*row) for row in self.db.execute(
            "SELECT package, version, path FROM script_files WHERE sha256=? ORDER BY package, version, path",
            (sha256,))]

    def shipping(self, path: str) -> list[KnownScript]:
        """Return every ingested package version that ships a file at `path` (whatever its bytes)."""
        return [KnownScript(*row) for row in self.db.execute(
            "SELECT package, version, path FROM script_files WHERE path=? ORDER BY package, version", (path,))]

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM script_files").fetchone()[0])


def outside_packages(path: str) -> bool:
    """Return whether `path` lies where Debian packages never install files (Debian Policy 9.1)."""
    return path.startswith(NOT_PACKAGED)


def open_default() -> ScriptDB | None:
    """Return the default script DB if one exists (None: no script identification; nothing is created)."""
    return ScriptDB() if default_path().exists() else None


def ingest_package(db: ScriptDB, package: str, version: str) -> int:
    """Download (cached) and hash the script files of package=version; return the number of files."""
    from nephoscope.knowledge.debian import archive

    if db.has(package, version):
        return 0
    deb = archive.download(package, version, cache_root() / "debs")
    root = archive.unpack(deb, cache_root() / "unpacked") / "root"
    return db.add_tree(root, package, version)
