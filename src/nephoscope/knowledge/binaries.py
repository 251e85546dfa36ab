"""The code-page DB: which package, file and file offset an executable page's digest comes from.

Metadata (packages, files, pages) lives in SQLite; lookups go through an in-memory sorted numpy
array of `page_key(digest)` built lazily from the pages table and rebuilt when the DB's generation
changes. Every key hit is verified against the full 32-byte digest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import secrets
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from nephoscope.core.errors import KnowledgeError
from nephoscope.core.paths import cache_root
from nephoscope.knowledge.elfpages import ElfPages, PageInfo

if TYPE_CHECKING:
    from nephoscope.knowledge.kernelpkg import KernelStore

__all__ = ["CodePageDB", "KbStats", "PackageMeta", "PageHit", "PageInfo", "default_path", "files_with_build_id"]

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


def files_with_build_id(build_id: str, path: Path | None = None) -> list[tuple[str, str, str]]:
    """Return (file path, package, version) of every KB file with GNU build id `build_id` ([] without a KB).

    Opens the KB read-only (no schema set-up, no write lock), so a lookup never waits on an ingest."""
    path = Path(path) if path is not None else default_path()
    if not path.is_file():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)) as conn:
            rows = conn.execute("SELECT f.path, p.name, p.version FROM files f JOIN packages p ON p.id = f.package_id "
                                "WHERE f.build_id = ? ORDER BY p.version DESC", (build_id,)).fetchall()
    except sqlite3.Error as exc:
        raise KnowledgeError(f"cannot read the code-page DB {path}: {exc}") from exc
    return [(str(a), str(b), str(c)) for a, b, c in rows]


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


class PageHit(NamedTuple):
    """One place a page digest occurs: a file offset and vaddr (ELF virtual space) in a packaged file.

    Immutable (lookups share them) and a named tuple rather than a frozen dataclass: a scan's first
    lookup builds one per hit, and a tuple builds ~10x faster."""

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


_INDEX_FORMAT = "2"  # bump when the on-disk index layout changes
_ARRAYS = ("group_keys", "group_digests", "group_starts", "group_counts", "file_ids", "offsets", "vaddrs",
           "bucket_starts")
_CHUNK = 1 << 18  # page rows read from SQLite at a time while building the index


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
    bucket_starts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    bucket_shift: int = 64

    def __post_init__(self) -> None:
        # A direct-mapped table over the keys' top bits (about one bucket per group) replaces a binary
        # search: one random read finds the few groups whose key can match.
        groups = len(self.group_keys)
        bits = max(1, groups.bit_length())
        self.bucket_shift = 64 - bits
        if len(self.bucket_starts) != (1 << bits) + 1:
            bounds = np.arange(1 << bits, dtype=np.uint64) << np.uint64(self.bucket_shift)
            starts = np.append(np.searchsorted(self.group_keys, bounds, "left"), groups)
            self.bucket_starts = starts.astype(np.int32 if groups < 1 << 31 else np.int64)

    def lower_bound(self, qkeys: np.ndarray) -> np.ndarray:
        """Return the first group index whose key is >= each query key (like searchsorted 'left')."""
        buckets = (qkeys >> np.uint64(self.bucket_shift)).astype(np.intp)
        pos = self.bucket_starts[buckets].astype(np.intp)
        end = self.bucket_starts[buckets + 1]
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
        column = lambda i: np.fromiter((r[i] for r in rows), np.int64, n)  # noqa: E731
        return cls.from_columns(generation, column(0), column(1), column(2).view(np.uint64), digests)

    @classmethod
    def from_columns(cls, generation: str, file_ids: np.ndarray, offsets: np.ndarray, vaddrs: np.ndarray,
                     digests: np.ndarray) -> _Index:
        """Sort page columns (file_id, file_offset, vaddr as uint64, (n, 32) digests) into digest groups."""
        n = len(file_ids)
        keys = _keys(digests)
        order = np.argsort(keys, kind="stable")
        keys, digests = keys[order], digests[order]
        same_key = keys[1:] == keys[:-1]
        same_digest = same_key & (_words(digests[1:]) == _words(digests[:-1])).all(axis=1)
        if (same_key & ~same_digest).any():  # a 64-bit key collision: order by the whole digest
            words = np.ascontiguousarray(digests).view(">u8").astype(np.uint64)
            fix = np.lexsort(words.T[::-1])
            order, keys, digests = order[fix], keys[fix], digests[fix]
            same_digest = (digests[1:] == digests[:-1]).all(axis=1)
        starts = np.flatnonzero(np.concatenate(([True], ~same_digest))) if n else np.zeros(0, np.int64)
        counts = np.diff(np.append(starts, n))
        return cls(generation, keys[starts], np.ascontiguousarray(digests[starts]), _narrow(starts), _narrow(counts),
                   _narrow(file_ids[order]), _narrow(offsets[order]), vaddrs[order])

    @classmethod
    def from_sql(cls, generation: str, conn: sqlite3.Connection) -> _Index:
        """Build the index from the pages table, reading it in chunks (no Python object per page kept)."""
        cols: list[list[np.ndarray]] = [[], [], [], []]
        cur = conn.execute("SELECT file_id, file_offset, vaddr, digest FROM pages")
        while rows := cur.fetchmany(_CHUNK):
            n = len(rows)
            for i in range(3):
                cols[i].append(np.fromiter((r[i] for r in rows), np.int64, n))
            cols[3].append(digests_to_array([r[3] for r in rows]).copy())
        if not cols[0]:
            empty = np.zeros(0, np.int64)
            return cls.from_columns(generation, empty, empty, empty.view(np.uint64),
                                    np.zeros((0, DIGEST_SIZE), np.uint8))
        fids, offs, vas, digs = (np.concatenate(c) for c in cols)
        return cls.from_columns(generation, fids, offs, vas.view(np.uint64), digs)

    def save(self, directory: Path) -> None:
        """Write the arrays as .npy files under `directory` (atomically: a temporary directory renamed)."""
        tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(self, name), allow_pickle=False)
        for old in directory.parent.iterdir():  # one index per KB: older generations go
            if old.is_dir() and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, directory)

    @classmethod
    def load(cls, directory: Path, generation: str) -> _Index | None:
        """Return the index saved under `directory`, memory-mapped (read on demand), or None."""
        try:
            # plain ndarray views of the maps: numpy.memmap's own indexing adds ~20% to a lookup
            arrays = {name: np.asarray(np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False))
                      for name in _ARRAYS}
        except (OSError, ValueError):
            return None
        rows = len(arrays["file_ids"])
        if not (len(arrays["offsets"]) == len(arrays["vaddrs"]) == rows
                and len(arrays["group_keys"]) == len(arrays["group_starts"]) == len(arrays["group_counts"])
                == len(arrays["group_digests"])):
            return None
        return cls(generation, **arrays)

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
        ok[cand] = (_words(self.group_digests[lo[cand]]) == _words(query[cand])).all(axis=1)
        out = np.where(ok, lo, -1)
        for i in np.flatnonzero(key_ok & ~ok):  # key collision: try the next groups with this key
            g = int(lo[i]) + 1
            while g < groups and self.group_keys[g] == qkeys[i]:
                if (self.group_digests[g] == query[i]).all():
                    out[i] = g
                    break
                g += 1
        return out


def _narrow(values: np.ndarray) -> np.ndarray:
    """Return int64 `values` as int32 when they fit (a smaller index on disk and in the page cache)."""
    if not values.size or (int(values.min()) >= -(1 << 31) and int(values.max()) < 1 << 31):
        return values.astype(np.int32)
    return values


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
        self._group_hits: list[tuple[PageHit, ...] | None] = [()]
        self._filled = np.zeros(0, bool)
        self._files: dict[int, tuple] = {}
        self.index_seconds = 0.0  # time the last index load or build took
        self.index_source = ""  # "mmap" (saved index) or "sqlite" (built from the pages table)
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
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('identity', ?)", (secrets.token_hex(8),))
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

    def package_versions(self, name: str) -> list[str]:
        """Return the versions of package `name` the KB holds, sorted as text."""
        return [v for (v,) in self._conn.execute("SELECT DISTINCT version FROM packages WHERE name=? ORDER BY version",
                                                  (name,))]

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

    def index_dir(self) -> Path:
        """Return where the memory-mapped lookup index of this KB is kept (beside the SQLite file)."""
        return self.path.with_name(self.path.name + ".index")

    def _load(self) -> _Index:
        gen = self._generation()
        if self._index is None or self._index.generation != gen:
            started = time.perf_counter()
            identity = self._conn.execute("SELECT value FROM meta WHERE key='identity'").fetchone()
            stamp = f"{_INDEX_FORMAT}-{identity[0] if identity else 'none'}-{gen}"
            directory = self.index_dir() / stamp
            idx = _Index.load(directory, gen)
            self.index_source = "mmap"
            if idx is None:
                idx = _Index.from_sql(gen, self._conn)
                self.index_source = "sqlite"
                with contextlib.suppress(OSError):  # a read-only place: lookups still work, from memory
                    idx.save(directory)
            self._index = idx
            self._group_hits = [None] * len(idx.group_keys) + [()]
            self._filled = np.zeros(len(idx.group_keys), bool)
            self._files = {r[0]: (r[1], r[2], r[3], r[4], r[5], r[6], bytes(r[7]).hex()) for r in self._conn.execute(
                "SELECT f.id, f.path, p.name, p.version, p.arch, p.source, f.build_id, f.sha256 FROM files f "
                "JOIN packages p ON p.id = f.package_id")}
            self.index_seconds = time.perf_counter() - started
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
        return PageHit(file_id, int(idx.offsets[row]), int(idx.vaddrs[row]), *self._files[file_id])

    def _fill(self, groups: np.ndarray) -> None:
        """Build the PageHit tuples of the given groups that have none yet (vectorised over their rows)."""
        idx = self._index
        assert idx is not None
        need = np.unique(groups[~self._filled[groups]])
        if not need.size:
            return
        counts = idx.group_counts[need].astype(np.int64)
        firsts = np.cumsum(counts) - counts
        rows = np.repeat(idx.group_starts[need].astype(np.int64) - firsts, counts) + np.arange(int(counts.sum()))
        files, cache = self._files, self._group_hits
        # the new tuples hold no cycles; letting the cyclic GC rescan the growing cache while they are
        # built made this 5-15x slower
        paused = gc.isenabled()
        gc.disable()
        try:
            hits = [PageHit(f, o, v, *files[f]) for f, o, v in zip(idx.file_ids[rows].tolist(),
                                                                      idx.offsets[rows].tolist(),
                                                                      idx.vaddrs[rows].tolist(), strict=True)]
            for g, first, n in zip(need.tolist(), firsts.tolist(), counts.tolist(), strict=True):
                cache[g] = tuple(hits[first:first + n])
        finally:
            if paused:
                gc.enable()
        self._filled[need] = True

    def lookup_shared(self, digests: list[bytes]) -> list[tuple[PageHit, ...]]:
        """Return, for each 32-byte page digest, every place it occurs: shared immutable tuples (() when
        unknown). The scan's call: no per-query copy, so it runs at numpy speed."""
        groups = self._load().groups_of(digests_to_array(digests))
        self._fill(groups[groups >= 0])
        return list(map(self._group_hits.__getitem__, groups.tolist()))  # type: ignore[arg-type]

    def lookup_digests(self, digests: list[bytes]) -> list[list[PageHit]]:
        """Return, for each 32-byte page digest, every place it occurs (a fresh list each; empty when unknown)."""
        shared = self.lookup_shared(digests)
        # building a million small lists would trigger the cyclic GC over every cached PageHit again
        # and again (3x slower); the lists hold no cycles, so pause it for this
        paused = gc.isenabled()
        gc.disable()
        try:
            return list(map(list, shared))
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

