"""Benchmark reading every Python stack of a guest from the host against `py-spy dump` inside it.

Same run, same processes: nephoscope reads all CPython stacks of the guest (kernel model already open;
the VM paused for the read, as the `scripts` command does), then `py-spy dump --pid N` runs inside the
guest through the guest agent for each of those processes (the baseline: what an in-guest tool costs,
agent round trip included, and the agent-only round trip of `/bin/true` is printed to separate the two).
Prints each side's time and the ratio, and whether both saw the same stacks (function names).

Usage: .venv/bin/python bench/interpreters.py GUEST [--repeat 3]   (an `interp` lab guest: lab up NAME -p interp)
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

from nephoscope.hypervisor.control import paused
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.hypervisor.qmp import Qmp
from nephoscope.introspect.interp import read_interpreters
from nephoscope.introspect.kernel import open_kernel
from nephoscope.service.targets import resolve_target

FRAME = re.compile(r"^\s+(\S+) \(")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("guest")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    vm = resolve_target(args.guest)
    host_s, spy_s, agent_s = [], [], []
    same = True
    with open_kernel(vm) as k, Qmp(vm.qmp_socket) as qmp, GuestAgent(vm.qga_socket, timeout=120) as agent:
        for _ in range(args.repeat):
            with paused(qmp):
                k.kernel.flush()
                t = time.perf_counter()
                results = [r for r in read_interpreters(k, kinds=("python",)) if r.threads]
                host_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            outputs = {r.pid: agent.exec(["/usr/local/bin/py-spy", "dump", "--pid", str(r.pid)], timeout=120)[1]
                       for r in results}
            spy_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            for _r in results:
                agent.exec(["/bin/true"], timeout=60)
            agent_s.append(time.perf_counter() - t)
            for r in results:
                ours = sorted(f.function.rsplit(".", 1)[-1] for th in r.threads for f in th.frames)
                theirs = sorted(m.group(1) for line in outputs[r.pid].decode().splitlines()
                                if (m := FRAME.match(line)))
                same = same and ours == theirs
    frames = sum(len(th.frames) for r in results for th in r.threads)
    host, spy, agent_only = statistics.median(host_s), statistics.median(spy_s), statistics.median(agent_s)
    print(f"python processes: {len(results)}, threads: {sum(len(r.threads) for r in results)}, frames: {frames}")
    print(f"host (nephoscope, VM paused):  {host * 1000:8.1f} ms  (median of {args.repeat})")
    print(f"guest (py-spy dump via agent): {spy * 1000:8.1f} ms  (agent round trips alone: {agent_only * 1000:.1f} ms)")
    print(f"ratio py-spy / nephoscope: {spy / host:.1f}x; same stacks: {same}")


if __name__ == "__main__":
    main()
