"""Which Debian packages ship a file: the archive's Contents index through apt's Contents-deb index target.

The host's apt is left alone. A private apt state (<cache>/apt-contents) lists the host's own Debian
suites (the Debian entries of `apt-get indextargets`) and enables the `Contents-deb` index target, so
`apt-get update` there fetches `Contents-<arch>` with apt's authentication and proxies. The indexes are
parsed once into an SQLite cache of the paths an ELF can live at, keyed by the state of that apt setup.

Paths are compared in their merged-/usr form (`/bin/bash` and `/usr/bin/bash` are one file on a usrmerge
system, and bookworm's Contents still lists many files under /bin, /sbin and /lib).
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from debian import deb822

from nephoscope.core.errors import KnowledgeError
from nephoscope.core.paths import cache_root
from nephoscope.knowledge.debian.config import read_config, run_apt, state_key

__all__ = ["ContentsIndex", "contents_options", "ensure_contents", "iter_contents", "merged_path",
           "parse_contents_line", "wanted_path"]

FORMAT = "1"
MAX_AGE = 24 * 3600.0
MAX_PATH = 4096  # a longer guest-supplied path names no packaged file
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
_MERGED_HEADS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# where a mapped ELF can be: a shared object, or anything in a bin/sbin/libexec/lib directory
_LIBRARY = re.compile(r"\.so(\.[0-9][0-9A-Za-z.+_-]*)?$")
_EXEC_DIR = re.compile(r"(^|/)(s?bin|libexec|games|lib(32|64|x32)?)/")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE paths(path TEXT NOT NULL, package TEXT NOT NULL);
"""


def merged_path(path: str) -> str:
    """Return `path` (any form: 'bin/x', '/lib/x', '/usr/bin/x') as an absolute merged-/usr path."""
    path = "/" + path.lstrip("/")
    head = path.split("/", 2)[1] if path.count("/") >= 2 else ""
    return "/usr" + path if head in _MERGED_HEADS else path


def wanted_path(path: str) -> bool:
    """Return whether a Contents path could be a mapped ELF (a shared object or in a bin/lib directory)."""
    if path.startswith(("usr/share/", "usr/include/", "usr/src/")):
        return False
    return bool(_LIBRARY.search(path.rsplit("/", 1)[-1]) or _EXEC_DIR.search(path))


def parse_contents_line(line: str) -> tuple[str, list[str]] | None:
    """Return (merged path, package names) of one `Contents-<arch>` line, or None for a header or junk.

    A line is `PATH<whitespace>SECTION/PACKAGE[,SECTION/PACKAGE...]`; the path may contain spaces, so the
    last whitespace-separated field is the package list."""
    line = line.rstrip("\n")
    path, _, locations = line.rpartition(" ")
    path = path.rstrip(" \t")
    if not path or not locations or path == "FILE":
        return None
    names = [loc.rsplit("/", 1)[-1] for loc in locations.split(",")]
    names = [n for n in names if _PACKAGE.match(n)]
    return (merged_path(path), names) if names else None


def contents_root() -> Path:
    """Return the private apt directory for Contents indexes (<cache>/apt-contents)."""
    return cache_root() / "apt-contents"


def contents_options(root: Path | None = None) -> tuple[str, ...]:
    """Return the `-o` options of the private apt setup that also fetches Contents-<arch>."""
    root = root or contents_root()
    target = "Acquire::IndexTargets::deb::Contents-deb::"
    opts = [f"Dir::Etc::SourceList={root / 'sources.list'}", "Dir::Etc::SourceParts=/dev/null",
            f"Dir::State::Lists={root / 'lists'}", f"Dir::Cache={root / 'cache'}",
            f"{target}MetaKey=$(COMPONENT)/Contents-$(ARCHITECTURE)",
            f"{target}ShortDescription=Contents-$(ARCHITECTURE)",
            f"{target}Description=$(RELEASE)/$(COMPONENT) $(ARCHITECTURE) Contents (deb)",
            f"{target}flatMetaKey=Contents-$(ARCHITECTURE)", f"{target}flatDescription=$(RELEASE) Contents (deb)",
            f"{target}PDiffs=false", f"{target}KeepCompressed=true"]
    if os.geteuid() == 0:
        opts.append("APT::Sandbox::User=root")
    return tuple(arg for opt in opts for arg in ("-o", opt))


def host_sources() -> str:
    """Return a sources list naming the host's Debian suites (from the host's `apt-get indextargets`)."""
    text = run_apt(["apt-get", "indextargets"])
    lines: dict[str, None] = {}
    for t in deb822.Deb822.iter_paragraphs(text.splitlines()):
        if t.get("Identifier") != "Packages" or t.get("Origin") != "Debian":
            continue
        uri, release, component = t.get("Repo-URI", ""), t.get("Release", ""), t.get("Component", "")
        if uri and release and component:
            lines[f"deb [signed-by={KEYRING}] {uri} {release} {component}\n"] = None
    if not lines:
        raise KnowledgeError("the host's apt lists no Debian suite (apt-get indextargets shows no Debian Packages "
                             "index); add a Debian source and run `apt-get update`")
    return "".join(sorted(lines))


def _lists_age(lists: Path) -> float | None:
    stamps = [p.stat().st_mtime for p in lists.glob("*Contents-*")]
    return time.time() - max(stamps) if stamps else None


def ensure_contents(max_age: float = MAX_AGE, sources: str | None = None) -> tuple[str, ...]:
    """Write the private sources list, fetch Contents indexes when missing or stale; return the apt options."""
    root = contents_root()
    for sub in ("lists/partial", "cache/archives/partial"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    sources = sources if sources is not None else host_sources()
    listing = root / "sources.list"
    changed = not listing.exists() or listing.read_text() != sources
    if changed:
        listing.write_text(sources)
    options = contents_options(root)
    age = _lists_age(root / "lists")
    if changed or age is None or age > max_age:
        try:
            run_apt(["apt-get", *options, "-q", "update"])
        except KnowledgeError as exc:
            if changed or age is None:
                raise KnowledgeError(f"cannot fetch the archive's Contents index (is the package registry "
                                     f"reachable?): {exc}") from exc
        if _lists_age(root / "lists") is None:
            raise KnowledgeError(f"apt-get update wrote no Contents index in {root / 'lists'}")
    return options


def contents_files(options: tuple[str, ...]) -> list[Path]:
    """Return the Contents index files apt keeps under `options` (present on disk)."""
    text = run_apt(["apt-get", *options, "indextargets"])
    out = []
    for t in deb822.Deb822.iter_paragraphs(text.splitlines()):
        path = Path(t.get("Filename", ""))
        # arch-independent packages ship no native code to map: Contents-all (3x the size) is skipped
        if t.get("Identifier") == "Contents-deb" and t.get("Architecture") != "all" and path.is_file():
            out.append(path)
    return out


def iter_contents(path: Path) -> Iterator[str]:
    """Yield the lines of a Contents index in any compression apt keeps (through `apt-helper cat-file`)."""
    helper = "/usr/lib/apt/apt-helper"
    proc = subprocess.Popen([helper, "cat-file", str(path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            yield raw.decode("utf-8", "replace")
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            raise KnowledgeError(f"cannot read the Contents index {path} (apt-helper cat-file failed)")


class ContentsIndex:
    """Merged-/usr path → packages shipping it, for the ELF-capable paths of the archive's Contents."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    @classmethod
    def from_lines(cls, lines: Iterable[str], path: Path | str = ":memory:", key: str = "") -> ContentsIndex:
        """Build an index from Contents lines (tests; `open` for the archive's)."""
        tmp = Path(f"{path}.{os.getpid()}.{threading.get_ident()}.tmp") if str(path) != ":memory:" else None
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        db = sqlite3.connect(tmp or ":memory:", check_same_thread=False)
        db.executescript(_SCHEMA)
        batch: list[tuple[str, str]] = []
        for line in lines:
            if not wanted_path(line.lstrip("/")):
                continue
            parsed = parse_contents_line(line)
            if parsed:
                batch += [(parsed[0], n) for n in parsed[1]]
            if len(batch) > 100_000:
                db.executemany("INSERT INTO paths VALUES (?, ?)", batch)
                batch = []
        db.executemany("INSERT INTO paths VALUES (?, ?)", batch)
        db.execute("CREATE INDEX paths_path ON paths(path)")
        db.executemany("INSERT INTO meta VALUES (?, ?)", [("key", key), ("format", FORMAT)])
        db.commit()
        if tmp is None:
            return cls(db)
        db.close()
        os.replace(tmp, path)
        return cls(sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False))

    @classmethod
    def open(cls, options: tuple[str, ...] | None = None) -> ContentsIndex:
        """Return the index of the Contents files apt keeps under `options` (default: `ensure_contents()`)."""
        options = ensure_contents() if options is None else options
        files = contents_files(options)
        if not files:
            raise KnowledgeError("apt keeps no Contents index for the archive; run `nephoscope kb sync` with the "
                                 "package registry reachable")
        key = state_key(read_config(options), FORMAT)
        path = contents_root() / f"contents-{hashlib.sha256(repr(options).encode()).hexdigest()[:16]}.sqlite"
        if path.exists():
            try:
                db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
                if dict(db.execute("SELECT key, value FROM meta")) == {"key": key, "format": FORMAT}:
                    return cls(db)
                db.close()
            except sqlite3.Error:
                pass  # a damaged cache is rebuilt
        lines = (line for f in files for line in iter_contents(f))
        return cls.from_lines(lines, path, key)

    def packages(self, path: str) -> list[str]:
        """Return the packages whose Contents list `path` (any usrmerge form), sorted; [] when none."""
        if not path or len(path) > MAX_PATH or "\0" in path:
            return []
        rows = self._db.execute("SELECT DISTINCT package FROM paths WHERE path = ? ORDER BY package",
                                (merged_path(path),))
        return [p for (p,) in rows]

    def by_basename(self, name: str, limit: int = 16) -> list[tuple[str, str]]:
        """Return (path, package) pairs whose file name is `name` (at most `limit`; a hint from an ELF soname)."""
        if not name or "/" in name or len(name) > 255:
            return []
        rows = self._db.execute("SELECT path, package FROM paths WHERE path LIKE ? ESCAPE '\\' LIMIT ?",
                                ("%/" + name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_"),
                                 limit))
        return [(p, n) for p, n in rows]
