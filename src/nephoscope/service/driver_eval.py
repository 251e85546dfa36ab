"""Score the `driver` method on a lab guest: nphdrv loaded for the measurement only, then removed.

Power: the processes it lists, and whether a 50 ms process (busybox sleep 0.05, run through guest-exec)
is in its event log, exec and exit. Robustness: its own view, and (on profiles with techniques) its view
compared with inspect's (`driver-view-mismatch`). Cost: the module's own kernel time per event (ktime,
its stats) and the in-guest time of an exec-heavy loop with the module against the same guest without it,
in one run, rounds interleaved (the CPU-loop slowdown evaluate measures for the other methods says nothing here: the
driver costs the guest per event, not per read). The module is unloaded at the end so the guest is
what it was. Nothing here pauses the VM.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from nephoscope.core.errors import ConnectorError, NephoscopeError
from nephoscope.core.payloads import Exec, Exit
from nephoscope.core.records import Finding
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.lab import runner
from nephoscope.lab.driverload import build_driver, driver_loaded, load_driver, manifest_kernel, unload_driver
from nephoscope.service.evaluate import (
    MethodScore,
    score_power,
    score_techniques,
    timed_guest_script,
    truth_processes,
)
from nephoscope.service.scan import ScanResult, run_scan
from nephoscope.service.targets import resolve_target
from nephoscope.store.sqlite import Store

Progress = Callable[[str], None]
EXEC_LOOP = 200
ROUNDS = 5
EXEC_SCRIPT = "read a r < /proc/uptime; i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done; " \
              "read b r < /proc/uptime; echo $a $b"
SHORT = ["/bin/busybox", "sleep", "0.05"]


def exec_loop(agent: GuestAgent, n: int = EXEC_LOOP) -> tuple[float, float]:
    """Run `n` execs of /bin/true in the guest; return (in-guest seconds, host-observed seconds)."""
    return timed_guest_script(agent, EXEC_SCRIPT.format(n=n), timeout=1800)


def run_short(agent: GuestAgent, timeout: float = 60) -> int:
    """Run the 50 ms process (busybox sleep 0.05) through guest-exec, wait until reaped; return its guest pid."""
    pid = agent.call("guest-exec", path=SHORT[0], arg=SHORT[1:])["pid"]
    deadline = time.monotonic() + timeout
    while not agent.call("guest-exec-status", pid=pid).get("exited"):
        if time.monotonic() > deadline:
            raise ConnectorError(f"{' '.join(SHORT)} (guest pid {pid}) did not finish within {timeout:.0f}s")
        time.sleep(0.05)
    return int(pid)


def interleaved_slowdown(agent: GuestAgent, ko: bytes, rounds: int = ROUNDS) -> tuple[float, float]:
    """Return (in-guest, host-wall) ratios of the exec loop with nphdrv loaded to without, medians of interleaved
    rounds (without, load, with, unload) after one uncounted warm-up; the guest ends without the module.

    Interleaving matters: on a shared host one loop's time varies by 2-3x from run to run, and a block of runs
    without followed by a block with measures the host's drift, not the module."""
    exec_loop(agent)  # warm-up: a freshly booted guest's first loops are the slowest
    without: list[tuple[float, float]] = []
    with_: list[tuple[float, float]] = []
    for _ in range(rounds):
        without.append(exec_loop(agent))
        load_driver(agent, ko)
        with_.append(exec_loop(agent))
        unload_driver(agent)
    return (round(statistics.median(w[0] for w in with_) / statistics.median(w[0] for w in without), 3),
            round(statistics.median(w[1] for w in with_) / statistics.median(w[1] for w in without), 3))


def short_lived_seen(result: ScanResult, pid: int) -> str:
    """Return how a scan saw the 50 ms process `pid`: its exec and exit events, in its process list, or missed."""
    execs = [o for o in result.observations if isinstance(o.payload, Exec) and o.payload.pid == pid]
    exits = [o for o in result.observations if isinstance(o.payload, Exit) and o.payload.pid == pid]
    if execs and exits:
        return f"seen (exec+exit of pid {pid})"
    if pid in result.view.processes:
        return f"listed (pid {pid})"
    return "missed"


def own_hook(finding: Finding) -> bool:
    """Return whether a finding is inspect's report of nphdrv's own tracepoint probes (an inline hook into it)."""
    return finding.kind == "inline-hook" and "nphdrv" in finding.title and "__SCT__tp_func_sched_process_" \
        in finding.title


def _score(result: ScanResult, label: str, guest: runner.Guest) -> MethodScore:
    manifest = guest.manifest()
    truth = truth_processes(manifest)
    seen, identified = score_power(result, truth)
    t = result.timings.get("driver", {})
    return MethodScore(label, guest.profile, len(truth), seen, identified, score_techniques(result, manifest),
                       sum(x.get("wall_s", 0.0) for x in result.timings.values()),
                       sum(x.get("cpu_s", 0.0) for x in result.timings.values()), float(t.get("pause_s", 0.0)),
                       findings=sorted({f.kind for f in result.view.findings}),
                       unverifiable=[f"{u['what']}: {u['reason'][:120]}" for u in result.view.unverifiable])


def score_driver(guest: runner.Guest, *, slowdown: bool = False, store: Store | None = None,
                 progress: Progress = lambda _m: None) -> list[MethodScore]:
    """Load nphdrv into a running lab guest, score the driver (and driver+inspect with techniques), unload it."""
    try:
        ko = build_driver(manifest_kernel(guest.manifest()))
    except NephoscopeError as exc:
        score = MethodScore("driver", guest.profile, len(truth_processes(guest.manifest())))
        score.unverifiable = [f"driver: nphdrv cannot be built for this guest: {exc}"]
        return [score]
    ratios: tuple[float, float] | None = None
    try:
        with GuestAgent(guest.qga_socket, timeout=60) as agent:  # type: ignore[arg-type]
            if driver_loaded(agent):
                unload_driver(agent)
            if slowdown:
                progress(f"{guest.profile}: exec loop without and with the driver, interleaved")
                ratios = interleaved_slowdown(agent, ko)
            load_driver(agent, ko)
    except NephoscopeError as exc:
        score = MethodScore("driver", guest.profile, len(truth_processes(guest.manifest())))
        score.unverifiable = [f"driver: nphdrv could not be loaded into the guest: {exc}"]
        return [score]
    try:
        with GuestAgent(guest.qga_socket, timeout=60) as agent:  # type: ignore[arg-type]
            short_pid = run_short(agent)
        progress(f"{guest.profile}: driver")
        result = run_scan(resolve_target(guest.name), ["driver"], store=store or Store())
        score = _score(result, "driver", guest)
        score.short_lived = short_lived_seen(result, short_pid)
        stats = next((o.payload.to_json() for o in result.observations if o.kind == "driver-stats"), {})
        cost = stats.get("cost") if isinstance(stats.get("cost"), dict) else {}
        score.event_cost_ns = {k: round(v["mean_ns"]) for k, v in cost.items()
                               if isinstance(v, dict) and isinstance(v.get("mean_ns"), float)}
        if ratios is not None:
            score.guest_slowdown, score.wall_slowdown = ratios
        scores = [score]
        if score.techniques:
            progress(f"{guest.profile}: driver+inspect")
            both = run_scan(resolve_target(guest.name), ["driver", "inspect"], store=store or Store())
            # nphdrv's own tracepoint probes are static-call jumps into it, which inspect reports as inline hooks:
            # the provider knows its own module, and they must not score a rootkit's inline patch as detected
            both.view.findings = [f for f in both.view.findings if not own_hook(f)]
            scores.append(_score(both, "driver+inspect", guest))
        return scores
    finally:
        try:
            with GuestAgent(guest.qga_socket, timeout=60) as agent:  # type: ignore[arg-type]
                unload_driver(agent)
        except NephoscopeError as exc:
            progress(f"{guest.profile}: nphdrv could not be removed from the guest: {exc}")
