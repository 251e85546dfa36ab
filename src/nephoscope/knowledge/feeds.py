"""Turn real vulnerability sources into `VulnRecord`s: Debian changelogs in .debs, the Debian Security
Tracker JSON and OSV records. Parsers validate everything and raise KnowledgeError naming the culprit."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from debian.changelog import Changelog, ChangelogParseError

from nephoscope.core.errors import KnowledgeError, NephoscopeError
from nephoscope.knowledge.vulns import DEFAULT_RELEASE, VulnRecord, version_key

CVE_RE = re.compile(r"\bCVE-\d{4}-\d{4,}\b")
DEBIAN_RELEASES = {"9": "stretch", "10": "buster", "11": "bullseye", "12": "bookworm", "13": "trixie",
                   "14": "forky"}
Progress = Callable[[str], None]


def parse_changelog(text: str, release: str = DEFAULT_RELEASE, origin: str = "changelog") -> list[VulnRecord]:
    """Return one record per CVE named in each entry: that entry's version fixed it."""
    try:
        changelog = Changelog(text, strict=False)
    except (ChangelogParseError, ValueError) as exc:
        raise KnowledgeError(f"unparsable Debian changelog: {exc}") from exc
    out: list[VulnRecord] = []
    for block in changelog:
        if block.version is None or not block.package:
            continue
        body = "\n".join(block.changes())
        for cve in sorted(set(CVE_RE.findall(body))):
            out.append(VulnRecord(block.package, cve, str(block.version), "0", block.urgency or "",
                                  block.date or "", origin, release))
    return out


def source_of(control: str) -> tuple[str, str]:
    """Return (binary package, source package) from a .deb control file (`Source:` may carry a version)."""
    fields: dict[str, str] = {}
    for line in control.splitlines():
        key, colon, value = line.partition(":")
        if colon and not line[:1].isspace():
            fields[key.strip().lower()] = value.strip()
    if "package" not in fields:
        raise KnowledgeError("control data names no Package")
    source = fields.get("source", "").split(" ")[0] or fields["package"]
    return fields["package"], source


# --- harvesting changelogs from .debs -----------------------------------------------------------

@dataclass(slots=True)
class HarvestReport:
    """What a changelog harvest read: records, binary → source map, newest versions, problems."""

    records: list[VulnRecord] = field(default_factory=list)
    binaries: dict[str, str] = field(default_factory=dict)
    newest: dict[str, str] = field(default_factory=dict)
    changelogs: dict[str, str] = field(default_factory=dict)  # source -> binary package it was read from
    errors: list[tuple[str, str]] = field(default_factory=list)


def _changelog_in(root: Path, package: str) -> tuple[Path | None, str | None]:
    """Return (changelog path, other package whose doc dir it links to) inside an unpacked .deb."""
    doc = root / "usr" / "share" / "doc" / package
    if doc.is_symlink():
        return None, Path(str(doc.readlink())).name
    path = doc / "changelog.Debian.gz"
    return (path if path.is_file() else None), None


def harvest(packages: list[str], progress: Progress = lambda _m: None,
            release: str = DEFAULT_RELEASE) -> HarvestReport:
    """Fetch the newest .deb of each binary package and derive records from its Debian changelog."""
    from nephoscope.core.paths import cache_root
    from nephoscope.knowledge.debian import archive

    debs, unpacked = cache_root() / "debs", cache_root() / "unpacked"
    report = HarvestReport()
    roots: dict[str, Path] = {}

    def fetch(name: str) -> Path | None:
        if name not in roots:
            versions = archive.available_versions(name)
            if not versions:
                report.errors.append((name, "apt knows no such package"))
                return None
            progress(f"fetching {name} {versions[0]}")
            target = archive.unpack(archive.download(name, versions[0], debs), unpacked)
            binary, source = source_of((target / "control" / "control").read_text("utf-8", "replace"))
            report.binaries[binary], report.newest[binary] = source, versions[0]
            roots[name] = target / "root"
        return roots[name]

    pending: dict[str, list[str]] = {}
    for name in sorted(set(packages)):
        try:
            if fetch(name) is not None:
                pending.setdefault(report.binaries[name], []).append(name)
        except NephoscopeError as exc:
            report.errors.append((name, str(exc)))
    for source, names in sorted(pending.items()):
        path = None
        for name in names:
            path, linked = _changelog_in(roots[name], name)
            if path is None and linked:
                try:
                    other = fetch(linked)
                    path = _changelog_in(other, linked)[0] if other is not None else None
                except NephoscopeError as exc:
                    report.errors.append((linked, str(exc)))
            if path is not None:
                report.changelogs[source] = name
                break
        if path is None:
            report.errors.append((source, f"no changelog.Debian.gz in {', '.join(names)}"))
            continue
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
            report.records += [r for r in parse_changelog(text, release) if r.source == source]
        except (OSError, EOFError, KnowledgeError) as exc:
            report.errors.append((source, f"{path.name}: {exc}"))
    return report


# --- Debian Security Tracker ----------------------------------------------------------------------

def _expect(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind):
        raise KnowledgeError(f"malformed feed: {where} should be a JSON {kind.__name__}, "
                             f"not {type(value).__name__}; nothing was imported")
    return value


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KnowledgeError(f"cannot read {path} as JSON: {exc}; nothing was imported") from exc


def _version(value: Any, where: str) -> str:
    text = _expect(value, str, where)
    try:
        version_key(text)
    except KnowledgeError as exc:
        raise KnowledgeError(f"malformed feed: {where}: {exc}; nothing was imported") from exc
    return text


def parse_debian_tracker(data: Any, releases: set[str] | None = None) -> list[VulnRecord]:
    """Return records from the tracker's {source: {CVE: {releases: {name: {status, fixed_version}}}}}."""
    out: list[VulnRecord] = []
    for source, cves in _expect(data, dict, "the top level").items():
        for cve, info in _expect(cves, dict, f"[{source!r}]").items():
            rels = _expect(_expect(info, dict, f"[{source!r}][{cve!r}]").get("releases", {}), dict,
                           f"[{source!r}][{cve!r}].releases")
            for rel, st in rels.items():
                where = f"[{source!r}][{cve!r}].releases[{rel!r}]"
                st = _expect(st, dict, where)
                if releases is not None and rel not in releases:
                    continue
                status, urgency = st.get("status"), str(st.get("urgency", ""))
                if status == "resolved":
                    fixed = _version(st.get("fixed_version"), where + ".fixed_version")
                    if fixed != "0":  # "0": this release was never affected
                        out.append(VulnRecord(source, cve, fixed, "0", urgency, "", "debian-tracker", rel))
                elif status == "open":
                    out.append(VulnRecord(source, cve, None, "0", urgency, "", "debian-tracker", rel))
                elif not isinstance(status, str):
                    raise KnowledgeError(f"malformed feed: {where}.status is missing; nothing was imported")
    return out


def load_debian_tracker(path: Path) -> list[VulnRecord]:
    """Read a Debian Security Tracker JSON file into records."""
    return parse_debian_tracker(_load_json(path))


# --- OSV --------------------------------------------------------------------------------------------

def _osv_ids(rec: dict[str, Any], where: str) -> list[str]:
    ident = _expect(rec.get("id"), str, where + ".id")
    aliases = [a for a in _expect(rec.get("aliases", []), list, where + ".aliases") if isinstance(a, str)]
    upstream = [a for a in rec.get("upstream", []) if isinstance(a, str)]
    cves = sorted({i for i in [ident, *aliases, *upstream] if CVE_RE.fullmatch(i)})
    return cves or [ident]


def parse_osv(rec: Any, where: str = "record") -> list[VulnRecord]:
    """Return records from one OSV record's Debian `affected` ranges (ECOSYSTEM events)."""
    rec = _expect(rec, dict, where)
    ids = _osv_ids(rec, where)
    out: list[VulnRecord] = []
    for i, aff in enumerate(_expect(rec.get("affected", []), list, where + ".affected")):
        w = f"{where}.affected[{i}]"
        pkg = _expect(_expect(aff, dict, w).get("package"), dict, w + ".package")
        eco, name = str(pkg.get("ecosystem", "")), _expect(pkg.get("name"), str, w + ".package.name")
        family, _, number = eco.partition(":")
        if family != "Debian":
            continue
        release = DEBIAN_RELEASES.get(number.split(".")[0], number or DEFAULT_RELEASE)
        urgency = str((aff.get("ecosystem_specific") or {}).get("urgency", "")) if isinstance(
            aff.get("ecosystem_specific"), dict) else ""
        for j, rng in enumerate(_expect(aff.get("ranges", []), list, w + ".ranges")):
            rw = f"{w}.ranges[{j}]"
            if _expect(rng, dict, rw).get("type") != "ECOSYSTEM":
                continue
            introduced: str | None = None
            for k, ev in enumerate(_expect(rng.get("events"), list, rw + ".events")):
                ev = _expect(ev, dict, f"{rw}.events[{k}]")
                if "introduced" in ev:
                    introduced = _version(ev["introduced"], f"{rw}.events[{k}].introduced")
                elif "fixed" in ev and introduced is not None:
                    fixed = _version(ev["fixed"], f"{rw}.events[{k}].fixed")
                    out += [VulnRecord(name, c, fixed, introduced, urgency, "", "osv", release) for c in ids]
                    introduced = None
            if introduced is not None:  # introduced and never fixed
                out += [VulnRecord(name, c, None, introduced, urgency, "", "osv", release) for c in ids]
    return out


def load_osv(path: Path) -> list[VulnRecord]:
    """Read OSV records from a JSON file (one record or a list) or a directory of them."""
    files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
    if not files:
        raise KnowledgeError(f"no *.json OSV records under {path}")
    out: list[VulnRecord] = []
    for f in files:
        data = _load_json(f)
        for n, rec in enumerate(data if isinstance(data, list) else [data]):
            out += parse_osv(rec, f"{f.name}[{n}]")
    return out
