"""`nephoscope kb`: build and query the code-page knowledge base."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import typer

from nephoscope.cli.render import emit_json, err_console, fail, progress, table
from nephoscope.core.errors import KnowledgeError, NephoscopeError
from nephoscope.knowledge.binaries import CodePageDB
from nephoscope.knowledge.elfpages import exec_pages
from nephoscope.knowledge.ingest import IngestReport, ingest_path, ingest_specs
from nephoscope.service.kbsync import SYNC_METHODS, sync_and_rescan

app = typer.Typer(help="The code-page knowledge base: executable pages of known binaries.", no_args_is_help=True)
KB_OPTION = typer.Option(None, "--kb", help="KB path (default: NEPHOSCOPE_KB or ~/.cache/nephoscope/kb.sqlite)")


def _report(report: IngestReport, seconds: float, json_out: bool) -> None:
    data = dataclasses.asdict(report) | {"seconds": round(seconds, 2)}
    if json_out:
        emit_json(data)
        return
    table("kb add", ["packages", "files added", "files known", "pages added", "errors", "seconds"],
          [[len(set(report.packages)), report.files_added, report.files_known, report.pages_added,
            len(report.errors), f"{seconds:.1f}"]])
    for where, why in report.errors[:20]:
        err_console.print(f"skipped {where}: {why}", markup=False, highlight=False)


@app.command("add")
def add(
    paths: list[Path] = typer.Argument(None, help=".deb files, directories of .debs, root filesystems, ELF files"),
    apt_specs: list[str] = typer.Option([], "--apt", help="download NAME[=VERSION] with apt and ingest it"),
    kb: Path = KB_OPTION,
    json_out: bool = typer.Option(False, "--json", help="print the ingest report as JSON"),
) -> None:
    """Hash every executable page of the given packages or files into the KB (idempotent)."""
    if not paths and not apt_specs:
        fail(KnowledgeError("nothing to add: give PATH arguments or --apt NAME[=VERSION]"))
    started, report = time.monotonic(), IngestReport()
    try:
        db = CodePageDB.open(kb)
        with progress("kb add", quiet=json_out) as log:
            for path in paths or []:
                report.merge(ingest_path(db, path, log))
            report.merge(ingest_specs(db, list(apt_specs), log))
    except NephoscopeError as exc:
        fail(exc)
    _report(report, time.monotonic() - started, json_out)


@app.command("add-lab")
def add_lab(
    profile: str = typer.Option("clean", "--profile", "-p", help="built-in profile name or .toml path"),
    kb: Path = KB_OPTION,
    json_out: bool = typer.Option(False, "--json", help="print the ingest report as JSON"),
) -> None:
    """Ingest every package a lab profile uses in its chosen, newest and oldest versions, plus the kernel."""
    from nephoscope.lab.packages import lab_package_specs

    started, report = time.monotonic(), IngestReport()
    try:
        db = CodePageDB.open(kb)
        with progress("kb add-lab", quiet=json_out) as log:
            report.merge(ingest_specs(db, lab_package_specs(profile, log), log))
    except NephoscopeError as exc:
        fail(exc)
    _report(report, time.monotonic() - started, json_out)


@app.command("stats")
def stats(kb: Path = KB_OPTION, json_out: bool = typer.Option(False, "--json")) -> None:
    """Print how many packages, files and pages the KB holds."""
    try:
        s = CodePageDB.open(kb).stats()
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json(dataclasses.asdict(s))
    else:
        table("code-page KB", ["", ""], list(dataclasses.asdict(s).items()))


@app.command("which")
def which(
    target: str = typer.Argument(..., help="a hex page digest (64 digits) or a local ELF file"),
    kb: Path = KB_OPTION,
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Show which packages, versions and file offsets contain a page digest or a file's pages."""
    try:
        db = CodePageDB.open(kb)
        if Path(target).is_file():
            pages = exec_pages(Path(target).read_bytes()).pages
            queries = [(p.file_offset, p.digest) for p in pages]
        else:
            try:
                digest = bytes.fromhex(target)
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise KnowledgeError(f"{target!r} is neither a file nor a 64-digit hex SHA-256 page digest")
            queries = [(None, digest)]
        hits = db.lookup_digests([d for _, d in queries])
    except NephoscopeError as exc:
        fail(exc)
    rows = [{"query_offset": off, "digest": d.hex(), **h._asdict()}
            for (off, d), hs in zip(queries, hits, strict=True) for h in hs]
    found = sum(1 for hs in hits if hs)
    if json_out:
        emit_json({"pages": len(queries), "pages_found": found, "hits": rows})
        return
    groups: dict[tuple[str, str, str], list[int]] = {}
    for r in rows:
        groups.setdefault((r["package"], r["version"], r["path"]), []).append(r["file_offset"])
    table(f"{found}/{len(queries)} pages known", ["package", "version", "path", "pages", "file offsets"],
          [[*key, len(offs), f"{min(offs):#x}..{max(offs):#x}"] for key, offs in sorted(groups.items())])


@app.command("sync")
def sync_cmd(
    vm: str = typer.Argument(..., help="libvirt domain, pid:N, lab guest, QMP socket or RAM/dump file"),
    methods: str = typer.Option(SYNC_METHODS, "--methods", "-m",
                                help="methods whose observations give the hints, and that identify again"),
    jobs: int = typer.Option(4, "--jobs", "-j", min=1, max=32, help="parallel downloads"),
    kb: Path = KB_OPTION,
    json_out: bool = typer.Option(False, "--json", help="print the sync report and what is identified as JSON"),
) -> None:
    """Fill the KB with every version of each package that ships a file the VM maps, then identify again.

    Hints (mapped file paths, dpkg status through the agent) only choose what to download; identity is
    decided by page hashes. The methods pause the VM as they do in `scan`."""
    import os

    if kb is not None:
        os.environ["NEPHOSCOPE_KB"] = str(kb)  # the methods open the KB by its default path
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    started = time.monotonic()
    try:
        with progress(f"kb sync {vm}", quiet=json_out) as log:
            first, report, second = sync_and_rescan(vm, chosen, jobs, log)
    except NephoscopeError as exc:
        fail(exc)
    before, after = first.view.summary(), second.view.summary()
    unknown = [f for f in second.view.findings if f.kind == "unknown-code"]
    unverifiable = [u for u in second.view.unverifiable if str(u.get("reason", "")).startswith("unverifiable:")]
    mains = {pid: c.main for pid, c in second.code().items() if c.main is not None}
    data = {"sync": report.to_dict(), "seconds": round(time.monotonic() - started, 1),
            "before": before, "after": after, "unknown_code": len(unknown),
            "unknown": [f.to_dict() for f in unknown[:64]],
            "unverifiable": unverifiable,
            "main_binaries": {str(pid): {"path": m.path, "package": m.package, "versions": list(m.versions)}
                              for pid, m in sorted(mains.items())}}
    if json_out:
        emit_json(data)
        return
    ingest = report.ingest
    table(f"kb sync {vm}", ["paths", "packages", "versions", "in KB", "files+", "pages+", "errors",
                            "unknown before", "unknown after", "s"],
          [[report.paths, len(report.packages), sum(map(len, report.packages.values())),
            report.skipped, ingest.files_added, ingest.pages_added, len(report.errors),
            sum(f.kind == "unknown-code" for f in first.view.findings), len(unknown), data["seconds"]]])
    for where, why in report.errors[:20]:
        err_console.print(f"skipped {where}: {why}", markup=False, highlight=False)
    for u in unverifiable[:20]:
        err_console.print(str(u["reason"]), markup=False, highlight=False)


@app.command("add-archive")
def add_archive(
    packages: list[str] = typer.Argument(None, help="package names (every version apt offers of each)"),
    from_file: Path | None = typer.Option(None, "--from-file", help="a file of package names, one per line"),
    priority: str = typer.Option("", "--priority", help="also every package of this priority and the more "
                                 "important ones: required, important, standard, optional"),
    section: str = typer.Option("", "--section", help="also (or, with --priority, only) packages of this section"),
    newest: bool = typer.Option(False, "--newest", help="only the newest version of each package"),
    jobs: int = typer.Option(4, "--jobs", "-j", min=1, max=32, help="parallel downloads"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would be ingested, do nothing"),
    kb: Path = KB_OPTION,
    json_out: bool = typer.Option(False, "--json", help="print the ingest report as JSON"),
) -> None:
    """Ingest packages of the archive in bulk: parallel downloads, resumable (a rerun skips what is stored)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from nephoscope.knowledge.sync import archive_selection, ingest_versions

    names = list(packages or [])
    try:
        if from_file is not None:
            try:
                text = from_file.read_text()
            except OSError as exc:
                raise KnowledgeError(f"cannot read {from_file}: {exc}") from exc
            names += [ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]
        if not names and not priority and not section:
            raise KnowledgeError("nothing to add: name packages, --from-file FILE, --priority or --section")
        specs = archive_selection(priority, section, names, newest)
        if dry_run:
            if json_out:
                emit_json([{"package": n, "version": v} for n, v in specs])
            else:
                table(f"{len(specs)} package versions", ["package", "version"], [list(s) for s in specs])
            return
        started = time.monotonic()
        db = CodePageDB.open(kb)
        with Progress(TextColumn("kb add-archive"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.description}"), console=err_console, disable=json_out) as bar:
            task = bar.add_task("", total=len(specs))
            report, skipped = ingest_versions(db, specs, jobs, advance=lambda s: bar.update(task, advance=1,
                                                                                            description=s))
    except NephoscopeError as exc:
        fail(exc)
    if not json_out and skipped:
        err_console.print(f"{skipped} of {len(specs)} package versions were already in the KB (skipped)")
    _report(report, time.monotonic() - started, json_out)
