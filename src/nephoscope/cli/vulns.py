"""`nephoscope vulns`: build and query the vulnerability knowledge (changelogs, tracker, OSV)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import typer

from nephoscope.cli.render import emit_json, err_console, fail, progress, table
from nephoscope.core.errors import NephoscopeError
from nephoscope.knowledge.feeds import harvest, load_debian_tracker, load_osv
from nephoscope.knowledge.vulns import DEFAULT_RELEASE, VulnDB, VulnRecord

app = typer.Typer(help="Vulnerability knowledge: which package versions fix which CVEs.", no_args_is_help=True)
DB_OPTION = typer.Option(None, "--db", help="DB path (default: ~/.cache/nephoscope/vulns.sqlite)")


def _imported(origin: str, records: list[VulnRecord], db: Path | None, binaries: dict[str, str] | None = None,
              json_out: bool = False) -> None:
    count = VulnDB.open(db).replace(origin, records, binaries)
    data = {"origin": origin, "records": count, "sources": len({r.source for r in records}),
            "cves": len({r.cve for r in records})}
    emit_json(data) if json_out else table(f"vulns: {origin}", list(data), [list(data.values())])


@app.command("update")
def update(profile: str = typer.Option("clean", "--profile", help="lab profile whose packages to harvest"),
           db: Path = DB_OPTION, json_out: bool = typer.Option(False, "--json")) -> None:
    """Harvest the CVEs named in the newest Debian changelog of every package of a lab profile."""
    from nephoscope.lab.packages import profile_packages

    started = time.monotonic()
    try:
        with progress("vulns update", quiet=json_out) as log:
            names = profile_packages(profile, log)
            report = harvest(names, log)
        _imported("changelog", report.records, db, report.binaries, json_out)
    except NephoscopeError as exc:
        fail(exc)
    for where, why in report.errors:
        err_console.print(f"skipped {where}: {why}", markup=False, highlight=False)
    if not json_out:
        err_console.print(f"{len(names)} packages, {len(report.changelogs)} changelogs in "
                          f"{time.monotonic() - started:.1f}s", markup=False, highlight=False)


@app.command("import-debian-tracker")
def import_tracker(path: Path = typer.Argument(..., help="Debian Security Tracker JSON file"),
                   db: Path = DB_OPTION, json_out: bool = typer.Option(False, "--json")) -> None:
    """Import a Debian Security Tracker JSON dump (all or nothing)."""
    try:
        _imported("debian-tracker", load_debian_tracker(path), db, json_out=json_out)
    except NephoscopeError as exc:
        fail(exc)


@app.command("import-osv")
def import_osv(path: Path = typer.Argument(..., help="OSV JSON file (record or list) or directory of them"),
               db: Path = DB_OPTION, json_out: bool = typer.Option(False, "--json")) -> None:
    """Import OSV records for Debian ecosystems (all or nothing)."""
    try:
        _imported("osv", load_osv(path), db, json_out=json_out)
    except NephoscopeError as exc:
        fail(exc)


@app.command("stats")
def stats(db: Path = DB_OPTION, json_out: bool = typer.Option(False, "--json")) -> None:
    """Show how much vulnerability knowledge there is, by origin."""
    try:
        s = VulnDB.open(db).stats()
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json(dataclasses.asdict(s))
        return
    table(f"vulns: {s.path}", ["records", "sources", "cves", "binaries", "by origin"],
          [[s.records, s.sources, s.cves, s.binaries, ", ".join(f"{k} {v}" for k, v in sorted(s.by_origin.items()))]])


def _apt_source(package: str) -> str:
    """Return the source package apt names for a binary package (the name itself when apt cannot tell)."""
    from nephoscope.knowledge.debian import archive
    from nephoscope.knowledge.feeds import source_of

    versions = archive.available_versions(package)
    if not versions:
        return package
    return source_of(str(archive.package_record(package, versions[0])))[1]


@app.command("check")
def check(package: str = typer.Argument(..., help="binary or source package name"),
          version: str = typer.Argument(..., help="Debian version, e.g. 1.22.1-9+deb12u9"),
          release: str = typer.Option(DEFAULT_RELEASE, "--release"), db: Path = DB_OPTION,
          json_out: bool = typer.Option(False, "--json")) -> None:
    """List the CVEs affecting PACKAGE at VERSION and the versions that fix them."""
    try:
        vdb = VulnDB.open(db)
        index = vdb.index(release)
        source = vdb.binaries().get(package) or (package if package in index.sources() else _apt_source(package))
        affected = index.affecting(source, version)
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json({"package": package, "source": source, "version": version,
                   "cves": [{"cve": a.cve, "fixed": a.fixed, "urgency": a.urgency, "origins": a.origins}
                            for a in affected]})
        return
    table(f"{package} {version} (source {source}): {len(affected)} CVE(s)", ["cve", "fixed in", "urgency", "from"],
          [[a.cve, a.fixed or "no fix yet", a.urgency, ",".join(a.origins)] for a in affected])
