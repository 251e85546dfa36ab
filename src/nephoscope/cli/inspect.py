"""`nephoscope ps|maps|files|modules|kernel|isf VM`: the guest kernel read from outside, zero configuration."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import typer

from nephoscope.cli.render import console, emit_json, fail, table
from nephoscope.core.errors import NephoscopeError
from nephoscope.introspect.kernel import open_kernel, task_cr3
from nephoscope.os.linux.cache import NO_CACHE_ENV
from nephoscope.os.linux.model import LinuxKernel
from nephoscope.os.linux.walkers import CrossView, Listing, Task, read_task
from nephoscope.service.targets import resolve_target

VM_ARG = typer.Argument(..., help="lab guest name, QMP socket path, or RAM/dump file (raw, QEMU ELF, LiME)")
JSON = typer.Option(False, "--json", help="print JSON")
SYMBOLS = typer.Option(None, "--symbols", metavar="FILE",
                       help="this kernel's types/symbols when RAM lacks them: a Volatility 3 ISF (.json, .json.xz), "
                            "a vmlinux (BTF or DWARF) or a System.map")
NO_CACHE = typer.Option(False, "--no-cache", help=f"recover the kernel model from RAM even if a validated cached one "
                                                  f"exists (also: {NO_CACHE_ENV}=1)")


def _open(vm: str, symbols: Path | None, no_cache: bool) -> contextlib.AbstractContextManager[LinuxKernel]:
    """Open the kernel model of `vm` (a cached model is used only once the image proves it)."""
    return open_kernel(resolve_target(vm), symbols=symbols, cache=not no_cache)


def _task(kernel: LinuxKernel, pid: int) -> Task:
    listing = kernel.processes()
    task = next((t for t in listing.items if t.pid == pid), None)
    if task is None:
        raise NephoscopeError(f"no process {pid} on the guest's task list ({len(listing.items)} processes)")
    return task


def ps(vm: str = VM_ARG, threads: bool = typer.Option(False, "--threads", help="list every thread"),
       json_out: bool = JSON, symbols: Path | None = SYMBOLS, no_cache: bool = NO_CACHE) -> None:
    """List processes from the kernel's task list, cross-checked against the PID table (each view's completeness)."""
    try:
        with _open(vm, symbols, no_cache) as k:
            listing = k.threads() if threads else k.processes()
            cross = k.cross_view()
            rows = _ps_rows(k, listing, cross, threads)
    except NephoscopeError as exc:
        fail(exc)
    views = {"task_list": {"count": len(listing), "complete": listing.complete, "problem": listing.problem},
             **cross.views()}
    problems = [v["problem"] for v in views.values() if v["problem"]]
    complete = listing.complete and cross.threads.complete and cross.pid_idr.complete and cross.verified
    hidden = [{"pid": h.pid, "comm": h.comm, "in_task_list": h.in_task_list, "in_pid_idr": h.in_pid_idr}
              for h in cross.hidden.items]
    if json_out:
        emit_json({"processes": rows, "complete": complete, "problem": problems[0] if problems else "",
                   "views": views, "hidden": hidden})
        return
    from rich.text import Text  # people only: --json needs no rich

    table(f"{vm}: {'threads' if threads else 'processes'} ({len(rows)})",
          ["pid", "ppid", "uid", "state", "comm", "exe", "cmdline"],
          [[r["pid"], r["ppid"], r["uid"], r["state"],
            r["comm"] + (" !" if r["one_view_only"] else "") + ("" if "task_list" in r["views"] else " [pid table]"),
            r["exe"] or "", " ".join(r["cmdline"] or [])[:80]] for r in rows])
    for name, label in (("task_list", "task list"), ("threads", "thread lists"), ("pid_idr", "PID table")):
        v = views[name]
        line = f"{label}: {v['count']} entries, " + ("complete" if v["complete"] else f"INCOMPLETE: {v['problem']}")
        console.print(Text(line, style="" if v["complete"] else "yellow"))
    if not listing.complete and any("task_list" not in r["views"] for r in rows):
        console.print("[yellow]rows marked \\[pid table] were found only in the PID table, past where the task "
                      "list walk stopped[/yellow]")
    if not cross.verified:
        console.print(Text(f"{cross.hidden.problem}: no hidden-process check", style="yellow"))
    elif not hidden:
        console.print("cross-view: the task list and the PID table agree")
    for h in cross.hidden.items:  # comm is guest text: never markup
        console.print(Text(f"pid {h.pid} ({h.comm}) is in only one kernel view: task list {h.in_task_list}, "
                           f"PID table {h.in_pid_idr}", style="red"))


def _ps_rows(k: LinuxKernel, listing: Listing[Task], cross: CrossView, threads: bool) -> list[dict[str, Any]]:
    """Return one row per task the task list showed, then (if that walk stopped early) per task only the
    PID table showed, each saying which views saw it."""
    hidden = {h.pid for h in cross.hidden.items}
    in_idr = {nr for nr, task in cross.pid_idr.items if task}

    def row(t: Task, views: list[str]) -> dict[str, Any]:
        return {"pid": t.pid, "tgid": t.tgid, "ppid": t.ppid, "uid": t.uid, "state": t.state, "comm": t.comm,
                "exe": t.exe, "cmdline": t.cmdline, "kernel_thread": t.kernel_thread, "cr3": task_cr3(k, t.mm_gva),
                "one_view_only": t.pid in hidden, "views": views}

    rows = [row(t, ["task_list", "pid_idr"] if t.pid in in_idr else ["task_list"]) for t in listing.items]
    if listing.complete:
        return rows
    listed = {t.pid for t in listing.items}
    for nr, task in cross.pid_idr.items:
        if nr in listed or not task:
            continue
        try:
            t = read_task(k, task, details=not threads)
        except NephoscopeError:
            continue  # the PID table names a task that cannot be read: nothing to show but its number
        if threads or t.is_process:
            rows.append(row(t, ["pid_idr"]))
    return rows


def maps(vm: str = VM_ARG, pid: int = typer.Argument(..., help="process id"), json_out: bool = JSON,
         symbols: Path | None = SYMBOLS, no_cache: bool = NO_CACHE) -> None:
    """List a process's memory mappings (like /proc/PID/maps), from the kernel's VMA tree."""
    try:
        with _open(vm, symbols, no_cache) as k:
            listing = k.vmas(_task(k, pid))
    except NephoscopeError as exc:
        fail(exc)
    rows = [{"start": v.start, "end": v.end, "perms": v.perms, "offset": v.offset, "path": v.path}
            for v in listing.items]
    if json_out:
        emit_json({"pid": pid, "mappings": rows, "complete": listing.complete, "problem": listing.problem})
        return
    table(f"{vm}: mappings of {pid}", ["start", "end", "perms", "offset", "path"],
          [[f"{r['start']:x}", f"{r['end']:x}", r["perms"], f"{r['offset']:08x}", r["path"]] for r in rows])


def files(vm: str = VM_ARG, pid: int = typer.Argument(..., help="process id"), json_out: bool = JSON,
          symbols: Path | None = SYMBOLS, no_cache: bool = NO_CACHE) -> None:
    """List a process's open file descriptors."""
    try:
        with _open(vm, symbols, no_cache) as k:
            listing = k.files(_task(k, pid))
    except NephoscopeError as exc:
        fail(exc)
    rows = [{"fd": f.fd, "path": f.path} for f in listing.items]
    if json_out:
        emit_json({"pid": pid, "files": rows, "complete": listing.complete, "problem": listing.problem})
        return
    table(f"{vm}: open files of {pid}", ["fd", "path"], [[r["fd"], r["path"]] for r in rows])


def modules(vm: str = VM_ARG, json_out: bool = JSON, symbols: Path | None = SYMBOLS,
            no_cache: bool = NO_CACHE) -> None:
    """List loaded kernel modules from the kernel's module list."""
    try:
        with _open(vm, symbols, no_cache) as k:
            listing = k.modules()
    except NephoscopeError as exc:
        fail(exc)
    rows = [{"name": m.name, "base": m.base, "size": m.size} for m in listing.items]
    if json_out:
        emit_json({"modules": rows, "complete": listing.complete, "problem": listing.problem})
        return
    table(f"{vm}: kernel modules", ["name", "base", "size"], [[r["name"], f"{r['base']:#x}", r["size"]] for r in rows])


def kernel(vm: str = VM_ARG, json_out: bool = JSON, symbols: Path | None = SYMBOLS,
           no_cache: bool = NO_CACHE) -> None:
    """Show what was detected about the guest kernel, and how (stage by stage, with timings)."""
    try:
        with _open(vm, symbols, no_cache) as k:
            info, report, nsyms = k.info.to_dict(), k.report, len(k.symbols)
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json({"kernel": info, "symbols": nsyms, "detection": report.to_dict()})
        return
    table(f"{vm}: kernel", ["", ""], [[k_, v] for k_, v in info.items()] + [["kallsyms symbols", nsyms]])
    console.print(report.summary())


def isf(vm: str = VM_ARG, out: Path = typer.Option(Path("kernel.json.xz"), "--out", "-o",
                                                     help="ISF file to write (.json or .json.xz)"),
        symbols: Path | None = SYMBOLS, no_cache: bool = NO_CACHE) -> None:
    """Write a Volatility 3 symbol table (ISF) from the guest's own BTF and kallsyms."""
    try:
        with _open(vm, symbols, no_cache) as k:
            if k.btf is None:
                raise NephoscopeError(f"{vm}: no BTF to export (the types came from {symbols}); an ISF is built "
                                      "from the kernel's BTF")
            from nephoscope.os.linux.isf import export_isf

            path = export_isf(k.btf, k.symbols.symbols, k.info.banner, out, kaslr_shift=k.info.virt_slide)
    except NephoscopeError as exc:
        fail(exc)
    console.print(f"wrote {path} ({path.stat().st_size} bytes); use it with: vol -s {path.parent.parent} ...")
