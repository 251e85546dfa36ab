"""Which Debian version of a package ships a binary with a given GNU build id, and what readers derived from it.

Readers that need per-build knowledge (PHP's globals, CPython's struct offsets) meet builds they have never
seen: the point release next to its security update, a guest installed from another snapshot. The build id
(read from the ELF notes in guest memory) names the build exactly; `find_debian_version` finds the package
version it belongs to: first the KB's record of that file (the code-page DB stores every ingested ELF
file's build id with its package and version), then every version apt offers, newest first, each `.deb`
downloaded into `<cache>/debs` (reused) and the binary's build id read on the host. A KB hit is still
checked against the downloaded binary: only the archive's bytes are trusted. `BuildCache` keeps what a
reader derived per build id in `<cache>/interp/NAME` (JSON), validated on load: a corrupt file or entry is
ignored and derived again. A lookup that fails is remembered for the rest of the process (`failure`), so
an unknown build id costs its downloads once per run. Host only; no guest access, nothing pauses.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nephoscope.core.errors import KnowledgeError, NephoscopeError
from nephoscope.core.paths import cache_root

Record = dict[str, Any]
Identify = Callable[[str, Path], "str | None"]  # (version, unpacked binary) -> its build id
# (cache file, package, binary, build id) -> why no build was found; in-process only (see `failure`)
_FAILED: dict[tuple[str, str, str, str], str] = {}


def elf_build_id(path: Path) -> str | None:
    """Return the GNU build id of the ELF file at host `path`; KnowledgeError when it is not readable."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    from nephoscope.knowledge.elfpages import find_build_id

    try:
        with path.open("rb") as fh:
            return find_build_id(ELFFile(fh))
    except (OSError, ELFError) as exc:
        raise KnowledgeError(f"{path}: not a readable ELF file ({exc})") from None


def kb_versions(build_id: str, package: str, binary: str) -> list[str]:
    """Return the versions of `package` whose `binary` the KB records with `build_id` (read-only; [] without a KB)."""
    from nephoscope.knowledge.binaries import files_with_build_id

    try:
        return [version for path, name, version in files_with_build_id(build_id)
                if name == package and path == binary]
    except NephoscopeError:
        return []


@dataclass(slots=True)
class VersionSearch:
    """What `find_debian_version` found: the version and its unpacked binary, or what it tried."""

    version: str | None = None
    path: Path | None = None  # the binary in the unpacked .deb of `version`
    from_kb: bool = False  # the KB named the version (and the download confirmed it)
    tried: list[str] = field(default_factory=list)  # "3.11.2-6+deb12u8: build 2dd439c6335b" per version

    def why(self, build_id: str, package: str, binary: str) -> str:
        """Return the sentence for a search that found nothing."""
        tried = "; ".join(self.tried) if self.tried else "apt offers no version of it"
        return f"build id {build_id} of {binary} is in no {package} version nephoscope could fetch (tried: {tried})"


def find_debian_version(build_id: str, package: str, binary: str, *, versions: Sequence[str] | None = None,
                        skip: Mapping[str, str] | None = None, identify: Identify | None = None) -> VersionSearch:
    """Return the version of Debian `package` whose `binary` has GNU build id `build_id` (downloads .debs).

    The KB's versions for that build id come first; then `versions` (default: every version apt offers),
    except those in `skip` ({version: build id} of builds known already). `identify(version, path)` reads
    the build id of the unpacked binary (default: its ELF note); a reader can record what it learns of each
    build there. Download or parse failures are noted in `tried`, never raised. Host only.
    """
    from nephoscope.knowledge.debian import archive

    search = VersionSearch()
    from_kb = kb_versions(build_id, package, binary)
    if versions is None:
        try:
            versions = archive.available_versions(package)
        except NephoscopeError as exc:
            search.tried.append(f"apt cannot list {package} ({exc})")
            versions = ()
    skip = skip or {}
    order = list(dict.fromkeys([*from_kb, *(v for v in versions if v not in skip)]))
    search.tried.extend(f"{v}: build {skip[v][:12]} (known)" for v in versions if v in skip and v not in from_kb)
    identify = identify or (lambda _version, path: elf_build_id(path))
    for version in order:
        try:
            root = archive.unpack(archive.download(package, version, cache_root() / "debs"),
                                  cache_root() / "unpacked") / "root"
            path = root / binary.lstrip("/")
            got = identify(version, path)
        except NephoscopeError as exc:
            search.tried.append(f"{version}: {str(exc)[:200]}")
            continue
        search.tried.append(f"{version}: build {(got or 'none')[:12]}" + (" (named by the KB)"
                                                                          if version in from_kb else ""))
        if got == build_id:
            search.version, search.path, search.from_kb = version, path, version in from_kb
            return search
    return search


def failure(cache: BuildCache, package: str, binary: str, build_id: str) -> str | None:
    """Return why this build id was not found earlier in this process, or None (not tried yet)."""
    return _FAILED.get((str(cache.path), package, binary, build_id))


def remember_failure(cache: BuildCache, package: str, binary: str, build_id: str, why: str) -> None:
    """Remember for the rest of the process that this build id was looked up in vain, and why."""
    _FAILED[(str(cache.path), package, binary, build_id)] = why


class BuildCache:
    """What a reader derived per build id, in `<cache>/interp/NAME` as {build id: record}; validated on load."""

    def __init__(self, name: str, valid: Callable[[str, Any], bool], path: Path | None = None) -> None:
        self.path = path or cache_root() / "interp" / name
        self.valid = valid
        self.dropped = 0  # entries (or a whole file) that did not validate
        self.entries = self._load()

    def _load(self) -> dict[str, Record]:
        try:
            raw = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, ValueError):
            self.dropped += 1
            return {}
        if not isinstance(raw, dict):
            self.dropped += 1
            return {}
        out = {}
        for build_id, record in raw.items():
            try:
                ok = isinstance(record, dict) and self.valid(build_id, record)
            except (KeyError, TypeError, ValueError, AttributeError):
                ok = False
            if ok:
                out[build_id] = record
            else:
                self.dropped += 1
        return out

    def get(self, build_id: str) -> Record | None:
        """Return the record of `build_id`, or None."""
        return self.entries.get(build_id)

    def put(self, build_id: str, record: Record) -> None:
        """Add (or replace) the record of `build_id`; `save` writes it."""
        self.entries[build_id] = record

    def versions(self, package: str) -> dict[str, str]:
        """Return {version: build id} of the builds of `package` recorded here."""
        return {str(r.get("version")): b for b, r in self.entries.items() if r.get("package") == package}

    def save(self) -> None:
        """Write the records (merged with valid ones another process added meanwhile); best effort, atomic."""
        merged = {**BuildCache(self.path.name, self.valid, self.path).entries, **self.entries}
        tmp = ""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".builds-", dir=self.path.parent)
            with os.fdopen(fd, "w") as fh:
                json.dump(merged, fh, indent=1, sort_keys=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except OSError:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
