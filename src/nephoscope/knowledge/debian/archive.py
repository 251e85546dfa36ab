"""Which Debian package versions the host's apt can fetch, their control records, and .deb downloads.

Questions are answered in-process from apt's own indexes (see `index`); downloads still go through
`apt-get download`, so apt's sources, authentication and proxies apply unchanged. Every function takes
the `-o` options of an apt setup: () for the host's, `ensure_extra()` for the private extra suites.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from debian import deb822

from nephoscope.core.errors import KnowledgeError
from nephoscope.core.paths import cache_root
from nephoscope.knowledge.debian.config import run_apt
from nephoscope.knowledge.debian.index import ArchiveIndex
from nephoscope.knowledge.debian.relations import Relation, depends_of, parse_depends

__all__ = ["EXTRA_MIRROR", "EXTRA_SUITES", "Relation", "available_versions", "depends_of", "download",
           "ensure_extra", "extra_options", "extra_root", "extra_sources", "find_candidate", "package_names",
           "package_record", "parse_depends", "unpack", "version_sources"]


@functools.cache
def archive_index(options: tuple[str, ...] = ()) -> ArchiveIndex:
    """Return the (process-wide) index of what apt knows under `options`."""
    return ArchiveIndex.open(options)


def available_versions(name: str, options: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Return every version apt can fetch for binary package `name`, newest first (empty if none)."""
    return archive_index(options).versions(name)


def version_sources(name: str, options: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Return (version, index) pairs of `name`, newest first: the lines `apt-cache madison` prints."""
    return archive_index(options).sources(name)


def find_candidate(name: str, options: tuple[str, ...] = ()) -> str | None:
    """Return the version apt would install (`apt-cache policy` Candidate, ignoring what is installed)."""
    return archive_index(options).candidate(name)


def package_record(name: str, version: str, options: tuple[str, ...] = ()) -> deb822.Packages:
    """Return apt's control record for `name` at exactly `version`."""
    text = archive_index(options).record(name, version)
    if text is None:
        raise KnowledgeError(f"apt knows no {name}={version}; run `apt-get update` or check the version")
    return deb822.Packages(text)


def package_names(prefix: str, options: tuple[str, ...] = ()) -> list[str]:
    """Return the binary package names apt knows that start with `prefix` (apt-cache pkgnames)."""
    return archive_index(options).names(prefix)


def download(name: str, version: str, cache_dir: Path, options: tuple[str, ...] = ()) -> Path:
    """Fetch `name=version` into `cache_dir` (reusing a cached copy) and return the .deb path.

    Each call downloads into its own temporary directory under `cache_dir`, so parallel downloads (the
    KB sync's worker threads, two nephoscope processes) never see each other's partial files."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    record = package_record(name, version, options)
    target = cache_dir / Path(record["Filename"]).name
    if target.exists() and target.stat().st_size == int(record.get("Size", target.stat().st_size)):
        return target
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_dir))
    try:
        proc = subprocess.run(["apt-get", *options, "download", "-q", f"{name}={version}"], cwd=tmp,
                              capture_output=True, text=True, check=False)
        got = list(tmp.glob("*.deb"))
        if proc.returncode != 0 or not got:
            raise KnowledgeError(f"apt-get download {name}={version} failed: {proc.stderr.strip()[:400]} "
                                 "(is `apt-get update` done and the package registry reachable?)")
        got[0].replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def unpack(deb: Path, cache_dir: Path) -> Path:
    """Unpack a .deb with dpkg-deb into a cached directory and return it (data and control)."""
    target = cache_dir / deb.name.removesuffix(".deb")
    if (target / ".complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    (target / "root").mkdir(parents=True)
    run_apt(["dpkg-deb", "-x", str(deb), str(target / "root")])
    run_apt(["dpkg-deb", "-e", str(deb), str(target / "control")])
    (target / ".complete").write_text("ok\n")
    return target


# --- extra suites (bookworm-backports) through a private apt setup; the host's apt is left alone ---

EXTRA_MIRROR = "http://deb.debian.org/debian"
EXTRA_SUITES = ("bookworm-backports",)
EXTRA_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
EXTRA_MAX_AGE = 24 * 3600.0


def extra_root() -> Path:
    """Return the private apt directory for extra suites (<cache>/apt-extra)."""
    return cache_root() / "apt-extra"


def extra_options(root: Path | None = None) -> tuple[str, ...]:
    """Return the `-o` options that point apt-get/apt-cache at the private sources, lists and cache."""
    root = root or extra_root()
    opts = [f"Dir::Etc::SourceList={root / 'sources.list'}", "Dir::Etc::SourceParts=/dev/null",
            f"Dir::State::Lists={root / 'lists'}", f"Dir::Cache={root / 'cache'}"]
    if os.geteuid() == 0:
        opts.append("APT::Sandbox::User=root")  # _apt cannot write under root's cache directory
    return tuple(arg for opt in opts for arg in ("-o", opt))


def extra_sources() -> str:
    """Return the one-line sources list of the extra suites."""
    return "".join(f"deb [signed-by={EXTRA_KEYRING}] {EXTRA_MIRROR} {suite} main\n" for suite in EXTRA_SUITES)


def _lists_age(lists: Path) -> float | None:
    """Return the age in seconds of the newest Packages index in `lists`, or None if there is none."""
    stamps = [p.stat().st_mtime for p in lists.glob("*_Packages*")]
    return time.time() - max(stamps) if stamps else None


def ensure_extra(max_age: float = EXTRA_MAX_AGE) -> tuple[str, ...]:
    """Write the private sources list, refresh its package lists when stale, and return the apt options."""
    if not EXTRA_KEYRING.exists():
        raise KnowledgeError(f"{EXTRA_KEYRING} is missing; install debian-archive-keyring to use "
                             f"{', '.join(EXTRA_SUITES)}")
    root = extra_root()
    for sub in ("lists/partial", "cache/archives/partial"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    sources = root / "sources.list"
    changed = not sources.exists() or sources.read_text() != extra_sources()
    if changed:
        sources.write_text(extra_sources())
    options = extra_options(root)
    age = _lists_age(root / "lists")
    if changed or age is None or age > max_age:
        _update_extra(options, root, stale_ok=not changed and age is not None)
    return options


def _update_extra(options: tuple[str, ...], root: Path, stale_ok: bool) -> None:
    """Run `apt-get update` on the private setup; with `stale_ok`, keep the old lists if it fails."""
    try:
        run_apt(["apt-get", *options, "-q", "update"])
    except KnowledgeError as exc:
        if stale_ok:
            return
        raise KnowledgeError(f"cannot refresh {', '.join(EXTRA_SUITES)} from {EXTRA_MIRROR} "
                             f"(is the package registry reachable?): {exc}") from exc
    if _lists_age(root / "lists") is None:
        raise KnowledgeError(f"apt-get update wrote no package list for {', '.join(EXTRA_SUITES)} in {root}")
    archive_index.cache_clear()  # the lists changed: the next question re-reads them
