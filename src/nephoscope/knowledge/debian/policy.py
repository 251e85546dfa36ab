"""apt's pin priorities (apt_preferences(5)) and candidate choice, computed as apt-pkg's policy.cc does.

A version's priority is the first package-specific pin that matches it, else the highest priority of
the index files that carry it: 500, 100 for ButAutomaticUpgrades, 1 for NotAutomatic, or the first
general pin (`Package: *`, APT::Default-Release first at 990) that matches the file. The candidate
is the highest version among those of the highest positive priority (nothing installed is considered).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nephoscope.core.errors import KnowledgeError

NEVER = -32768  # apt's NEVER_PIN: the lowest short
DEFAULT_RELEASE_PRIORITY = 990
PIN_KINDS = ("version", "release", "origin")
_RELEASE_KEYS = {"v": "version", "o": "origin", "a": "archive", "n": "codename", "l": "label", "c": "component",
                 "b": "architecture"}


@dataclass(frozen=True, slots=True)
class PackageFile:
    """One Packages index apt reads, with the fields of its Release file that pins match against."""

    path: str
    description: str  # as `apt-cache madison` prints it: "http://deb.debian.org/debian bookworm/main amd64 Packages"
    site: str = ""  # host of the repository URI (what `Pin: origin` matches)
    origin: str = ""
    label: str = ""
    archive: str = ""  # the Release file's Suite
    codename: str = ""
    version: str = ""
    component: str = ""
    architecture: str = ""
    not_automatic: bool = False
    but_automatic_upgrades: bool = False

    @property
    def default_priority(self) -> int:
        """Return the priority apt gives the file before any pin."""
        if self.but_automatic_upgrades:
            return 100
        return 1 if self.not_automatic else 500


@dataclass(frozen=True, slots=True)
class Pin:
    """One pin: the package pattern ("" for all packages), what it matches and the priority it gives."""

    package: str
    kind: str  # version | release | origin
    data: str
    priority: int


def expression_matches(pattern: str, value: str) -> bool:
    """Match like apt: /regex/ (extended, case-insensitive, anywhere) or a case-insensitive glob."""
    if len(pattern) >= 2 and pattern.startswith("/") and pattern.endswith("/"):
        try:
            return re.search(pattern[1:-1], value, re.IGNORECASE) is not None
        except re.error:
            return False
    return fnmatch.fnmatchcase(value.lower(), pattern.lower())


def _match_version(version: str, wanted: str, prefix: bool) -> bool:
    """Return apt's MatchVer: equal (case-insensitive), or a prefix when the pin ended in '*'."""
    if len(version) < len(wanted) or (len(version) != len(wanted) and not prefix):
        return False
    return version[: len(wanted)].lower() == wanted.lower()


class Match:
    """apt's pkgVersionMatch for one pin: does an index file, or a version, match it."""

    def __init__(self, kind: str, data: str) -> None:
        self.kind, self.data = kind, data
        self.release: dict[str, str] = {}
        self.match_all = False
        self.prefix = False
        self.version = ""
        if kind == "version":
            self.version, self.prefix = (data[:-1], True) if data.endswith("*") else (data, False)
        elif kind == "release":
            if data == "*":
                self.match_all = True
            elif "=" not in data:
                key = "version" if data[:1].isdigit() else "release"
                self.release[key] = data
            else:
                for fragment in data.split(","):
                    fragment = fragment.strip()
                    if len(fragment) >= 3 and fragment[1] == "=" and fragment[0].lower() in _RELEASE_KEYS:
                        self.release[_RELEASE_KEYS[fragment[0].lower()]] = fragment[2:]
            if self.release.get("version", "").endswith("*"):
                self.prefix, self.release["version"] = True, self.release["version"][:-1]
        elif kind == "origin":
            self.site = data[1:-1] if len(data) >= 2 and data[0] == data[-1] == '"' else data

    def file_matches(self, f: PackageFile) -> bool:
        """Return whether index file `f` matches (release and origin pins; version pins match no file)."""
        if self.kind == "origin":
            return expression_matches(self.site, f.site) if self.site else not f.site
        if self.kind != "release":
            return False
        if self.match_all:
            return True
        if not self.release:
            return False
        for key, want in self.release.items():
            if key == "version":
                if not f.version or not (_match_version(f.version, want, self.prefix)
                                         or expression_matches(want, f.version)):
                    return False
            elif key == "release":
                if not (expression_matches(want, f.archive) or expression_matches(want, f.codename)):
                    return False
            elif not expression_matches(want, getattr(f, key)):
                return False
        return True

    def version_matches(self, version: str, files: Iterable[PackageFile]) -> bool:
        """Return whether a version (carried by `files`) matches this pin."""
        if self.kind == "version":
            return _match_version(version, self.version, self.prefix) or expression_matches(self.version, version)
        return any(self.file_matches(f) for f in files)


def _stanzas(text: str) -> list[dict[str, str]]:
    """Split an apt preferences file into stanzas of fields (comment lines skipped, keys lower-case)."""
    out: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    key = ""
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                out.append(fields)
            fields, key = {}, ""
        elif line[:1].isspace() and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
    return out


def parse_preferences(text: str, where: str) -> list[Pin]:
    """Return the pins of one preferences file, in order; raise KnowledgeError where apt would fail."""
    pins: list[Pin] = []
    for fields in _stanzas(text):
        names = fields.get("package", "").split()
        if not names:
            raise KnowledgeError(f"invalid record in the apt preferences file {where}: no Package header")
        pin = fields.get("pin", "")
        kind, _, data = pin.partition(" ")
        kind = kind.lower()
        if not pin or kind not in PIN_KINDS or (kind == "version" and names == ["*"]):
            continue  # apt warns and ignores such a stanza
        try:
            priority = int(fields.get("pin-priority", "0"))
        except ValueError as exc:
            raise KnowledgeError(f"{where}: Pin-Priority {fields.get('pin-priority')!r} is no number") from exc
        if not NEVER <= priority <= 32767:
            raise KnowledgeError(f"{where}: Pin-Priority {priority} is outside apt's range ({NEVER} to 32767)")
        if priority == 0:
            continue
        pins += [Pin("" if n == "*" else n, kind, data.strip(), priority) for n in names]
    return pins


def read_pins(paths: Iterable[Path], default_release: str = "") -> list[Pin]:
    """Return every pin apt would use, in its order (APT::Default-Release first, then each file)."""
    pins = [Pin("", "release", default_release, DEFAULT_RELEASE_PRIORITY)] if default_release else []
    for path in paths:
        try:
            pins += parse_preferences(path.read_text(errors="replace"), str(path))
        except OSError as exc:
            raise KnowledgeError(f"cannot read the apt preferences file {path}: {exc}") from exc
    return pins


class Policy:
    """Priorities of index files and versions under a list of pins (apt's pkgPolicy)."""

    def __init__(self, files: list[PackageFile], pins: list[Pin], architecture: str) -> None:
        self.files, self.architecture = files, architecture
        self.file_priority = [f.default_priority for f in files]
        fixed = [False] * len(files)
        for pin in (p for p in pins if not p.package):
            match = Match(pin.kind, pin.data)
            for i, f in enumerate(files):
                if not fixed[i] and self.file_priority[i] != NEVER and match.file_matches(f):
                    self.file_priority[i], fixed[i] = pin.priority, True
        self.specific = [(p, Match(p.kind, p.data)) for p in pins if p.package]

    def _applies(self, pattern: str, name: str, source: str) -> bool:
        """Return whether a pin's Package pattern names this package (or its source, for src:)."""
        if pattern.startswith("src:"):
            pattern, name = pattern[4:], source
        pattern, arch = pattern.rsplit(":", 1) if ":" in pattern else (pattern, "")
        if arch and arch not in (self.architecture, "any", "linux-any", f"any-{self.architecture}"):
            return False
        if (pattern.startswith("/") and pattern.endswith("/") and len(pattern) > 1) or any(c in pattern for c in "*[?"):
            return expression_matches(pattern, name)
        return pattern == name

    def version_priority(self, name: str, source: str, version: str, file_ids: list[int]) -> int:
        """Return the priority of `version` of package `name` carried by the index files `file_ids`."""
        file_prios = [self.file_priority[i] for i in file_ids]
        for pin, match in self.specific:
            if self._applies(pin.package, name, source) and match.version_matches(
                    version, (self.files[i] for i in file_ids)):
                if pin.priority == NEVER:
                    return NEVER
                if any(p != NEVER for p in file_prios):
                    return pin.priority
                break
        return max(file_prios, default=0)


def choose_candidate(ordered: Iterable[tuple[str, int]]) -> str | None:
    """Return apt's candidate from (version, priority) pairs ordered newest first; None if none is allowed."""
    best, best_priority = None, -1
    for version, priority in ordered:
        if priority == 0 or priority <= best_priority:
            continue
        best, best_priority = version, priority
    return best
