"""`nephoscope arch VM`: what executes in every address space, from hardware state alone."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from nephoscope.cli.render import emit_json, err_console, fail, progress, table
from nephoscope.core.errors import NephoscopeError
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.arch import ArchReport, Image, scan_target
from nephoscope.service.targets import resolve_target


def arch(
    vm: str = typer.Argument(..., help="lab guest name, QMP socket path, or RAM image / dump file (raw, ELF core, "
                                       "LiME)"),
    kb: Path = typer.Option(None, "--kb", help="code-page DB (default: NEPHOSCOPE_KB or the cache's kb.sqlite)"),
    pause: bool = typer.Option(False, "--pause", help="pause a running guest during the scan (consistent view); "
                                                      "a guest that was already paused stays paused"),
    cr3: list[str] = typer.Option([], "--cr3", help="known page-table root (hex gpa), e.g. when scanning a file"),
    json_out: bool = typer.Option(False, "--json", help="print observations as JSON"),
) -> None:
    """Find every page-table root, hash every executable page and identify it (no OS knowledge)."""
    try:
        roots = [int(c, 16) for c in cr3]
    except ValueError as exc:
        fail(NephoscopeError(f"--cr3 must be a hex guest-physical address: {exc}"))
    try:
        with progress("arch", quiet=json_out) as log:
            target = _target(vm)
            what = "file" if not target.live else ("VM at " + str(target.qmp_socket) if target.name != vm else "guest")
            log(f"scanning {what} {target.name}" + (" (paused)" if pause and target.live else ""))
            report = scan_target(target, kb, pause=pause, cr3=roots)
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json({"vm": report.vm, "problem": report.problem, "doubt": report.doubt, "caps": report.caps,
                   "memory_problems": report.memory_problems, "stats": asdict(report.stats),
                   "missing_vcpu_roots": report.missing_vcpu_roots,
                   "kernel_only_roots": report.kernel_only_roots,
                   "observations": [o.to_dict() for o in report.to_observations()]})
        return
    render(report)
    if report.problem:
        fail(NephoscopeError(report.problem))


def _target(spec: str) -> VmTarget:
    """Return the VM `spec` names (lab guest, QMP socket, RAM or dump file); an unknown name is a LabError."""
    if "/" not in spec and not Path(spec).exists():
        from nephoscope.lab.runner import get_guest

        get_guest(spec)  # says which guests run when `spec` is none of them
    return resolve_target(spec)


def render(report: ArchReport) -> None:
    """Print an arch report for people: address spaces, the binaries they run, and the findings."""
    if report.problem and not report.spaces:
        return
    rows, findings = [], []
    binaries: dict[tuple[str, str], int] = {}
    for sp in report.spaces:
        main = sp.main
        if isinstance(main, Image):
            name, version = main.path.rsplit("/", 1)[-1], _versions(main)
        else:
            name, version = ("unknown" if main else "-"), ""
        for im in sp.images:
            binaries[(im.path, _versions(im))] = binaries.get((im.path, _versions(im)), 0) + 1
        for im in ([] if report.doubt else sp.modified):
            findings.append((f"0x{sp.cr3:x}", "modified binary", f"0x{im.gva_start:x}-0x{im.gva_end:x}",
                             f"{im.path} ({_versions(im)}): {len(im.modified)} page(s) differ at file offsets "
                             + ", ".join("?" if m.file_offset is None else f"0x{m.file_offset:x}"
                                         for m in im.modified[:8])))
        for u in ([] if report.doubt else sp.unknown):
            findings.append((f"0x{sp.cr3:x}", "unknown code" + (" (rwx)" if u.writable else ""),
                             f"0x{u.gva_start:x}-0x{u.gva_end:x}", f"{u.pages} page(s), starts {u.head[:16].hex()}"))
        rows.append((f"0x{sp.cr3:x}" + (" pti" if sp.user_cr3 != sp.cr3 else ""), name, version,
                     len(sp.images), sp.exec_pages, sp.vdso.name if sp.vdso else "-",
                     "?" if report.doubt else (len(sp.modified) + len(sp.unknown) or "")))
    table(f"arch {report.vm}: {len(report.spaces)} address spaces", ["cr3", "main", "version", "images",
                                                                     "exec pages", "vdso", "findings"], rows)
    table("binaries executing", ["path", "package version(s)", "address spaces"],
          [(p, v, n) for (p, v), n in sorted(binaries.items())])
    if findings:
        table("findings", ["cr3", "what", "gva range", "detail"], findings)
    if report.doubt:
        err_console.print(f"image inconsistent: {report.doubt}; its unknown and modified code is not reported "
                          "as findings", style="bold yellow", markup=False, highlight=False)
    for problem in report.memory_problems:
        err_console.print(f"memory image: {problem}", style="yellow", markup=False, highlight=False)
    if report.kernel:
        kv = report.kernel.verification
        state = "verified" if kv is not None and kv.verified else f"unverifiable: {report.kernel.reason}"
        err_console.print(f"kernel code: {report.kernel.pages} pages in {len(report.kernel.ranges)} ranges, {state}",
                          markup=False, highlight=False)
        for im in kv.images if kv is not None else []:
            err_console.print(f"  {im.name}: {im.status}, {im.pages_verified}/{im.pages} pages"
                              + (f" ({im.reason})" if im.reason else ""), markup=False, highlight=False,
                              style="bold red" if im.status == "modified" else None)
            for c in im.changes[:8]:
                err_console.print(f"    0x{c.gva:x} {c.function}: {c.old.hex()} -> {c.new.hex()}", style="red",
                                  markup=False, highlight=False)
        for a, b in kv.unknown if kv is not None else []:
            err_console.print(f"  unknown kernel code 0x{a:x}-0x{b:x}", style="bold red", markup=False,
                              highlight=False)
    if report.missing_vcpu_roots:
        err_console.print("vCPU roots not found by the scan: " + ", ".join(hex(c) for c in report.missing_vcpu_roots),
                          style="bold red")
    s = report.stats
    err_console.print(f"{s.seconds:.2f} s ({s.root_seconds:.2f} roots, {s.hash_seconds:.2f} hashing "
                      f"{s.pages_hashed} pages); {len(report.kernel_only_roots)} kernel-only roots", style="dim")


def _versions(im: Image) -> str:
    return " | ".join(f"{p} {v}" for p, v in sorted(im.versions))
