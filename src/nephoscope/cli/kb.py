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
    rows = [{"query_offset": off, "digest": d.hex(), **dataclasses.asdict(h)}
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
