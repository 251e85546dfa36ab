"""`nephoscope ps|maps|files|modules|kernel|isf VM`: the guest kernel read from outside, zero configuration."""

from __future__ import annotations

from pathlib import Path

import typer

from nephoscope.cli.render import console, emit_json, fail, table
from nephoscope.core.errors import NephoscopeError
from nephoscope.introspect.kernel import open_kernel, task_cr3
from nephoscope.os.linux.isf import export_isf
from nephoscope.os.linux.model import LinuxKernel
from nephoscope.os.linux.walkers import Task
from nephoscope.service.targets import resolve_target

VM_ARG = typer.Argument(..., help="lab guest name, QMP socket path, or RAM/dump file (raw, QEMU ELF, LiME)")
JSON = typer.Option(False, "--json", help="print JSON")


def _task(kernel: LinuxKernel, pid: int) -> Task:
    listing = kernel.processes()
    task = next((t for t in listing.items if t.pid == pid), None)
    if task is None:
        raise NephoscopeError(f"no process {pid} on the guest's task list ({len(listing.items)} processes)")
    return task


def ps(vm: str = VM_ARG, threads: bool = typer.Option(False, "--threads", help="list every thread"),
       json_out: bool = JSON) -> None:
    """List processes from the kernel's task list (cross-checked against the PID table)."""
    try:
        with open_kernel(resolve_target(vm)) as k:
            listing = k.threads() if threads else k.processes()
            hidden = {h.pid: h for h in k.hidden_processes().items}
            rows = [{"pid": t.pid, "tgid": t.tgid, "ppid": t.ppid, "uid": t.uid, "state": t.state, "comm": t.comm,
                     "exe": t.exe, "cmdline": t.cmdline, "kernel_thread": t.kernel_thread,
                     "cr3": task_cr3(k, t.mm_gva), "one_view_only": t.pid in hidden} for t in listing.items]
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json({"processes": rows, "complete": listing.complete, "problem": listing.problem,
                   "hidden": [h.__dict__ if hasattr(h, "__dict__") else {"pid": h.pid, "comm": h.comm,
                              "in_task_list": h.in_task_list, "in_pid_idr": h.in_pid_idr} for h in hidden.values()]})
        return
    table(f"{vm}: processes ({len(rows)})", ["pid", "ppid", "uid", "state", "comm", "exe", "cmdline"],
          [[r["pid"], r["ppid"], r["uid"], r["state"], r["comm"] + (" !" if r["one_view_only"] else ""),
            r["exe"] or "", " ".join(r["cmdline"] or [])[:80]] for r in rows])
    if not listing.complete:
        console.print(f"[yellow]incomplete: {listing.problem}[/yellow]")
    for h in hidden.values():
        console.print(f"[red]pid {h.pid} ({h.comm}) is in only one kernel view: task list {h.in_task_list}, "
                      f"PID table {h.in_pid_idr}[/red]")


def maps(vm: str = VM_ARG, pid: int = typer.Argument(..., help="process id"), json_out: bool = JSON) -> None:
    """List a process's memory mappings (like /proc/PID/maps), from the kernel's VMA tree."""
    try:
        with open_kernel(resolve_target(vm)) as k:
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


def files(vm: str = VM_ARG, pid: int = typer.Argument(..., help="process id"), json_out: bool = JSON) -> None:
    """List a process's open file descriptors."""
    try:
        with open_kernel(resolve_target(vm)) as k:
            listing = k.files(_task(k, pid))
    except NephoscopeError as exc:
        fail(exc)
    rows = [{"fd": f.fd, "path": f.path} for f in listing.items]
    if json_out:
        emit_json({"pid": pid, "files": rows, "complete": listing.complete, "problem": listing.problem})
        return
    table(f"{vm}: open files of {pid}", ["fd", "path"], [[r["fd"], r["path"]] for r in rows])


def modules(vm: str = VM_ARG, json_out: bool = JSON) -> None:
    """List loaded kernel modules from the kernel's module list."""
    try:
        with open_kernel(resolve_target(vm)) as k:
            listing = k.modules()
    except NephoscopeError as exc:
        fail(exc)
    rows = [{"name": m.name, "base": m.base, "size": m.size} for m in listing.items]
    if json_out:
        emit_json({"modules": rows, "complete": listing.complete, "problem": listing.problem})
        return
    table(f"{vm}: kernel modules", ["name", "base", "size"], [[r["name"], f"{r['base']:#x}", r["size"]] for r in rows])


def kernel(vm: str = VM_ARG, json_out: bool = JSON) -> None:
    """Show what was detected about the guest kernel, and how (stage by stage, with timings)."""
    try:
        with open_kernel(resolve_target(vm)) as k:
            info, report, nsyms = k.info.to_dict(), k.report, len(k.symbols)
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json({"kernel": info, "symbols": nsyms, "detection": report.to_dict()})
        return
    table(f"{vm}: kernel", ["", ""], [[k_, v] for k_, v in info.items()] + [["kallsyms symbols", nsyms]])
    console.print(report.summary())


def isf(vm: str = VM_ARG, out: Path = typer.Option(Path("kernel.json.xz"), "--out", "-o",
                                                     help="ISF file to write (.json or .json.xz)")) -> None:
    """Write a Volatility 3 symbol table (ISF) from the guest's own BTF and kallsyms."""
    try:
        with open_kernel(resolve_target(vm)) as k:
            path = export_isf(k.btf, k.symbols.symbols, k.info.banner, out, kaslr_shift=k.info.virt_slide)
    except NephoscopeError as exc:
        fail(exc)
    console.print(f"wrote {path} ({path.stat().st_size} bytes); use it with: vol -s {path.parent.parent} ...")
