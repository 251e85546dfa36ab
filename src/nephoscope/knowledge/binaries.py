"""The code-page DB: which package, file and file offset an executable page's digest comes from.

Metadata (packages, files, pages) lives in SQLite; lookups go through an in-memory sorted numpy
array of `page_key(digest)` built lazily from the pages table and rebuilt when the DB's generation
changes. Every key hit is verified against the full 32-byte digest.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nephoscope.core.errors import KnowledgeError
from nephoscope.core.paths import cache_root
from nephoscope.knowledge.elfpages import ElfPages, PageInfo

if TYPE_CHECKING:
    from nephoscope.knowledge.kernelpkg import KernelStore

__all__ = ["CodePageDB", "KbStats", "PackageMeta", "PageHit", "PageInfo", "default_path"]

DIGEST_SIZE = 32
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packages(
  id INTEGER PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL, arch TEXT NOT NULL,
  source TEXT NOT NULL, source_version TEXT NOT NULL, origin TEXT NOT NULL, UNIQUE(name, version, arch));
CREATE TABLE IF NOT EXISTS files(
  id INTEGER PRIMARY KEY, package_id INTEGER NOT NULL REFERENCES packages(id), path TEXT NOT NULL,
  sha256 BLOB NOT NULL, build_id TEXT, elf_type TEXT NOT NULL, machine TEXT NOT NULL, size INTEGER NOT NULL,
  UNIQUE(package_id, path, sha256));
CREATE TABLE IF NOT EXISTS pages(
  file_id INTEGER NOT NULL REFERENCES files(id), file_offset INTEGER NOT NULL, vaddr INTEGER NOT NULL,
  digest BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS pages_digest ON pages(digest);
CREATE INDEX IF NOT EXISTS pages_file ON pages(file_id);
"""


def default_path() -> Path:
    """Return the KB path: NEPHOSCOPE_KB, else `cache_root()/kb.sqlite`."""
    return Path(os.environ.get("NEPHOSCOPE_KB") or cache_root() / "kb.sqlite")


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass(frozen=True, slots=True)
class PackageMeta:
    """Where a file came from: a Debian binary package, or a local source (name "(local)")."""

    name: str
    version: str = ""
    arch: str = ""
    source: str = ""  # Debian source package (defaults to `name`)
    source_version: str = ""
    origin: str = ""  # the .deb, directory or file it was read from


@dataclass(frozen=True, slots=True)
class PageHit:
    """One place a page digest occurs: a file offset and vaddr (ELF virtual space) in a packaged file."""

    file_id: int
    file_offset: int
    vaddr: int
    path: str
    package: str
    version: str
    arch: str
    source_package: str
    build_id: str | None
    sha256: str  # hex digest of the whole file


@dataclass(frozen=True, slots=True)
class KbStats:
    """Sizes of the knowledge base."""

    path: str
    packages: int
    files: int
    pages: int
    distinct_digests: int
    db_bytes: int


@dataclass(slots=True)
class _Index:
    """Pages sorted by digest, grouped so that each distinct digest is one group of rows."""

    generation: str
    group_keys: np.ndarray  # uint64 page_key per group, sorted (repeats only on 64-bit key collisions)
    group_digests: np.ndarray  # (groups, 32) uint8
    group_starts: np.ndarray  # first row of each group; rows of a group are contiguous
    group_counts: np.ndarray
    file_ids: np.ndarray  # per row
    offsets: np.ndarray
    vaddrs: np.ndarray
    bucket_shift: int = 64
    bucket_starts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(2, np.int64))

    def __post_init__(self) -> None:
        # A direct-mapped table over the keys' top bits (about two buckets per group) replaces a
        # binary search: one random read finds the few groups whose key can match.
        bits = max(1, len(self.group_keys).bit_length() + 1)
        self.bucket_shift = 64 - bits
        bounds = np.arange(1 << bits, dtype=np.uint64) << np.uint64(self.bucket_shift)
        self.bucket_starts = np.append(np.searchsorted(self.group_keys, bounds, "left"), len(self.group_keys))

    def lower_bound(self, qkeys: np.ndarray) -> np.ndarray:
        """Return the first group index whose key is >= each query key (like searchsorted 'left')."""
        buckets = (qkeys >> np.uint64(self.bucket_shift)).astype(np.intp)
        pos, end = self.bucket_starts[buckets], self.bucket_starts[buckets + 1]
        active = np.flatnonzero(pos < end)
        while active.size:
            p = pos[active]
            behind = self.group_keys[p] < qkeys[active]
            active = active[behind]
            pos[active] += 1
            active = active[pos[active] < end[active]]
        return pos

    @classmethod
    def build(cls, generation: str, rows: list[tuple[int, int, int, bytes]]) -> _Index:
        """Sort page rows (file_id, file_offset, vaddr, digest) into digest groups."""
        n = len(rows)
        digests = digests_to_array([r[3] for r in rows]) if n else np.zeros((0, DIGEST_SIZE), np.uint8)
        keys = _keys(digests)
        order = np.argsort(keys, kind="stable")
        keys, digests = keys[order], digests[order]
        same_key = keys[1:] == keys[:-1]
        same_digest = same_key & (digests[1:] == digests[:-1]).all(axis=1)
        if (same_key & ~same_digest).any():  # a 64-bit key collision: order by the whole digest
            words = np.ascontiguousarray(digests).view(">u8").astype(np.uint64)
            fix = np.lexsort(words.T[::-1])
            order, keys, digests = order[fix], keys[fix], digests[fix]
            same_digest = (digests[1:] == digests[:-1]).all(axis=1)
        starts = np.flatnonzero(np.concatenate(([True], ~same_digest))) if n else np.zeros(0, np.int64)
        counts = np.diff(np.append(starts, n))
        column = lambda i, dtype: np.fromiter((r[i] for r in rows), dtype, n)[order]  # noqa: E731
        return cls(generation, keys[starts], digests[starts], starts, counts, column(0, np.int64),
                   column(1, np.int64), column(2, np.int64).view(np.uint64))

    def groups_of(self, query: np.ndarray) -> np.ndarray:
        """Return the group index of each queried digest, or -1 when it is unknown."""
        groups = len(self.group_keys)
        if not groups:
            return np.full(len(query), -1, np.int64)
        qkeys = _keys(query)
        lo = np.minimum(self.lower_bound(qkeys), groups - 1)
        key_ok = self.group_keys[lo] == qkeys
        ok = key_ok.copy()
        cand = np.flatnonzero(key_ok)  # compare whole digests only where the 64-bit key matched
        ok[cand] = (_words(self.group_digests)[lo[cand]] == _words(query)[cand]).all(axis=1)
        out = np.where(ok, lo, -1)
        for i in np.flatnonzero(key_ok & ~ok):  # key collision: try the next groups with this key
            g = int(lo[i]) + 1
            while g < groups and self.group_keys[g] == qkeys[i]:
                if (self.group_digests[g] == query[i]).all():
                    out[i] = g
                    break
                g += 1
        return out


def digests_to_array(digests: list[bytes]) -> np.ndarray:
    """Pack 32-byte digests into an (n, 32) uint8 array; raise KnowledgeError on a wrong length."""
    joined = b"".join(digests)
    if len(joined) != DIGEST_SIZE * len(digests):
        bad = next(i for i, d in enumerate(digests) if len(d) != DIGEST_SIZE)
        raise KnowledgeError(f"digest #{bad} has {len(digests[bad])} bytes; page digests are SHA-256 (32 bytes)")
    return np.frombuffer(joined, dtype=np.uint8).reshape(-1, DIGEST_SIZE)


def _words(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr).view(np.uint64)


def _keys(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr[:, :8]).view(">u8").ravel().astype(np.uint64)


class CodePageDB:
    """The code-page knowledge base: add ELF files, look up page digests."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._index: _Index | None = None
        self._group_hits: list[list[PageHit]] = [[]]
        self._filled = np.zeros(0, bool)
        self._files: dict[int, tuple] = {}
        self._kernel_store: KernelStore | None = None

    @classmethod
    def open(cls, path: Path | None = None) -> CodePageDB:
        """Open (creating if needed) the KB at `path`, default `default_path()`."""
        path = Path(path) if path is not None else default_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=60)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('generation', '0')")
            conn.commit()
        except (sqlite3.Error, OSError) as exc:
            raise KnowledgeError(f"cannot open the code-page DB {path}: {exc}; "
                                 "delete it or set NEPHOSCOPE_KB to another path") from exc
        return cls(path, conn)

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()

    def kernel_store(self) -> KernelStore:
        """Return the kernel images of this KB (vmlinux and modules of ingested linux-image packages)."""
        from nephoscope.knowledge.kernelpkg import KernelStore

        if self._kernel_store is None:
            self._kernel_store = KernelStore(self._conn)
        return self._kernel_store

    # --- writing ---------------------------------------------------------------------------

    def package_id(self, meta: PackageMeta) -> int:
        """Return the row id of a package, inserting it when new."""
        self._conn.execute(
            "INSERT OR IGNORE INTO packages(name, version, arch, source, source_version, origin) "
            "VALUES (?,?,?,?,?,?)",
            (meta.name, meta.version, meta.arch, meta.source or meta.name, meta.source_version or meta.version,
             meta.origin))
        row = self._conn.execute("SELECT id FROM packages WHERE name=? AND version=? AND arch=?",
                                 (meta.name, meta.version, meta.arch)).fetchone()
        return int(row[0])

    def has_package(self, name: str, version: str) -> bool:
        """Return whether a package version is stored (ingest commits whole packages)."""
        return self._conn.execute("SELECT 1 FROM packages WHERE name=? AND version=?",
                                  (name, version)).fetchone() is not None

    def has_file(self, package_id: int, path: str, sha256: bytes) -> bool:
        """Return whether this exact file (package, path, content) is already stored."""
        return self._conn.execute("SELECT 1 FROM files WHERE package_id=? AND path=? AND sha256=?",
                                  (package_id, path, sha256)).fetchone() is not None

    def add_file(self, package_id: int, path: str, elf: ElfPages) -> int:
        """Store one ELF file and its pages; return the pages added (0 when already stored)."""
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO files(package_id, path, sha256, build_id, elf_type, machine, size) "
            "VALUES (?,?,?,?,?,?,?)", (package_id, path, elf.sha256, elf.build_id, elf.elf_type, elf.machine,
                                       elf.size))
        if cur.rowcount == 0:
            return 0
        file_id = cur.lastrowid
        self._conn.executemany("INSERT INTO pages VALUES (?,?,?,?)",
                               [(file_id, p.file_offset, _signed(p.vaddr), p.digest) for p in elf.pages])
        return len(elf.pages)

    def commit(self) -> None:
        """Commit pending additions and bump the generation so lookup indexes rebuild."""
        self._conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")
        self._conn.commit()

    # --- reading ---------------------------------------------------------------------------

    def _generation(self) -> str:
        return str(self._conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    def _load(self) -> _Index:
        gen = self._generation()
        if self._index is None or self._index.generation != gen:
            rows = self._conn.execute("SELECT file_id, file_offset, vaddr, digest FROM pages").fetchall()
            self._index = _Index.build(gen, rows)
            self._group_hits = [[] for _ in range(len(self._index.group_keys) + 1)]
            self._filled = np.zeros(len(self._index.group_keys), bool)
            self._files = {r[0]: r[1:] for r in self._conn.execute(
                "SELECT f.id, f.path, p.name, p.version, p.arch, p.source, f.build_id, f.sha256 FROM files f "
                "JOIN packages p ON p.id = f.package_id")}
        return self._index

    def match(self, digests: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Return (query index, index row) int64 arrays for every verified hit; rows feed `hit_at`."""
        idx = self._load()
        groups = idx.groups_of(digests_to_array(digests))
        found = np.flatnonzero(groups >= 0)
        counts = idx.group_counts[groups[found]]
        q_idx = np.repeat(found, counts)
        first = np.repeat(idx.group_starts[groups[found]], counts)
        within = np.arange(len(q_idx)) - np.repeat(np.cumsum(counts) - counts, counts)
        return q_idx, first + within

    def hit_at(self, row: int) -> PageHit:
        """Return the PageHit of one index row (as returned by `match`)."""
        return self._row_hit(self._load(), row)

    def _row_hit(self, idx: _Index, row: int) -> PageHit:
        file_id = int(idx.file_ids[row])
        path, name, version, arch, source, build_id, sha = self._files[file_id]
        return PageHit(file_id, int(idx.offsets[row]), int(idx.vaddrs[row]), path, name, version, arch, source,
                       build_id, bytes(sha).hex())

    def _fill(self, groups: np.ndarray) -> None:
        """Build the PageHit lists of the given groups that have none yet."""
        idx = self._index
        assert idx is not None
        for group in np.unique(groups[~self._filled[groups]]).tolist():
            start = int(idx.group_starts[group])
            rows = range(start, start + int(idx.group_counts[group]))
            self._group_hits[group] = [self._row_hit(idx, r) for r in rows]
        self._filled[groups] = True

    def lookup_digests(self, digests: list[bytes]) -> list[list[PageHit]]:
        """Return, for each 32-byte page digest, every place it occurs (empty list when unknown)."""
        groups = self._load().groups_of(digests_to_array(digests))
        self._fill(groups[groups >= 0])
        cache = self._group_hits  # its last entry is an empty list, so group -1 (unknown) maps to []
        # building a million small lists would trigger the cyclic GC over every cached PageHit again
        # and again (3x slower); the lists hold no cycles, so pause it for this comprehension
        paused = gc.isenabled()
        gc.disable()
        try:
            return [cache[g][:] for g in groups.tolist()]
        finally:
            if paused:
                gc.enable()

    def lookup(self, digest: bytes) -> list[PageHit]:
        """Return every place one page digest occurs."""
        return self.lookup_digests([digest])[0]

    def file_pages(self, file_id: int) -> list[PageInfo]:
        """Return all executable pages of a stored file, ordered by file offset."""
        rows = self._conn.execute("SELECT file_offset, vaddr, digest FROM pages WHERE file_id=? "
                                  "ORDER BY file_offset, vaddr", (file_id,)).fetchall()
        return [PageInfo(off, va & 0xFFFF_FFFF_FFFF_FFFF, bytes(d)) for off, va, d in rows]

    def find_files(self, path_suffix: str = "", package: str = "") -> list[tuple[int, str, str, str]]:
        """Return (file_id, path, package, version) of stored files matching a path suffix and package."""
        return [tuple(r) for r in self._conn.execute(
            "SELECT f.id, f.path, p.name, p.version FROM files f JOIN packages p ON p.id = f.package_id "
            "WHERE f.path LIKE ? AND (? = '' OR p.name = ?) ORDER BY f.id",
            ("%" + path_suffix, package, package))]

    def sql_lookup(self, digest: bytes) -> list[tuple[int, int, int]]:
        """Return (file_id, file_offset, vaddr) rows for a digest through the SQLite index (the slow path)."""
        return self._conn.execute("SELECT file_id, file_offset, vaddr FROM pages WHERE digest=?",
                                  (digest,)).fetchall()

    def stats(self) -> KbStats:
        """Return the KB's sizes."""
        one = lambda sql: int(self._conn.execute(sql).fetchone()[0])  # noqa: E731
        return KbStats(str(self.path), one("SELECT count(*) FROM packages"), one("SELECT count(*) FROM files"),
                       one("SELECT count(*) FROM pages"), one("SELECT count(DISTINCT digest) FROM pages"),
                       self.path.stat().st_size if self.path.exists() else 0)

