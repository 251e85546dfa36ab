"""apt's Packages indexes read in-process, cached on disk by the state of apt's own files.

Machines without apt's binary cache (`Dir::Cache::pkgcache ""`, as in Debian's container images) make
apt re-read every compressed index for each `apt-cache` call (~0.6 s each). Here the indexes apt uses
(`apt-get indextargets`) are read once into an SQLite file under <cache>/apt-index/, keyed by a digest
of apt's configuration, sources, preferences and lists directory; any `apt-get update` changes the key.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
import sqlite3
import threading
import zlib
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

from debian import deb822
from debian.debian_support import Version

from nephoscope.core.errors import KnowledgeError
from nephoscope.core.paths import cache_root
from nephoscope.knowledge.debian.config import (
    AptConfig,
    preference_files,
    read_config,
    run_apt,
    run_apt_bytes,
    state_key,
)
from nephoscope.knowledge.debian.policy import PackageFile, Policy, choose_candidate, read_pins

FORMAT = "1"  # bump when the cache layout or its derivation changes
_FIELD_RE = re.compile(rb"^(Package|Version|Architecture|Source):[ \t]*(.*?)[ \t]*$", re.M)
_STDLIB_DECOMPRESS = {".gz": gzip.decompress, ".xz": lzma.decompress, ".lzma": lzma.decompress,
                      ".bz2": bz2.decompress}
_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files(id INTEGER PRIMARY KEY, info TEXT NOT NULL, priority INTEGER NOT NULL);
CREATE TABLE versions(name TEXT NOT NULL, version TEXT NOT NULL, file INTEGER NOT NULL,
                      priority INTEGER NOT NULL, record BLOB NOT NULL);
"""


def index_dir() -> Path:
    """Return where parsed indexes are cached (<cache>/apt-index)."""
    return cache_root() / "apt-index"


def read_index_bytes(path: Path, config: AptConfig) -> bytes:
    """Return an index file's text, undoing the compression apt kept it in (Acquire::GzipIndexes).

    gzip, xz and bzip2 are undone in-process; lz4 and zstd (which Python 3.11 cannot read) by apt's own
    `apt-helper cat-file`, which handles every compressor apt itself can store, so no extra package."""
    suffix = path.suffix if path.suffix in (*_STDLIB_DECOMPRESS, ".lz4", ".zst") else ""
    try:
        if suffix in _STDLIB_DECOMPRESS:
            return _STDLIB_DECOMPRESS[suffix](path.read_bytes())
        if not suffix:
            return path.read_bytes()
    except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as exc:
        raise KnowledgeError(f"cannot read apt index {path}: {exc}; run `apt-get update`") from exc
    methods = config.find_file("Dir::Bin::Methods")
    helper = str(methods.parent / "apt-helper") if str(methods) else "/usr/lib/apt/apt-helper"
    if not Path(helper).exists():
        helper = "/usr/lib/apt/apt-helper"
    return run_apt_bytes([helper, "cat-file", str(path)])


def _release_flags(index_path: str, meta_key: str) -> tuple[bool, bool]:
    """Return (NotAutomatic, ButAutomaticUpgrades) from the Release file beside an index file."""
    stem = index_path
    for ext in (*_STDLIB_DECOMPRESS, ".lz4", ".zst"):
        stem = stem.removesuffix(ext)
    escaped = meta_key.replace("/", "_")
    if not stem.endswith(escaped):
        return False, False
    prefix = stem[: -len(escaped)]
    for name in ("InRelease", "Release"):
        try:
            text = Path(prefix + name).read_text(errors="replace")
        except OSError:
            continue
        release = deb822.Release(text)
        return (release.get("NotAutomatic", "").lower() == "yes",
                release.get("ButAutomaticUpgrades", "").lower() == "yes")
    return False, False


def package_files(config: AptConfig) -> list[PackageFile]:
    """Return the binary Packages indexes apt uses under `config` (native architecture, files present)."""
    text = run_apt(["apt-get", *config.options, "indextargets"])
    out: list[PackageFile] = []
    for target in deb822.Deb822.iter_paragraphs(text.splitlines()):
        if target.get("Identifier") != "Packages" or target.get("Target-Of", "deb") != "deb":
            continue
        if target.get("Architecture", config.architecture) != config.architecture:
            continue  # apt-cache NAME shows the native package; foreign-arch indexes are other packages
        path = target.get("Filename", "")
        if not path or not Path(path).is_file():
            continue
        not_auto, but_upgrades = _release_flags(path, target.get("MetaKey", ""))
        out.append(PackageFile(
            path=path, description=target.get("Description", path),
            site=urlsplit(target.get("Repo-URI", target.get("Site", ""))).netloc.rpartition("@")[2],
            origin=target.get("Origin", ""), label=target.get("Label", ""), archive=target.get("Suite", ""),
            codename=target.get("Codename", ""), version=target.get("Version", ""),
            component=target.get("Component", ""), architecture=target.get("Architecture", ""),
            not_automatic=not_auto, but_automatic_upgrades=but_upgrades))
    return out


def iter_records(data: bytes, architecture: str) -> Iterator[tuple[str, str, str, bytes]]:
    """Yield (package, version, source, record) for each stanza of architecture `architecture` or all."""
    for stanza in data.split(b"\n\n"):
        stanza = stanza.strip(b"\n")
        if not stanza:
            continue
        fields = dict(_FIELD_RE.findall(stanza))
        name, version = fields.get(b"Package"), fields.get(b"Version")
        if not name or not version or fields.get(b"Architecture", b"all") not in (architecture.encode(), b"all"):
            continue
        source = (fields.get(b"Source") or name).split(b" ", 1)[0]
        yield name.decode(errors="replace"), version.decode(errors="replace"), source.decode(errors="replace"), stanza


def _build(path: Path, key: str, config: AptConfig) -> None:
    """Parse every index apt uses and write the cache file `path` (atomically)."""
    files = package_files(config)
    policy = Policy(files, read_pins(preference_files(config), config.default_release), config.architecture)
    carriers: dict[tuple[str, str], tuple[str, list[int]]] = {}
    rows: list[list] = []
    for file_id, f in enumerate(files):
        for name, version, source, record in iter_records(read_index_bytes(Path(f.path), config),
                                                          config.architecture):
            carriers.setdefault((name, version), (source, []))[1].append(file_id)
            rows.append([name, version, file_id, 0, zlib.compress(record, 1)])
    priority = {nv: policy.version_priority(nv[0], src, nv[1], ids) for nv, (src, ids) in carriers.items()}
    for row in rows:
        row[3] = priority[(row[0], row[1])]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp)
    try:
        db.executescript(_SCHEMA)
        db.executemany("INSERT INTO files VALUES (?, ?, ?)",
                       [(i, json.dumps(asdict(f)), policy.file_priority[i]) for i, f in enumerate(files)])
        db.executemany("INSERT INTO versions VALUES (?, ?, ?, ?, ?)", rows)
        db.execute("CREATE INDEX versions_name ON versions(name)")
        db.executemany("INSERT INTO meta VALUES (?, ?)", [("key", key), ("format", FORMAT)])
        db.commit()
    finally:
        db.close()
    os.replace(tmp, path)


class ArchiveIndex:
    """What apt knows about binary packages under one set of apt options, read from the on-disk cache."""

    def __init__(self, db: sqlite3.Connection, options: tuple[str, ...]) -> None:
        self.options = options
        self._db = db
        self.files = [PackageFile(**json.loads(info)) for (info,) in db.execute("SELECT info FROM files ORDER BY id")]
        self._rows: dict[str, list[tuple[str, int, int]]] = {}

    @classmethod
    def open(cls, options: tuple[str, ...] = ()) -> ArchiveIndex:
        """Return the index for `options`, re-reading apt's indexes only when their state changed."""
        config = read_config(options)
        key = state_key(config, FORMAT)
        path = index_dir() / f"{hashlib.sha256(repr(options).encode()).hexdigest()[:16]}.sqlite"
        for attempt in range(2):
            if path.exists():
                try:
                    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
                    stored = dict(db.execute("SELECT key, value FROM meta"))
                    if stored.get("key") == key and stored.get("format") == FORMAT:
                        return cls(db, options)
                    db.close()
                except sqlite3.Error:
                    pass  # a damaged cache is rebuilt
            if attempt == 0:
                _build(path, key, config)
        raise KnowledgeError(f"the apt index cache {path} could not be written or read back")

    def _versions_of(self, name: str) -> list[tuple[str, int, int]]:
        """Return (version, file id, priority) rows of `name`, newest version first."""
        if name not in self._rows:
            rows = self._db.execute("SELECT version, file, priority FROM versions WHERE name = ? ORDER BY rowid",
                                    (name,)).fetchall()
            self._rows[name] = sorted(rows, key=lambda r: Version(r[0]), reverse=True)
        return self._rows[name]

    def versions(self, name: str) -> tuple[str, ...]:
        """Return every version of `name` in apt's indexes, newest first (what `apt-cache madison` lists)."""
        return tuple(dict.fromkeys(v for v, _f, _p in self._versions_of(name)))

    def sources(self, name: str) -> list[tuple[str, str]]:
        """Return (version, index description) pairs, one per index that carries a version (madison's lines)."""
        return [(v, self.files[f].description) for v, f, _p in self._versions_of(name)]

    def priorities(self, name: str) -> list[tuple[str, int]]:
        """Return (version, pin priority) newest first, as `apt-cache policy` shows them."""
        return list(dict.fromkeys((v, p) for v, _f, p in self._versions_of(name)))

    def candidate(self, name: str) -> str | None:
        """Return apt's candidate version of `name` (highest version of the highest priority), or None."""
        return choose_candidate(self.priorities(name))

    def record(self, name: str, version: str) -> str | None:
        """Return the index stanza of `name` at exactly `version` (from its first index file), or None."""
        row = self._db.execute("SELECT record FROM versions WHERE name = ? AND version = ? ORDER BY rowid LIMIT 1",
                               (name, version)).fetchone()
        return zlib.decompress(row[0]).decode("utf-8", "replace") if row else None

    def names(self, prefix: str) -> list[str]:
        """Return the package names that start with `prefix`, sorted."""
        rows = self._db.execute("SELECT DISTINCT name FROM versions WHERE substr(name, 1, ?) = ? ORDER BY name",
                                (len(prefix), prefix))
        return [n for (n,) in rows]
