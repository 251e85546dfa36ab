"""`nephoscope watch`: stream exec, exit and module-load events of a VM as they happen (trap method)."""

from __future__ import annotations

import datetime
import json
import signal
import sys
from typing import Any

import typer
from rich.text import Text

from nephoscope.cli.render import console, err_console, fail
from nephoscope.core.errors import ConnectorError, NephoscopeError
from nephoscope.core.text import escape_guest
from nephoscope.hypervisor.gdbstub import repair
from nephoscope.introspect.trap import EVENTS, EventLog, TrapEvent, Watcher
from nephoscope.service.targets import resolve_target
from nephoscope.store.sqlite import Store


def _identity(ident: dict[str, Any] | None) -> str:
    """Return the table suffix for an exec's identity: `[package version]`, or why there is none."""
    if not ident:
        return ""
    if "package" not in ident:
        return f"  [unidentified: {ident.get('unverifiable', '?')}]"
    extra = f", {ident['unknown_pages']} unknown pages" if ident.get("unknown_pages") else ""
    capped = ", capped" if ident.get("capped") else ""
    return f"  [{ident['package']} {' | '.join(ident.get('versions') or [ident['version']])}{extra}{capped}]"


def _line(ev: TrapEvent) -> Text:
    when = datetime.datetime.fromtimestamp(ev.time).strftime("%H:%M:%S.%f")[:-3]
    d = ev.detail
    if ev.kind == "exec":
        what = d.get("path", "")
        if d.get("file") and d["file"] != what:
            what += f" [{d['file']}]"  # the file really opened (symlinks, /proc/self/exe, memfds)
        if d.get("argv"):
            what += "  " + " ".join(d["argv"])
        what += _identity(d.get("identity"))
    elif ev.kind == "exit":
        what = f"code {d.get('code', '?')}" + (f" (thread {ev.tid})" if ev.tid != ev.pid else "")
    else:
        what = f"{d.get('name', '?')} ({d.get('core_size', '?')} bytes)"
    text = f"{when} {ev.kind:<6} pid {ev.pid!s:>6} ppid {ev.ppid!s:>6} {ev.comm:<16} {what}"
    return Text(escape_guest(text + (f"  [unreadable: {ev.error}]" if ev.error else "")),
                style="yellow" if ev.error else "")


def watch(
    vm: str = typer.Argument(..., help="lab guest name (a VM with a gdbstub and a shared RAM file)"),
    events: str = typer.Option("exec,module", "--events", "-e",
                               help=f"comma-separated subset of {','.join(EVENTS)} (each stop costs guest time)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object per event (and stats last)"),
    duration: float = typer.Option(0.0, "--duration", "-d", help="seconds to watch (0: until Ctrl-C)"),
    budget: int = typer.Option(200, "--budget", help="events per second before breakpoints pause for a cool-down"),
    no_store: bool = typer.Option(False, "--no-store", help="do not record events in the store"),
    stop: bool = typer.Option(False, "--stop", help="only remove every breakpoint and resume the VM, then exit"),
    no_identify: bool = typer.Option(False, "--no-identify",
                                     help="print execs at once, without identifying their code via the code-page DB"),
) -> None:
    """Trap exec/exit/module-load in the guest kernel and stream each event (pauses the VM per event)."""
    try:
        target = resolve_target(vm)
        if stop:
            if target.gdb_port is None:
                raise ConnectorError(f"{target.name} has no gdbstub")
            ok = repair("127.0.0.1", target.gdb_port, attempts=20)
            err_console.print(f"{target.name}: " + ("detached; no breakpoints left, VM running" if ok
                                                     else "could not reach the gdbstub"))
            raise SystemExit(0 if ok else 1)
        watcher = Watcher(target, [e.strip() for e in events.split(",") if e.strip()], budget=budget,
                          identify=not no_identify)
    except NephoscopeError as exc:
        fail(exc)
    log = None if no_store else EventLog(Store(), target.name)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)  # the watch loop notices within 0.2 s and detaches cleanly

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    def on_event(ev: TrapEvent) -> None:
        if json_out:
            sys.stdout.write(json.dumps({"event": ev.to_dict()}) + "\n")
            sys.stdout.flush()
        else:
            console.print(_line(ev), soft_wrap=True)
        if log is not None:
            log.add(ev)

    def on_ready() -> None:
        if json_out:
            sys.stdout.write(json.dumps({"ready": {"vm": target.name, "events": watcher.events,
                                                   "hooks": {k: hex(a) for a, k in watcher.hooks.items()}}}) + "\n")
            sys.stdout.flush()
        else:
            err_console.print(Text(f"watching {target.name} ({', '.join(watcher.events)}); Ctrl-C stops",
                                   style="dim"))

    try:
        stats = watcher.run(on_event, duration=duration or None, should_stop=lambda: bool(stopping),
                            on_ready=on_ready)
    except NephoscopeError as exc:
        fail(exc)
    finally:
        watcher.close()
        if log is not None:
            log.flush()
    if json_out:
        sys.stdout.write(json.dumps({"stats": stats.to_dict()}) + "\n")
    else:
        s = stats.to_dict()
        err_console.print(Text(f"{s['events']} events in {s['watched_s']:.1f}s; guest paused {s['mean_paused_ms']:.2f} "
                               f"ms/event (max {1000 * s['max_paused_s']:.1f} ms); attach {1000 * s['attach_s']:.0f} "
                               f"ms; {len(s['gaps'])} budget gaps", style="dim"))
        for gap in stats.gaps:
            err_console.print(Text(f"unverifiable gap: {gap['reason']}; {gap['forks_missed']} forks unseen",
                                   style="yellow"))
