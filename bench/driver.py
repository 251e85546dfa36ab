"""Benchmark the driver method's cost to the guest: an exec-heavy loop with nphdrv loaded against without it.

Usage: .venv/bin/python bench/driver.py [GUEST] [--execs 300] [--rounds 3] [--json]
GUEST is a running lab guest (default: boot a clean guest of this benchmark's own, stopped at the end).
Each round times `--execs` executions of /bin/true inside the guest (/proc/uptime), without the module, then
with it (unloaded between), and once more without at the end, after one uncounted warm-up run; the ratio is
the median with the module over the median without, all in this same invocation. The module's own
accounting (ktime around each probe) gives the guest kernel time per event; the driver method's read
(agent round trips, /proc files) is timed on the host. The module is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.introspect.driver import DriverMethod
from nephoscope.lab import runner
from nephoscope.lab.build import build_image
from nephoscope.lab.driverload import build_driver, driver_loaded, load_driver, manifest_kernel, unload_driver
from nephoscope.lab.profile import load_profile
from nephoscope.service.driver_eval import exec_loop
from nephoscope.service.targets import resolve_target


def measure(guest: runner.Guest, execs: int, rounds: int) -> dict[str, Any]:
    """Return the timings of `rounds` without/with/without rounds and the module's own per-event cost."""
    ko = build_driver(manifest_kernel(guest.manifest()))
    without: list[float] = []
    with_: list[float] = []
    read_s: list[float] = []
    stats: dict[str, Any] = {}
    qga = str(guest.qga_socket)
    with GuestAgent(qga, timeout=60) as agent:
        if driver_loaded(agent):
            unload_driver(agent)
        exec_loop(agent, execs)  # warm-up (page cache, TCG translation): not counted
    for _ in range(rounds):
        with GuestAgent(qga, timeout=60) as agent:
            without.append(exec_loop(agent, execs)[0])
            load_driver(agent, ko)
            with_.append(exec_loop(agent, execs)[0])
        started = time.monotonic()
        obs = list(DriverMethod().collect(resolve_target(guest.name)))
        read_s.append(time.monotonic() - started)
        stats = next((o.payload.to_json() for o in obs if o.kind == "driver-stats"), {})
        with GuestAgent(qga, timeout=60) as agent:
            unload_driver(agent)
    with GuestAgent(qga, timeout=60) as agent:
        without.append(exec_loop(agent, execs)[0])
    base = statistics.median(without)
    return {"guest": guest.name, "kernel": guest.manifest()["kernel"]["release"], "execs": execs, "rounds": rounds,
            "without_s": without, "with_s": with_, "slowdown": round(statistics.median(with_) / base, 3),
            "per_exec_added_us": round((statistics.median(with_) - base) / execs * 1e6, 1),
            "module_cost_ns": stats.get("cost", {}), "driver_read_s": [round(x, 2) for x in read_s]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("guest", nargs="?", default="")
    ap.add_argument("--execs", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    name = args.guest or f"bench-driver-{os.getpid() % 100000}"
    owned = not args.guest
    guest = runner.start(name, build_image(load_profile("clean"))) if owned else runner.get_guest(name)
    try:
        out = measure(guest, args.execs, args.rounds)
    finally:
        if owned:
            runner.stop(name, quiet=True)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{out['guest']} ({out['kernel']}): {out['execs']} execs of /bin/true x {out['rounds']} rounds")
    print(f"  without nphdrv: {', '.join(f'{x:.2f}' for x in out['without_s'])} s (in-guest)")
    print(f"  with nphdrv:    {', '.join(f'{x:.2f}' for x in out['with_s'])} s (in-guest)")
    print(f"  slowdown (medians) {out['slowdown']:.3f}x, {out['per_exec_added_us']} us added per exec (noise included)")
    for kind, c in out["module_cost_ns"].items():
        if c.get("count"):
            print(f"  module's own cost, {kind}: {c['count']} events, mean {c['mean_ns']:.0f} ns, max {c['max_ns']} ns")
    print(f"  driver method read (host wall): {out['driver_read_s']} s")


if __name__ == "__main__":
    main()
