"""The script files interpreters run: read from the page cache, hashed whole, identified by the script DB.

Each file an interpreter reports (entry script, imported modules with a script suffix) is found by path
in the dentry cache of the file system the interpreter binary lives on, read from the page cache
(os/linux/pagecache.py) and hashed. Its status: `known` when the hash is a packaged file's; `modified`
when an ingested package ships that path with other bytes; `unknown` when the hash matches nothing and
the path lies where Debian never installs (/opt, /usr/local, /srv, ...: Debian Policy 9.1); otherwise
`unverifiable` (its package is not ingested, pages are not cached, the dentry is not cached). Addresses
are kernel gvas; nothing here pauses the VM.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from nephoscope.core.errors import GuestDataError, MemoryAccessError
from nephoscope.core.payloads import Interpreter, ScriptEntry
from nephoscope.core.records import Observation, Verdict
from nephoscope.core.text import escape_guest
from nephoscope.introspect.base import observe
from nephoscope.introspect.interp import InterpResult, iter_contexts, read_interpreters
from nephoscope.knowledge.scripts import SCRIPT_SUFFIXES, KnownScript, ScriptDB, outside_packages

MAX_SCRIPT_BYTES = 8 << 20
HEAD_LINES, HEAD_CHARS = 5, 160
MAX_STACK = 64
ARCHIVE_SUFFIXES = (".jar", ".war")  # zip archives: shown by their manifest, not their first bytes
MANIFEST_KEYS = ("Main-Class", "Implementation-Title", "Implementation-Version", "Created-By")
_BAD = (MemoryAccessError, GuestDataError)
DIST = re.compile(r"/(?:dist|site)-packages/([^/]+)/")
KNOWN, UNKNOWN, MODIFIED, UNVERIFIABLE = "known", "unknown", "modified", "unverifiable"


@dataclass(slots=True)
class ScriptFile:
    """One script file an interpreter runs, read from the page cache and identified by its hash."""

    path: str
    status: str
    reason: str = ""
    sha256: str = ""
    size: int = 0
    known: list[KnownScript] = field(default_factory=list)
    # first lines (a jar: its manifest's main attributes), escaped (unknown and modified files)
    head: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> Verdict:
        return Verdict.UNVERIFIABLE if self.status == UNVERIFIABLE else Verdict.VERIFIED

    @property
    def label(self) -> str:
        """Return "flask 2.2.2 (python3-flask 2.2.2-3)" for a packaged file, "" otherwise."""
        if not self.known:
            return ""
        k = self.known[0]
        upstream = k.version.split(":", 1)[-1].rsplit("-", 1)[0]
        m = DIST.search(self.path)
        project = m.group(1) if m else k.package
        return f"{project} {upstream} ({k.package} {k.version})"

    def entry(self) -> ScriptEntry:
        """Return the observation record of this file."""
        k = self.known[0] if self.known else None
        return ScriptEntry(self.path, self.status, self.sha256, self.label, k.package if k else "",
                           k.version if k else "", self.reason, tuple(self.head))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "status": self.status, "verdict": str(self.verdict), "reason": self.reason,
                "sha256": self.sha256, "size": self.size, "identity": self.label,
                "known": [{"package": k.package, "version": k.version, "path": k.path} for k in self.known],
                "head": self.head}


@dataclass(slots=True)
class InterpProcess:
    """An interpreter process with its script files identified."""

    result: InterpResult
    files: list[ScriptFile] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.result.to_dict(), "files": [f.to_dict() for f in self.files]}


def head_of(path: str, data: bytes) -> list[str]:
    """Return what shows a file: its first lines, or a jar's manifest attributes (all escaped)."""
    if path.endswith(ARCHIVE_SUFFIXES):
        return _manifest_head(data)
    text = data[:HEAD_LINES * HEAD_CHARS * 2].decode("utf-8", "backslashreplace")
    return [escape_guest(line, HEAD_CHARS) for line in text.splitlines()[:HEAD_LINES]]


def _manifest_head(data: bytes) -> list[str]:
    """Return "META-INF/MANIFEST.MF:" and the manifest's main attributes, or why there are none to show.

    A jar's first lines are zip bytes; its manifest says what it is. `data` is the whole file as read from
    the page cache (the CRC-32 of the manifest entry is checked).
    """
    from nephoscope.introspect.interp.java import read_manifest

    manifest, problem = read_manifest(data, (), len(data))
    if problem:
        return [escape_guest(f"(a zip archive; no manifest to show: {problem})", HEAD_CHARS)]
    shown = [f"{key}: {manifest[key]}" for key in MANIFEST_KEYS if manifest.get(key)]
    if not shown:
        return ["(a zip archive; its manifest has none of " + ", ".join(MANIFEST_KEYS) + ")"]
    return ["META-INF/MANIFEST.MF:", *(escape_guest(line, HEAD_CHARS) for line in shown)]


def read_script(k: Any, root: int, path: str, db: ScriptDB | None, cache_tag: str = "") -> ScriptFile:
    """Return one script file read from the page cache below dentry `root`, hashed and identified.

    A Python source whose pages are not cached (CPython imported its __pycache__ pyc, not the source) is
    identified by that pyc when `cache_tag` ("cpython-311") names it: the script DB holds the pycs the
    guest's CPython compiles from each packaged source at install.
    """
    got = _read_one(k, root, path, db)
    if got.status != UNVERIFIABLE or not cache_tag or not path.endswith(".py") or not got.size:
        return got
    directory, _, name = path.rpartition("/")
    pyc = f"{directory}/__pycache__/{name.removesuffix('.py')}.{cache_tag}.pyc"
    compiled = _read_one(k, root, pyc, db)
    if compiled.status == KNOWN:
        return ScriptFile(path, KNOWN, f"source not in the page cache; the pyc it runs ({pyc}) is the one CPython "
                          "compiles from the packaged source", compiled.sha256, got.size, compiled.known)
    if compiled.status in (UNKNOWN, MODIFIED):
        return ScriptFile(path, compiled.status, f"source not in the page cache; its pyc {pyc}: {compiled.reason}",
                          compiled.sha256, got.size, [], compiled.head)
    return ScriptFile(path, UNVERIFIABLE, f"{got.reason}; its pyc: {compiled.reason}", size=got.size)


def _read_one(k: Any, root: int, path: str, db: ScriptDB | None) -> ScriptFile:
    from nephoscope.os.linux import pagecache

    try:
        dentry = pagecache.lookup_dentry(k, root, path)
        inode = pagecache.dentry_inode(k, dentry) if dentry else 0
        if not inode:
            return ScriptFile(path, UNVERIFIABLE, "not in the guest's dentry cache (or on another mount)")
        if pagecache.inode_is_symlink(k, inode):
            return ScriptFile(path, UNVERIFIABLE, "a symbolic link in the guest (its target is not followed)")
        cached = pagecache.read_cached_file(k, inode, "inode", max_bytes=MAX_SCRIPT_BYTES)
    except _BAD as exc:
        return ScriptFile(path, UNVERIFIABLE, f"page cache unreadable ({exc})")
    if not cached.complete:
        return ScriptFile(path, UNVERIFIABLE, cached.why_incomplete, size=cached.size)
    digest = hashlib.sha256(cached.data).hexdigest()
    known = db.identify(digest) if db is not None else []
    if known:
        return ScriptFile(path, KNOWN, "its sha256 (page-cache copy) is a packaged file's", digest, cached.size, known)
    shipping = db.shipping(path) if db is not None else []
    if shipping:
        return ScriptFile(path, MODIFIED, f"{shipping[0].package} {shipping[0].version} ships this path with "
                          "other bytes", digest, cached.size, [], head_of(path, cached.data))
    if outside_packages(path):
        return ScriptFile(path, UNKNOWN, "its sha256 is in no known package, and Debian packages never install "
                          "there", digest, cached.size, [], head_of(path, cached.data))
    return ScriptFile(path, UNVERIFIABLE, "its sha256 is in no ingested package (ingest the guest's packages: "
                      "nephoscope scripts --ingest PKG=VERSION)" if db is not None else "no script-hash DB",
                      digest, cached.size)


def _root_dentry(k: Any, result: InterpResult, vmas: list[Any]) -> int | None:
    """Return the root dentry of the file system the interpreter binary lives on (its vm_file's mount)."""
    binary = result.details.get("binary", "")
    vma = next((v for v in vmas if v.file_gva and v.path == binary), None) or \
        next((v for v in vmas if v.file_gva), None)
    if vma is None:
        return None
    mnt = k.u64(vma.file_gva + k.off["file.f_path"] + k.off["path.mnt"])
    return int(k.u64(mnt + k.off["vfsmount.mnt_root"]))


def _is_file(path: str) -> bool:
    return path.startswith("/") and not path.startswith("<")


def collect_scripts(k: Any, db: ScriptDB | None, *, max_files: int = 4096) -> list[InterpProcess]:
    """Return every interpreter process of kernel `k` with its script files identified (no pause here)."""
    results = read_interpreters(k)
    vmas = {ctx.task.pid: ctx.vmas for ctx in iter_contexts(k, {r.pid for r in results})}
    out: list[InterpProcess] = []
    seen: dict[tuple[int, str], ScriptFile] = {}
    for result in results:
        proc = InterpProcess(result)
        # the entry script (any name: /usr/bin/gunicorn) and every loaded file with a script suffix; extension
        # modules (.so) are ELF code, identified by their pages like any binary
        paths = [p for p in dict.fromkeys([result.entry, *(s for s in result.scripts if s.endswith(SCRIPT_SUFFIXES))])
                 if p and _is_file(p)]
        try:
            root = _root_dentry(k, result, vmas.get(result.pid, []))
        except _BAD:
            root = None
        for path in paths[:max_files]:
            if root is None:
                proc.files.append(ScriptFile(path, UNVERIFIABLE, "no file system root for this process"))
                continue
            if (root, path) not in seen:
                seen[(root, path)] = read_script(k, root, path, db, str(result.details.get("cache_tag", "")))
            proc.files.append(seen[(root, path)])
        out.append(proc)
    return out


def observations(method: str, vm: Any, processes: list[InterpProcess]) -> Iterator[Observation]:
    """Yield one `interpreter` observation per interpreter process (verdict and reason of its reader)."""
    for proc in processes:
        r = proc.result
        stacks = tuple(tuple(f"{f.function} ({f.file}:{f.line})" for f in th.frames[:MAX_STACK]) for th in r.threads)
        payload = Interpreter(r.pid, r.kind, r.runtime, r.entry, stacks, len(r.scripts),
                              tuple(f.entry() for f in proc.files))
        yield observe(method, vm, "interpreter", f"pid:{r.pid}:interpreter", payload, r.verdict, r.reason)
