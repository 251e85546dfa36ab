"""Benchmark every method: wall time, host CPU, guest-visible pause and guest slowdown, as ratios against
the guest's undisturbed run of the same CPU-bound loop measured in this invocation.

Usage: bench/methods.py [GUEST] [--methods agent,inspect,checkpoint,arch]   (boots a clean guest if none)
"""

from __future__ import annotations

import argparse
import json
import time

from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.lab import runner
from nephoscope.service.evaluate import guest_cpu_loop, measure_slowdown
from nephoscope.service.methods import default_methods, get_method
from nephoscope.service.targets import resolve_target


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("guest", nargs="?")
    parser.add_argument("--methods", default=",".join(default_methods()))
    args = parser.parse_args()
    with runner.guest_for(args.guest) as guest:
        name = guest.name
        with GuestAgent(guest.qga_socket, timeout=120) as agent:
            runs = [guest_cpu_loop(agent) for _ in range(3)]
        baseline = (min(r[0] for r in runs), min(r[1] for r in runs))
        results = {"guest": name, "baseline_loop": {"guest_s": round(baseline[0], 3), "wall_s": round(baseline[1], 3)}}
        for method_name in args.methods.split(","):
            method = get_method(method_name)
            wall, cpu = time.monotonic(), time.process_time()
            count = sum(1 for _ in method.collect(resolve_target(name)))
            wall, cpu = time.monotonic() - wall, time.process_time() - cpu
            pause = float(getattr(method, "last_stats", {}).get("pause_s", 0.0))
            guest_ratio, wall_ratio = measure_slowdown(name, method_name)
            results[method_name] = {"wall_s": round(wall, 3), "host_cpu_s": round(cpu, 3), "observations": count,
                                    "guest_pause_s": round(pause, 4),
                                    "guest_loop_slowdown": round(guest_ratio, 3),
                                    "guest_wall_slowdown": round(wall_ratio, 3)}
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
