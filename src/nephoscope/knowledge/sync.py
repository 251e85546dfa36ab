"""Fill the code-page DB from what a scan saw: mapped file paths and dpkg's word → packages → every version.

The hints come from the guest (paths in its VMAs, its process executables, its dpkg status database):
they are untrusted. They only choose what to download; identity stays decided by page hashes alone.
Every hint is bounded and validated (printable absolute paths, Debian package names and versions) and
is never used as a shell argument or host path; the archive index answers which packages exist.

The running kernel's package comes along: the release the kernel model read from the banner (inspect's
`kernel` record, or arch's "package linux-image-R not in KB") names `linux-image-R`, so kernel text,
modules and the vDSO can be verified after a sync (`kernel_package`).

After a sync, code that still matches nothing but lies in a file the archive ships, while no
downloadable version of that package matches, is `unverifiable: <package> <version> not downloadable
(KB holds …)` rather than unknown code (`mark_unverifiable`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nephoscope.core import payloads
from nephoscope.core.errors import KnowledgeError, NephoscopeError
from nephoscope.core.paths import cache_root
from nephoscope.core.records import Observation, Verdict
from nephoscope.knowledge.binaries import CodePageDB
from nephoscope.knowledge.debian import archive
from nephoscope.knowledge.debian.contents import MAX_PATH, ContentsIndex, merged_path
from nephoscope.knowledge.ingest import IngestReport, ingest_unpacked

Progress = Callable[[str], None]
MAX_PATHS = 4096  # distinct file paths taken from one scan (a hostile guest can map many)
MAX_PACKAGES = 512  # packages downloaded for one scan
MAX_OWNERS = 4  # packages claiming one path (busybox / busybox-static) that are all fetched
MAX_VERSIONS = 16  # versions of one package apt may offer
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,127}$")
VERSION_RE = re.compile(r"^[0-9A-Za-z.+~:-]{1,128}$")
RELEASE_RE = re.compile(r"^[0-9]{1,3}\.[0-9]{1,3}[0-9A-Za-z.+~_-]{0,60}$")  # uname -r: 6.1.0-57-amd64
MAX_KERNELS = 2  # kernel releases taken from one scan (one kernel runs; a second is a hostile or odd hint)
_KB_LACKS_KERNEL = re.compile(r"^package linux-image-(\S{1,64}) not in KB")
_PATH_RE = re.compile(r"^/[\x21-\x7e]{1,4095}$")  # printable, no spaces: what packaged ELF files are named
DELETED = " (deleted)"


def clean_path(raw: object) -> str | None:
    """Return a guest-supplied path as a merged-/usr absolute path, or None when it can name no packaged file."""
    if not isinstance(raw, str) or len(raw) > MAX_PATH:
        return None
    path = raw.removesuffix(DELETED)
    if not _PATH_RE.match(path) or "/../" in path or "/./" in path or path.endswith(("/..", "/.")):
        return None
    return merged_path(path)


def escape(text: str, limit: int = 200) -> str:
    """Return guest text fit for a message: printable ASCII (others as \\xNN), cut to `limit` characters."""
    out = "".join(c if " " <= c <= "~" else f"\\x{ord(c) & 0xFF:02x}" for c in text[:limit])
    return out + ("…" if len(text) > limit else "")


@dataclass(slots=True)
class Hints:
    """What a scan said about the code a guest runs: file paths and the packages dpkg claims are installed."""

    paths: set[str] = field(default_factory=set)  # merged-/usr absolute paths
    installed: dict[str, str] = field(default_factory=dict)  # package -> version (dpkg status, via the agent)
    identified: set[str] = field(default_factory=set)  # paths whose pages the KB already identified
    rejected: int = 0  # hints that failed validation or went over a bound
    elf_headers: int = 0  # unknown regions that start with an ELF header (arch)
    kernels: set[str] = field(default_factory=set)  # kernel releases (uname -r) the kernel model read


def collect_hints(observations: Iterable[Observation]) -> Hints:
    """Return the bounded, validated hints of a scan's observations (inspect/agent mappings, exes, dpkg)."""
    hints = Hints()
    for o in observations:
        p = o.payload
        raw: list[object] = []
        if isinstance(p, payloads.Mapping) and "x" in p.perms:
            raw = [p.path]
        elif isinstance(p, payloads.Process) and not p.kernel_thread:
            raw = [p.exe]
        elif isinstance(p, payloads.Package):
            if PACKAGE_RE.match(p.name) and VERSION_RE.match(p.version) and len(hints.installed) < 65536:
                hints.installed[p.name] = p.version
            else:
                hints.rejected += 1
        elif isinstance(p, payloads.Image) and o.kind == "binary":
            path = clean_path(p.path)
            if path:
                hints.identified.add(path)
        elif isinstance(p, payloads.UnknownCode) and p.head.startswith("7f454c46"):
            hints.elf_headers += 1
        elif isinstance(p, payloads.Details) and o.kind == "kernel" and not p.problem:
            _add_kernel(hints, p.data.get("release"))
        elif isinstance(p, payloads.KernelImage) and p.kind == "vmlinux" and (m := _KB_LACKS_KERNEL.match(o.reason)):
            _add_kernel(hints, m.group(1))
        for r in raw:
            if not r or (isinstance(r, str) and r.startswith("[")):  # [vdso], [heap]: no file
                continue
            path = clean_path(r)
            if path is None or (path not in hints.paths and len(hints.paths) >= MAX_PATHS):
                hints.rejected += 1
                continue
            hints.paths.add(path)
    return hints


def _add_kernel(hints: Hints, release: object) -> None:
    """Add a kernel release hint when it has the shape of `uname -r` (and the bound allows one more)."""
    if not isinstance(release, str) or release in hints.kernels:
        return
    if RELEASE_RE.match(release) and len(hints.kernels) < MAX_KERNELS:
        hints.kernels.add(release)
    else:
        hints.rejected += 1


def kernel_package(release: str, installed: dict[str, str]) -> str | None:
    """Return the package that ships kernel `release` (`linux-image-R`, else `-unsigned`), or None if apt has none.

    The installed one (dpkg's word) is preferred; else the signed image, which carries the same vmlinux
    and modules as the unsigned one. The archive's Contents does not decide here: it lists the point
    release's kernels, not the security suite's (measured: bookworm's lists 6.1.0-50 while 6.1.0-57 runs)."""
    if not RELEASE_RE.match(release):
        return None
    names = [f"linux-image-{release}", f"linux-image-{release}-unsigned"]
    for name in [n for n in names if n in installed] + names:
        if archive.available_versions(name):
            return name
    return None


def owners(hints: Hints, contents: ContentsIndex) -> tuple[dict[str, set[str]], list[str]]:
    """Return (package -> the hinted paths it ships, paths no package ships) through the Contents index.

    Where dpkg (when the guest has it) names one of a path's owners as installed, only the installed
    owners are taken; else every owner, up to MAX_OWNERS (the page hashes pick the right one)."""
    by_package: dict[str, set[str]] = {}
    unowned = []
    for path in sorted(hints.paths):
        names = contents.packages(path)
        if not names:
            unowned.append(path)
            continue
        installed = [n for n in names if n in hints.installed]
        for name in (installed or names)[:MAX_OWNERS]:
            by_package.setdefault(name, set()).add(path)
    return by_package, unowned


@dataclass(slots=True)
class SyncReport:
    """What one `kb sync` did: hints, the packages and versions it fetched, what stays unverifiable."""

    paths: int = 0
    unowned: list[str] = field(default_factory=list)  # hinted paths no package ships (escaped)
    packages: dict[str, list[str]] = field(default_factory=dict)  # package -> versions apt offers
    not_downloadable: dict[str, str] = field(default_factory=dict)  # package -> installed version apt lacks
    kernels: dict[str, str] = field(default_factory=dict)  # running kernel release -> its package ("" if none)
    ingest: IngestReport = field(default_factory=IngestReport)
    rejected_hints: int = 0
    skipped: int = 0  # package versions already in the KB
    errors: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-ready dict."""
        return dataclasses.asdict(self)

    def merge(self, other: SyncReport) -> None:
        """Add a later round's sync to this one."""
        self.paths = max(self.paths, other.paths)
        self.unowned = sorted(set(self.unowned) | set(other.unowned))
        for name, versions in other.packages.items():
            self.packages.setdefault(name, versions)
        self.not_downloadable.update(other.not_downloadable)
        self.kernels.update(other.kernels)
        self.ingest.merge(other.ingest)
        self.rejected_hints = max(self.rejected_hints, other.rejected_hints)
        self.errors += other.errors


def fetch_unpacked(name: str, version: str) -> Path:
    """Download `name=version` with apt (own temporary directory: safe in parallel) and unpack it (cached)."""
    if not PACKAGE_RE.match(name) or not VERSION_RE.match(version):
        raise KnowledgeError(f"{escape(name)}={escape(version)} is not a Debian package name and version")
    target = archive.download(name, version, cache_root() / "debs")
    return archive.unpack(target, cache_root() / "unpacked")


def ingest_versions(db: CodePageDB, specs: list[tuple[str, str]], jobs: int = 4,
                    progress: Progress = lambda _m: None, advance: Callable[[str], None] = lambda _s: None
                    ) -> tuple[IngestReport, int]:
    """Ingest package versions: downloads and unpacking in `jobs` threads, hashing and SQLite here.

    Resumable: a version already in the KB is skipped (packages are committed whole). Returns the
    report (failures in its errors) and how many were skipped; `advance` is called once per spec."""
    report, skipped = IngestReport(), 0
    todo = []
    for name, version in specs:
        if db.has_package(name, version):
            skipped += 1
            advance(f"{name}={version}")
        else:
            todo.append((name, version))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(fetch_unpacked, n, v): (n, v) for n, v in todo}
        for future in concurrent.futures.as_completed(futures):
            name, version = futures[future]
            spec = f"{name}={version}"
            try:
                unpacked = future.result()
                report.merge(ingest_unpacked(db, unpacked, str(unpacked), progress))
            except NephoscopeError as exc:
                report.errors.append((spec, str(exc)))
            advance(spec)
    return report, skipped


def sync(db: CodePageDB, observations: Iterable[Observation], *, contents: ContentsIndex | None = None,
         jobs: int = 4, progress: Progress = lambda _m: None) -> SyncReport:
    """Ingest every version apt offers of each package that ships a file the scan saw mapped."""
    hints = collect_hints(observations)
    out = SyncReport(paths=len(hints.paths), rejected_hints=hints.rejected)
    progress(f"{len(hints.paths)} mapped file paths; looking them up in the archive's Contents index")
    contents = contents or ContentsIndex.open()
    by_package, unowned = owners(hints, contents)
    out.unowned = [escape(p) for p in unowned]
    for release in sorted(hints.kernels):
        name = kernel_package(release, hints.installed)
        out.kernels[release] = name or ""
        if name:
            by_package.setdefault(name, set()).add(f"/boot/vmlinuz-{release}")
        else:
            out.errors.append((f"kernel {release}", f"apt offers no linux-image-{release}: kernel code stays "
                                                   "unverifiable"))
    specs = []
    for name in sorted(by_package)[:MAX_PACKAGES]:
        versions = list(archive.available_versions(name))[:MAX_VERSIONS]
        out.packages[name] = versions
        installed = hints.installed.get(name)
        if installed and installed not in versions:
            out.not_downloadable[name] = installed
        specs += [(name, v) for v in versions]
    if len(by_package) > MAX_PACKAGES:
        out.errors.append(("packages", f"{len(by_package)} packages hinted; only the first {MAX_PACKAGES} fetched"))
    progress(f"{len(by_package)} packages, {len(specs)} versions to ingest")
    out.ingest, out.skipped = ingest_versions(db, specs, jobs, progress)
    out.errors += out.ingest.errors
    return out


# --- after the sync: unmatched code in a file whose installed version cannot be downloaded ---------------


def mark_unverifiable(observations: list[Observation], db: CodePageDB, contents: ContentsIndex,
                      installed: dict[str, str] | None = None) -> list[Observation]:
    """Return the observations with unknown code inside a packaged file made `unverifiable` when no version
    the KB holds of that file's package matches (its installed version is not downloadable).

    A region is attributed to a file only through a hardware-derived method's VMA (inspect: pid, cr3, range
    and path); a region no VMA explains, or in a file no package ships, stays unknown code. The guest's
    dpkg word (`installed`, default: from the observations) only names the version in the reason."""
    hints = collect_hints(observations)
    installed = hints.installed if installed is None else installed
    cr3_of = {o.payload.pid: o.payload.cr3 for o in observations
              if isinstance(o.payload, payloads.Process) and o.payload.cr3 is not None
              and o.provenance.method == "inspect"}
    vmas: dict[int, list[tuple[int, int, str]]] = {}
    for o in observations:
        p = o.payload
        if isinstance(p, payloads.Mapping) and o.provenance.method == "inspect" and "x" in p.perms and p.path:
            cr3 = cr3_of.get(p.pid)
            if cr3 is not None:
                vmas.setdefault(cr3, []).append((p.start, p.end, p.path))
    out = []
    for o in observations:
        p = o.payload
        reason = ""
        if o.kind == "unknown-code" and isinstance(p, payloads.UnknownCode) and p.cr3 is not None:
            path = next((path for s, e, path in vmas.get(p.cr3, [])
                         if p.gva_start is not None and s <= p.gva_start < e), None)
            reason = _not_downloadable(path, db, contents, installed) if path else ""
        out.append(dataclasses.replace(o, verdict=Verdict.UNVERIFIABLE, reason=reason) if reason else o)
    return out


def _not_downloadable(raw_path: str, db: CodePageDB, contents: ContentsIndex, installed: dict[str, str]) -> str:
    """Return the unverifiable reason for unmatched code in `raw_path`, or "" when it stays unknown code."""
    path = clean_path(raw_path)
    if path is None:
        return ""
    for name in contents.packages(path):
        held = db.package_versions(name)
        offered = set(archive.available_versions(name))
        if not held or not offered <= set(held):
            continue  # the KB has not been synced for this package: unknown stays unknown
        version = installed.get(name, "(installed version unknown)")
        if version in held:
            continue  # the installed version is in the KB and still does not match: not a download gap
        return (f"unverifiable: {name} {escape(version, 64)} not downloadable (KB holds {', '.join(held)}); "
                f"{escape(raw_path)} matches none of them")
    return ""


# --- the archive in bulk (`kb add-archive`) -------------------------------------------------------------

PRIORITIES = ("required", "important", "standard", "optional", "extra")


def archive_selection(priority: str = "", section: str = "", names: Iterable[str] = (), newest: bool = False
                      ) -> list[tuple[str, str]]:
    """Return (package, version) pairs to ingest: the named packages and those of a priority and/or section.

    `priority` selects that priority and the more important ones (like debootstrap's variants); every
    version apt offers is taken unless `newest`. Raises KnowledgeError for a name apt does not know."""
    from nephoscope.knowledge.debian.config import read_config
    from nephoscope.knowledge.debian.index import iter_records, package_files, read_index_bytes

    if priority and priority not in PRIORITIES:
        raise KnowledgeError(f"unknown priority {priority!r}; use one of {', '.join(PRIORITIES)}")
    wanted: dict[str, None] = {}
    for name in names:
        if not PACKAGE_RE.match(name):
            raise KnowledgeError(f"{escape(name)!r} is not a Debian package name")
        if not archive.available_versions(name):
            raise KnowledgeError(f"apt knows no package {name!r}; check the name or run `apt-get update`")
        wanted[name] = None
    if priority or section:
        levels = set(PRIORITIES[:PRIORITIES.index(priority) + 1]) if priority else set(PRIORITIES)
        config = read_config(())
        field_re = re.compile(rb"^(Priority|Section):[ \t]*(\S+)", re.M)
        for f in package_files(config):
            for name, _version, _source, record in iter_records(read_index_bytes(Path(f.path), config),
                                                                config.architecture):
                fields = dict(field_re.findall(record))
                prio = fields.get(b"Priority", b"optional").decode(errors="replace")
                sect = fields.get(b"Section", b"").decode(errors="replace").rsplit("/", 1)[-1]
                if prio in levels and (not section or sect == section):
                    wanted[name] = None
    out = []
    for name in sorted(wanted):
        versions = archive.available_versions(name)[:MAX_VERSIONS]
        out += [(name, v) for v in (versions[:1] if newest else versions)]
    return out
