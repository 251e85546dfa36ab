"""Ask the host's apt which Debian package versions exist, and fetch .deb files into a cache."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from debian import deb822
from debian.debian_support import Version

from nephoscope.core.errors import LabError
from nephoscope.core.paths import cache_root

_DEP_RE = re.compile(r"^\s*([a-z0-9][a-z0-9+.\-]*)(?::[a-z0-9]+)?\s*(?:\(\s*(<<|<=|=|>=|>>)\s*([^)\s]+)\s*\))?")


@dataclass(frozen=True, slots=True)
class Relation:
    """One alternative of a Depends field: a name and an optional version constraint."""

    name: str
    op: str | None = None
    version: str | None = None

    def allows(self, version: str) -> bool:
        """Return whether `version` satisfies this relation's constraint (Debian order)."""
        if self.op is None or self.version is None:
            return True
        have, want = Version(version), Version(self.version)
        return {
            "<<": have < want,
            "<=": have <= want,
            "=": have == want,
            ">=": have >= want,
            ">>": have > want,
        }[self.op]

    def __str__(self) -> str:
        return f"{self.name} ({self.op} {self.version})" if self.op else self.name


def parse_depends(field: str) -> list[list[Relation]]:
    """Parse a Depends-style field into AND-groups of OR-alternatives."""
    groups: list[list[Relation]] = []
    for group in field.split(","):
        alts = []
        for alt in group.split("|"):
            m = _DEP_RE.match(alt)
            if m:
                alts.append(Relation(m.group(1), m.group(2), m.group(3)))
        if alts:
            groups.append(alts)
    return groups


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise LabError(f"`{cmd[0]}` is missing; run `make setup` (Debian 12 host) first")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[:400]}")
    return proc.stdout


@functools.cache
def available_versions(name: str, options: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Return every version apt can fetch for binary package `name`, newest first."""
    out = subprocess.run(["apt-cache", *options, "madison", name], capture_output=True, text=True,
                         check=False).stdout
    versions = {line.split("|")[1].strip() for line in out.splitlines() if line.count("|") >= 2
                and line.split("|")[0].strip() == name}
    return tuple(sorted(versions, key=Version, reverse=True))


@functools.cache
def package_record(name: str, version: str, options: tuple[str, ...] = ()) -> deb822.Packages:
    """Return apt's control record for `name` at exactly `version`."""
    text = _run(["apt-cache", *options, "show", f"{name}={version}"])
    first = text.split("\n\n", 1)[0]
    return deb822.Packages(first)


def depends_of(record: deb822.Packages) -> list[list[Relation]]:
    """Return the Pre-Depends and Depends groups of a package record."""
    fields = [record.get("Pre-Depends", ""), record.get("Depends", "")]
    return [g for f in fields if f for g in parse_depends(f)]


def download(name: str, version: str, cache_dir: Path, options: tuple[str, ...] = ()) -> Path:
    """Fetch `name=version` into `cache_dir` (reusing a cached copy) and return the .deb path."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    record = package_record(name, version, options)
    filename = Path(record["Filename"]).name
    target = cache_dir / filename
    if target.exists() and target.stat().st_size == int(record.get("Size", target.stat().st_size)):
        return target
    tmp = cache_dir / ".download"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    proc = subprocess.run(["apt-get", *options, "download", "-q", f"{name}={version}"], cwd=tmp,
                          capture_output=True, text=True, check=False)
    got = list(tmp.glob("*.deb"))
    if proc.returncode != 0 or not got:
        raise LabError(f"apt-get download {name}={version} failed: {proc.stderr.strip()[:400]} "
                       "(is `apt-get update` done and the package registry reachable?)")
    got[0].replace(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def unpack(deb: Path, cache_dir: Path) -> Path:
    """Unpack a .deb with dpkg-deb into a cached directory and return it (data and control)."""
    target = cache_dir / deb.name.removesuffix(".deb")
    if (target / ".complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    (target / "root").mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(target / "root")])
    _run(["dpkg-deb", "-e", str(deb), str(target / "control")])
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
        raise LabError(f"{EXTRA_KEYRING} is missing; install debian-archive-keyring to use {', '.join(EXTRA_SUITES)}")
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
        _run(["apt-get", *options, "-q", "update"])
    except LabError as exc:
        if stale_ok:
            return
        raise LabError(f"cannot refresh {', '.join(EXTRA_SUITES)} from {EXTRA_MIRROR} "
                       f"(is the package registry reachable?): {exc}") from exc
    if _lists_age(root / "lists") is None:
        raise LabError(f"apt-get update wrote no package list for {', '.join(EXTRA_SUITES)} in {root}")
    available_versions.cache_clear()
    package_record.cache_clear()


def package_names(prefix: str, options: tuple[str, ...] = ()) -> list[str]:
    """Return the binary package names apt knows that start with `prefix` (apt-cache pkgnames)."""
    out = subprocess.run(["apt-cache", *options, "pkgnames", prefix], capture_output=True, text=True,
                         check=False).stdout
    return sorted(set(out.split()))
