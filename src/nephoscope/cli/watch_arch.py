"""`nephoscope watch --arch`: stream the pages a TCG guest executes for the first time (or after a write), identified.

The archevents plugin (guest started with `nephoscope lab up NAME --arch-events`) reports each page; each is
identified against the code-page DB at once and unknown user code is printed as it runs (with `--all`, every
page). Pages executed before the watch started arrive first as a replay. TCG only: KVM hosts use periodic arch
scans and trap.
"""

from __future__ import annotations

import datetime
import json
import sys

from rich.text import Text

from nephoscope.cli.render import console, err_console, fail
from nephoscope.core.errors import NephoscopeError
from nephoscope.introspect.archevents import TCG_ONLY, ArchEventStream, PageEvent
from nephoscope.service.targets import resolve_target


def _line(ev: PageEvent) -> Text:
    when = datetime.datetime.fromtimestamp(ev.time).strftime("%H:%M:%S.%f")[:-3]
    what = ", ".join(f"{i['path']} [{i['package']} {i['version']}]" for i in ev.images[:2]) or ev.note
    if ev.verdict == "unknown" and ev.user:
        what = "cr3 " + (",".join(hex(c) for c in ev.cr3) or "?") + ("  " + ev.note if ev.note else "")
    text = f"{when} {ev.kind:<7} {ev.verdict:<8} gpa {ev.gpa:#011x} vaddr {ev.vaddr:#018x} {what}"
    return Text(text, style="bold red" if ev.verdict == "unknown" else "")


def watch_arch(vm: str, json_out: bool, duration: float, all_pages: bool, stopping: list[int]) -> None:
    """Stream `vm`'s executed-page events until `duration` s or a stop signal (reads RAM only; no pause)."""
    from nephoscope.introspect.identify import open_kb
    from nephoscope.introspect.ram import open_ram

    try:
        target = resolve_target(vm)
        if target.qmp_socket is None:
            raise NephoscopeError(f"{target.name}: no QEMU run directory to find the archevents socket in")
        phys = open_ram(target)
        db, why = open_kb()
        stream = ArchEventStream(target.qmp_socket.parent / "archevents.sock", phys, db, db_reason=why)
        stream.connect(timeout=5)
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        sys.stdout.write(json.dumps({"ready": {"vm": target.name, "limit": TCG_ONLY}}) + "\n")
        sys.stdout.flush()
    else:
        err_console.print(Text(f"watching {target.name}'s executed pages (archevents plugin; {TCG_ONLY}); "
                               "Ctrl-C stops", style="dim"))
    try:
        for ev in stream.iter_events(duration=duration or None, should_stop=lambda: bool(stopping)):
            if not all_pages and not (ev.verdict == "unknown" and ev.user) and ev.kind != "written":
                continue
            try:
                if json_out:
                    sys.stdout.write(json.dumps({"page": ev.to_dict()}) + "\n")
                    sys.stdout.flush()
                else:
                    console.print(_line(ev), soft_wrap=True)
                    console.file.flush()
            except (BrokenPipeError, ValueError):
                break
    finally:
        stream.close()
        phys.close()
        if db is not None:
            db.close()
    summary = {"counts": stream.counts, "records": stream.parser.records, "ended": stream.ended,
               "hello": stream.hello}
    if json_out:
        sys.stdout.write(json.dumps({"stats": summary}) + "\n")
    else:
        err_console.print(Text(f"{stream.parser.records} records; " + ", ".join(
            f"{k} {v}" for k, v in sorted(stream.counts.items())) + (f"; {stream.ended}" if stream.ended else ""),
            style="yellow" if stream.ended else "dim"))
