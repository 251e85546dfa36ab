"""`nephoscope watch`: stream exec, exit and module-load events of a VM as they happen (trap method).

Every event is printed and stored as soon as the VM runs again; an exec's code identity follows as a second
record (`identity`, naming the exec by `exec_seq` and `exec_time` + pid). SIGINT, SIGTERM and SIGHUP stop the
watch cleanly (breakpoints removed, VM running, store committed); after SIGKILL the guard process detaches.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import sys
from typing import Any

import typer
from rich.text import Text

from nephoscope.cli.render import console, err_console, fail
from nephoscope.core.errors import NephoscopeError
from nephoscope.core.text import escape_guest
from nephoscope.hypervisor.gdbstub import repair
from nephoscope.introspect.trap import EVENTS, TrapEvent, Watcher
from nephoscope.service.targets import resolve_target
from nephoscope.store.events import EventLog
from nephoscope.store.sqlite import Store

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _identity(ident: dict[str, Any] | None) -> str:
    """Return an exec's identity for the table: `[package version]`, or why there is none."""
    if not ident:
        return "[unidentified: ?]"
    if "package" not in ident:
        return f"[unidentified: {ident.get('unverifiable', '?')}]"
    extra = f", {ident['unknown_pages']} unknown pages" if ident.get("unknown_pages") else ""
    capped = ", capped" if ident.get("capped") else ""
    return f"[{ident['package']} {' | '.join(ident.get('versions') or [ident['version']])}{extra}{capped}]"


def _line(ev: TrapEvent) -> Text:
    when = datetime.datetime.fromtimestamp(ev.time).strftime("%H:%M:%S.%f")[:-3]
    d = ev.detail
    if ev.kind == "exec":
        what = d.get("path", "")
        if d.get("file") and d["file"] != what:
            what += f" [{d['file']}]"  # the file really opened (symlinks, /proc/self/exe, memfds)
        if d.get("argv"):
            what += "  " + " ".join(d["argv"])
        what = f"#{ev.seq} {what}"
    elif ev.kind == "identity":  # follows its exec: #seq names it
        what = f"#{d.get('exec_seq', '?')} {d.get('path', '')}  {_identity(d.get('identity'))}"
    elif ev.kind == "exit":
        what = f"code {d.get('code', '?')}" + (f" (thread {ev.tid})" if ev.tid != ev.pid else "")
    else:
        what = f"{d.get('name', '?')} ({d.get('core_size', '?')} bytes)"
    text = f"{when} {ev.kind:<8} pid {ev.pid!s:>6} ppid {ev.ppid!s:>6} {ev.comm:<16} {what}"
    return Text(escape_guest(text + (f"  [unreadable: {ev.error}]" if ev.error else "")),
                style="yellow" if ev.error else "")


def watch(
    vm: str = typer.Argument(..., help="lab guest name or QMP socket (a VM without a gdbstub gets one on demand)"),
    events: str = typer.Option("exec,module", "--events", "-e",
                               help=f"comma-separated subset of {','.join(EVENTS)} (each stop costs guest time)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object per event (and stats last)"),
    duration: float = typer.Option(0.0, "--duration", "-d", help="seconds to watch (0: until Ctrl-C)"),
    budget: int = typer.Option(200, "--budget", help="events per second before breakpoints pause for a cool-down"),
    no_store: bool = typer.Option(False, "--no-store", help="do not record events in the store"),
    stop: bool = typer.Option(False, "--stop", help="only remove every breakpoint and resume the VM, then exit"),
    no_identify: bool = typer.Option(False, "--no-identify",
                                     help="do not identify exec'd code via the code-page DB (no identity records)"),
    arch: bool = typer.Option(False, "--arch", help="stream the archevents plugin's executed pages instead of "
                              "trapping (unknown code as it first runs; TCG guests started with --arch-events)"),
    all_pages: bool = typer.Option(False, "--all", help="with --arch: print every page, not only unknown ones"),
) -> None:
    """Trap exec/exit/module-load in the guest kernel and stream each event (pauses the VM per event)."""
    stopping: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)  # the watch loop notices within 0.2 s and detaches cleanly

    # installed before detection: a signal while the model loads must not leave a traceback either
    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        if arch:
            from nephoscope.cli.watch_arch import watch_arch

            watch_arch(vm, json_out, duration, all_pages, stopping)
            return
        _watch(vm, events, json_out, duration, budget, no_store, stop, no_identify, stopping)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _watch(vm: str, events: str, json_out: bool, duration: float, budget: int, no_store: bool, stop: bool,
           no_identify: bool, stopping: list[int]) -> None:
    try:
        target = resolve_target(vm)
        if stop:
            if target.gdb_port is None:
                from nephoscope.hypervisor.gdbstub import remove_stub

                removed = remove_stub(target)  # a stub left by a watch that was started on demand
                err_console.print(f"{target.name}: no gdbstub of its own; " + (
                    "removed any on-demand gdbstub" if removed else "the monitor did not answer"))
                raise SystemExit(0 if removed else 1)
            ok = repair("127.0.0.1", target.gdb_port, attempts=20)
            err_console.print(f"{target.name}: " + ("detached; no breakpoints left, VM running" if ok
                                                     else "could not reach the gdbstub"))
            raise SystemExit(0 if ok else 1)
        watcher = Watcher(target, [e.strip() for e in events.split(",") if e.strip()], budget=budget,
                          identify=not no_identify)
    except NephoscopeError as exc:
        fail(exc)
    if stopping:  # asked to stop before anything was attached
        watcher.close()
        return
    log = None if no_store else EventLog(Store(), target.name)
    printing = [True]

    def write(text: str | Text) -> None:
        """Print one line now (flushed: a reader sees it at once); a closed pipe ends the watch."""
        if not printing:
            return
        try:
            if isinstance(text, Text):
                console.print(text, soft_wrap=True)
                console.file.flush()
            else:
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
        except (BrokenPipeError, ValueError):  # the reader went away: stop, but still detach and store
            printing.clear()
            stopping.append(signal.SIGPIPE)
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def on_event(ev: TrapEvent) -> None:
        write(json.dumps({"event": ev.to_dict()}) if json_out else _line(ev))
        if log is not None:
            log.add(ev)

    def on_ready() -> None:
        if json_out:
            write(json.dumps({"ready": {"vm": target.name, "events": watcher.events, "gdbstub": watcher.stats.gdbstub,
                                        "hooks": {k: hex(a) for a, k in watcher.hooks.items()}}}))
        else:
            err_console.print(Text(f"watching {target.name} ({', '.join(watcher.events)}; gdbstub "
                                   f"{watcher.stats.gdbstub}); Ctrl-C stops", style="dim"))

    def should_stop() -> bool:
        if log is not None:
            log.tick()  # commit what a burst left pending
        return bool(stopping)

    try:
        stats = watcher.run(on_event, duration=duration or None, should_stop=should_stop, on_ready=on_ready)
    except NephoscopeError as exc:
        fail(exc)
    finally:
        watcher.close()
        if log is not None:
            log.flush()
    if json_out:
        write(json.dumps({"stats": stats.to_dict()}))
    else:
        s = stats.to_dict()
        err_console.print(Text(f"{s['events']} events in {s['watched_s']:.1f}s; guest paused {s['mean_paused_ms']:.2f} "
                               f"ms/event (max {1000 * s['max_paused_s']:.1f} ms); attach {1000 * s['attach_s']:.0f} "
                               f"ms; {len(s['gaps'])} budget gaps", style="dim"))
        for gap in stats.gaps:
            err_console.print(Text(f"unverifiable gap: {gap['reason']}; {gap['forks_missed']} forks unseen",
                                   style="yellow"))
