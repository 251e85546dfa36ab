"""Benchmark the trap method: per-event cost on the host and the slowdown of an exec-heavy guest workload.

Usage: .venv/bin/python bench/trap.py [GUEST] [--execs 200] [--events exec] [--json]
The guest (a running lab guest, default `dev`) runs `--execs` executions of /bin/true, timed inside the
guest (/proc/uptime), first untrapped, then trapped with each resume strategy, then untrapped again; the
slowdown ratios are against the mean of the two untrapped runs measured in this same invocation.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

from nephoscope.core.errors import NephoscopeError
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.introspect.trap import TrapEvent, Watcher
from nephoscope.service.targets import resolve_target

SCRIPT = "read a r < /proc/uptime; for i in $(seq {n}); do /bin/true; done; read b r < /proc/uptime; echo $a $b"


def guest_run(qga: str, n: int) -> tuple[float, float]:
    """Run the workload; return (seconds inside the guest, host wall seconds)."""
    t = time.perf_counter()
    with GuestAgent(qga, timeout=1800) as agent:
        rc, out, err = agent.exec(["/bin/sh", "-c", SCRIPT.format(n=n)], timeout=1800)
    if rc != 0:
        raise SystemExit(f"guest workload failed: {err!r}")
    a, b = map(float, out.split())
    return b - a, time.perf_counter() - t


def trapped_run(name: str, n: int, events: list[str], skip_nops: bool) -> dict[str, Any]:
    """Run the workload while a watcher traps `events`; return timings and the watcher's stats."""
    vm = resolve_target(name)
    seen: list[TrapEvent] = []
    ready, done = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def watch() -> None:  # the watcher lives in this thread: its code-page DB connection is per thread
        try:
            watcher = Watcher(vm, events, budget=10_000, skip_nops=skip_nops)
        except NephoscopeError as exc:
            result["error"] = str(exc)
            ready.set()
            return
        try:
            result["stats"] = watcher.run(seen.append, should_stop=done.is_set, on_ready=ready.set).to_dict()
        finally:
            watcher.close()

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        if not ready.wait(120):
            raise SystemExit("the watcher did not attach within 120 s")
        if "error" in result:
            raise SystemExit(f"the watcher could not start: {result['error']}")
        result["guest_s"], result["wall_s"] = guest_run(str(vm.qga_socket), n)
    finally:
        done.set()
        thread.join()
    trues = [e for e in seen if e.kind == "exec" and e.detail.get("path") == "/bin/true"]
    result["execs_seen"], result["exec_pids"] = len(trues), len({e.pid for e in trues})
    result["exec_ppids"] = sorted({e.ppid for e in trues if e.ppid is not None})
    result["identities"] = sum(e.kind == "identity" for e in seen)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("guest", nargs="?", default="dev")
    ap.add_argument("--execs", type=int, default=200)
    ap.add_argument("--events", default="exec")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    vm = resolve_target(args.guest)
    events = [e for e in args.events.split(",") if e]
    base1 = guest_run(str(vm.qga_socket), args.execs)
    skip = trapped_run(args.guest, args.execs, events, skip_nops=True)
    step = trapped_run(args.guest, args.execs, events, skip_nops=False)
    base2 = guest_run(str(vm.qga_socket), args.execs)
    base = (base1[0] + base2[0]) / 2
    base_wall = (base1[1] + base2[1]) / 2
    report = {"guest": args.guest, "execs": args.execs, "events": events,
              "untrapped_guest_s": [base1[0], base2[0]], "untrapped_wall_s": [base1[1], base2[1]],
              "untrapped_ms_per_exec": 1000 * base / args.execs}
    for label, run in (("nop-skip", skip), ("step-over", step)):
        s = run["stats"]
        report[label] = {
            "guest_s": run["guest_s"], "slowdown_x": run["guest_s"] / base if base else None,
            "wall_s": run["wall_s"], "wall_slowdown_x": run["wall_s"] / base_wall,  # includes the pauses
            "guest_ms_per_event": 1000 * (run["guest_s"] - base) / max(s["events"], 1),
            "host_paused_ms_per_event": s["mean_paused_ms"], "host_max_paused_ms": 1000 * s["max_paused_s"],
            "events": s["events"], "execs_seen": run["execs_seen"],
            "exec_pids": run["exec_pids"], "exec_ppids": run["exec_ppids"], "identities": run["identities"],
            "attach_ms": 1000 * s["attach_s"],
            "detach_ms": 1000 * s["detach_s"]}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{args.guest}: {args.execs} execs of /bin/true, trapping {','.join(events)}")
    print(f"  untrapped: {report['untrapped_ms_per_exec']:.1f} ms/exec in the guest "
          f"(runs: {base1[0]:.2f}s, {base2[0]:.2f}s)")
    for label in ("nop-skip", "step-over"):
        r = report[label]
        print(f"  {label:<9}: {r['slowdown_x']:.1f}x slower in guest time ({r['guest_s']:.2f}s), "
              f"{r['wall_slowdown_x']:.1f}x in wall time; "
              f"{r['guest_ms_per_event']:.0f} ms guest time and {r['host_paused_ms_per_event']:.2f} ms host "
              f"handling per event (max {r['host_max_paused_ms']:.1f}); saw {r['execs_seen']}/{args.execs} execs "
              f"({r['exec_pids']} pids, parents {r['exec_ppids'][:3]}, {r['identities']} identity records); "
              f"attach {r['attach_ms']:.0f} ms, detach {r['detach_ms']:.0f} ms")


if __name__ == "__main__":
    main()
