"""`evaluate` for the architectural event stream (`arch-events`): power, robustness and slowdown on a lab guest
booted with the archevents TCG plugin, next to the same profile's guest without it.

The stream knows pages, not processes: a truth process counts as seen/identified when its binary's pages were
executed and identified (exact package version), per binary, as arch scores before pids are linked. A
technique counts as detected when unknown code is attributed (through the page tables) to the technique's
process or its children; a process hidden from the guest's listings counts when any of its code is seen
running. Pids come from inspect's cr3 of each task (evaluation only). Masquerading and deleted binaries are
about names, which the stream never sees: missed, by construction.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from typing import Any

from nephoscope.core.payloads import Process
from nephoscope.core.records import Verdict
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.introspect.archevents import TCG_ONLY, ArchEventStream, PageEvent
from nephoscope.introspect.identify import open_kb
from nephoscope.introspect.ram import open_ram
from nephoscope.lab import runner
from nephoscope.lab.build import build_image
from nephoscope.lab.profile import load_profile
from nephoscope.service.evaluate import (
    DETECTED,
    MISSED,
    MethodScore,
    claim_name,
    guest_cpu_loop,
    truth_processes,
)
from nephoscope.service.methods import get_method
from nephoscope.service.targets import resolve_target

METHOD = "arch-events"
CODE_TECHNIQUES = ("code-injection", "unpackaged-binary", "trojaned-binary", "fileless-memfd")
SEEN_TECHNIQUES = ("preload-hidden",)
Progress = Callable[[str], None]


def read_stream(guest: runner.Guest, settle_s: float = 3.0) -> tuple[list[PageEvent], dict[str, Any]]:
    """Connect to `guest`'s plugin, take the replay and `settle_s` s of live events; return them and the costs."""
    target = resolve_target(guest.name)
    phys = open_ram(target)
    db, why = open_kb()
    stream = ArchEventStream(guest.arch_events_socket, phys, db, attribute_known=True, db_reason=why)
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    try:
        stream.connect()
        events = list(stream.iter_events(duration=60, should_stop=lambda: stream.replay_done))
        events += list(stream.iter_events(duration=settle_s))
    finally:
        stream.close()
        phys.close()
        if db is not None:
            db.close()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    costs = {"wall_s": time.monotonic() - t0, "cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
             "ended": stream.ended, "records": stream.parser.records, "counts": dict(stream.counts)}
    return events, costs


def pid_cr3(name: str) -> dict[int, int]:
    """Return pid -> page-table root (guest-physical) from inspect (evaluation only)."""
    out = {}
    for o in get_method("inspect").collect(resolve_target(name)):
        if isinstance(o.payload, Process) and o.verdict != Verdict.UNVERIFIABLE and o.payload.cr3 is not None:
            out[o.payload.pid] = o.payload.cr3
    return out


def score_stream(events: list[PageEvent], manifest: dict[str, Any], pids: dict[int, int]) -> tuple[int, int, dict]:
    """Return (seen, identified, techniques) of one profile's event stream against its manifest."""
    truth = truth_processes(manifest)
    names: dict[str, set[tuple[str, str]]] = {}
    for e in events:
        for im in e.images:
            names.setdefault(os.path.basename(im["path"]), set()).add((im["package"], im["version"]))
    seen = identified = 0
    for t in truth:
        got = names.get(os.path.basename(t["binary"]))
        if got:
            seen += 1
            identified += bool(t["package"]) and (t["package"], t["version"]) in got
    unknown_roots = {c for e in events if e.verdict == "unknown" and e.user for c in e.cr3}
    running_roots = {c for e in events if e.user for c in e.cr3}
    children = {p["pid"]: p["ppid"] for p in manifest["processes"]}
    techniques = {}
    for tech in manifest.get("techniques", []):
        if tech.get("kind") == "kernel":
            continue
        family = {tech["pid"]} | {c for c, p in children.items() if p == tech["pid"]}
        if tech["id"] in SEEN_TECHNIQUES:  # hidden from the guest's listings: detected when its code is seen running
            hit = any(pids.get(pid) in running_roots for pid in family)
        else:
            hit = tech["id"] in CODE_TECHNIQUES and any(pids.get(pid) in unknown_roots for pid in family)
        techniques[tech["id"]] = DETECTED if hit else MISSED
    return seen, identified, techniques


def score_arch_events(profile: str, baseline: runner.Guest | None, *, slowdown: bool = True, keep: bool = False,
                      progress: Progress = lambda _m: None) -> MethodScore:
    """Boot `profile` with the plugin, score its stream; slowdown = its CPU loop against `baseline`'s (no plugin)."""
    name = claim_name(f"eval-{profile}-ae")
    guest = runner.load_guest(name)
    owned = guest is None or not guest.alive()
    if owned:
        progress(f"booting {name} with the archevents plugin")
        guest = runner.start(name, build_image(load_profile(profile), None, progress), progress=progress,
                             arch_events=True)
    assert guest is not None
    try:
        progress(f"{profile}: {METHOD}")
        events, costs = read_stream(guest)
        seen, identified, techniques = score_stream(events, guest.manifest(), pid_cr3(guest.name))
        truth = truth_processes(guest.manifest())
        counts = costs["counts"]
        score = MethodScore(METHOD, profile, len(truth), seen, identified, techniques, round(costs["wall_s"], 3),
                            round(costs["cpu_s"], 3), 0.0,
                            findings=["unknown-code"] if counts.get("unknown") else [],
                            unverifiable=[f"scope: {TCG_ONLY}"] + ([f"stream: {costs['ended']}"] if costs["ended"]
                                                                   else []))
        if slowdown and baseline is not None:
            progress(f"{profile}: {METHOD} slowdown (plugin guest vs {baseline.name})")
            with GuestAgent(baseline.qga_socket, timeout=60) as agent:
                base = [guest_cpu_loop(agent) for _ in range(2)]
            with GuestAgent(guest.qga_socket, timeout=60) as agent:
                runs = [guest_cpu_loop(agent) for _ in range(2)]
            score.guest_slowdown = round(min(r[0] for r in runs) / min(b[0] for b in base), 3)
            score.wall_slowdown = round(min(r[1] for r in runs) / min(b[1] for b in base), 3)
        return score
    finally:
        if owned and not keep:
            runner.stop(name, quiet=True)
