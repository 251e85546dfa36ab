"""Ask the host's apt which Debian package versions exist, and fetch .deb files into a cache."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from debian import deb822
from debian.debian_support import Version

from nephoscope.core.errors import LabError

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
def available_versions(name: str) -> tuple[str, ...]:
    """Return every version apt can fetch for binary package `name`, newest first."""
    out = subprocess.run(["apt-cache", "madison", name], capture_output=True, text=True, check=False).stdout
    versions = {line.split("|")[1].strip() for line in out.splitlines() if line.count("|") >= 2
                and line.split("|")[0].strip() == name}
    return tuple(sorted(versions, key=Version, reverse=True))


@functools.cache
def package_record(name: str, version: str) -> deb822.Packages:
    """Return apt's control record for `name` at exactly `version`."""
    text = _run(["apt-cache", "show", f"{name}={version}"])
    first = text.split("\n\n", 1)[0]
    return deb822.Packages(first)


def depends_of(record: deb822.Packages) -> list[list[Relation]]:
    """Return the Pre-Depends and Depends groups of a package record."""
    fields = [record.get("Pre-Depends", ""), record.get("Depends", "")]
    return [g for f in fields if f for g in parse_depends(f)]


def download(name: str, version: str, cache_dir: Path) -> Path:
    """Fetch `name=version` into `cache_dir` (reusing a cached copy) and return the .deb path."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    record = package_record(name, version)
    filename = Path(record["Filename"]).name
    target = cache_dir / filename
    if target.exists() and target.stat().st_size == int(record.get("Size", target.stat().st_size)):
        return target
    tmp = cache_dir / ".download"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    proc = subprocess.run(["apt-get", "download", "-q", f"{name}={version}"], cwd=tmp,
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
