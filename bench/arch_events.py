"""Benchmark the archevents TCG plugin: guest slowdown against the same guest without it, and event throughput.

One run boots the clean profile three times, one guest at a time: without the plugin, with it, and with it
but no store tracking (`writes=off`: first executions only); file RAM, TCG, the same kernel and initramfs.
In each, a fixed in-guest workload is timed through the agent: a CPU-bound shell loop (`evaluate`'s) and an
exec-heavy loop (N runs of /bin/true). With the plugin a reader consumes the stream during the workload;
throughput is the replay's records per second (every page executed since boot, with its 4 KiB, identified
against the code-page DB).

Usage: .venv/bin/python bench/arch_events.py [--execs 200] [--loop 60000]
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.introspect.archevents import ArchEventStream
from nephoscope.introspect.identify import open_kb
from nephoscope.introspect.ram import open_ram
from nephoscope.lab import runner
from nephoscope.lab.build import build_image
from nephoscope.lab.profile import load_profile
from nephoscope.service.evaluate import guest_cpu_loop
from nephoscope.service.targets import resolve_target

EXEC_SCRIPT = ("read s x < /proc/uptime; i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done; "
               "read e x < /proc/uptime; echo $s $e")


def workload(guest: runner.Guest, execs: int, loop: int) -> dict[str, float]:
    """Time the CPU loop and the exec loop inside `guest` (in-guest seconds, best of two)."""
    with GuestAgent(guest.qga_socket, timeout=120) as agent:
        cpu = min(guest_cpu_loop(agent, loop)[0] for _ in range(2))
        runs = []
        for _ in range(2):
            code, out, err = agent.exec(["/bin/sh", "-c", EXEC_SCRIPT.format(n=execs)], timeout=600)
            assert code == 0, err
            s, e = (float(x) for x in out.split()[:2])
            runs.append(e - s)
    return {"cpu_loop_s": cpu, "exec_loop_s": min(runs)}


def with_plugin(guest: runner.Guest, execs: int, loop: int) -> dict[str, object]:
    """Read the replay, then run the workload while the stream is consumed; return times and stream counts."""
    phys = open_ram(resolve_target(guest.name))
    db, _why = open_kb()
    stream = ArchEventStream(guest.arch_events_socket, phys, db)
    t0 = time.monotonic()
    replay = list(stream.iter_events(duration=60, should_stop=lambda: stream.replay_done))
    replay_s = time.monotonic() - t0
    stop = threading.Event()
    result: dict[str, dict[str, float]] = {}

    def run() -> None:  # the KB connection belongs to the reading thread: the workload runs in this one
        try:
            result["w"] = workload(guest, execs, loop)
        finally:
            stop.set()

    worker = threading.Thread(target=run)
    worker.start()
    live = list(stream.iter_events(duration=900, should_stop=stop.is_set))
    worker.join()
    stream.request_stats()
    list(stream.iter_events(duration=1))
    stream.close()
    phys.close()
    if db is not None:
        db.close()
    return result["w"] | {"replay_records": len(replay), "replay_s": round(replay_s, 3),
                          "replay_per_s": round(len(replay) / replay_s, 1) if replay_s else None,
                          "live_events": len(live), "counts": stream.counts, "plugin_stats": stream.plugin_stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--execs", type=int, default=200)
    ap.add_argument("--loop", type=int, default=60000)
    args = ap.parse_args()
    image = build_image(load_profile("clean"))
    out: dict[str, object] = {}
    for label, plugin, writes in (("without", False, True), ("with", True, True), ("with-no-writes", True, False)):
        name = f"bench-ae-{label}"
        guest = runner.start(name, image, arch_events=plugin, arch_events_writes=writes)
        try:
            if not plugin:
                out[label] = workload(guest, args.execs, args.loop)
                continue
            out[label] = with_plugin(guest, args.execs, args.loop)
        finally:
            runner.stop(name, quiet=True)
    wo = out["without"]
    assert isinstance(wo, dict)
    for label in ("with", "with-no-writes"):
        w = out[label]
        assert isinstance(w, dict)
        out[f"slowdown {label}"] = {k: round(w[k] / wo[k], 3) for k in ("cpu_loop_s", "exec_loop_s")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
