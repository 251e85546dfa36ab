"""Benchmark `net`: list every socket of a guest from the host vs the guest's own tools through the agent.

Host side: open the kernel model from RAM (the validated model cache, as a second command would) and walk
both kernel views of the sockets (process file tables, TCP/UDP/raw hash tables), without code
identification. Guest side, same run: `ss -tanup` if the guest has it, else busybox `netstat -tuwxan` (it
cannot show pids), else `cat /proc/net/*`, run through the guest agent (what an operator without
nephoscope would do). Prints the median of each and the ratio guest / host.

Usage: .venv/bin/python bench/net.py --guest NAME [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from nephoscope.hypervisor.qga import open_agent
from nephoscope.introspect.kernel import open_kernel
from nephoscope.introspect.net import sockets_of
from nephoscope.os.linux.net import net_view
from nephoscope.service.targets import resolve_target

GUEST_TOOL = ("command -v ss >/dev/null && exec ss -tanup; command -v netstat >/dev/null && exec netstat -tuwxan; "
              "cat /proc/net/tcp /proc/net/tcp6 /proc/net/udp /proc/net/udp6 /proc/net/raw /proc/net/unix")


def main() -> None:
    """Run the benchmark and print the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guest", required=True, help="a running lab guest (or any VM nephoscope can name)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    vm = resolve_target(args.guest)
    sockets_of(vm)  # warm: the model cache and the page cache, as for any second command
    host: list[float] = []
    guest: list[float] = []
    count = lines = 0
    with open_agent(vm, timeout=120) as agent:
        code, out, _err = agent.exec(["/bin/sh", "-c", "command -v ss || command -v netstat || echo cat"])
        tool = out.decode().strip().rsplit("/", 1)[-1] or "cat"
        for _ in range(args.repeat):
            t = time.perf_counter()
            count = len(sockets_of(vm))
            host.append(time.perf_counter() - t)
            t = time.perf_counter()
            code, out, _err = agent.exec(["/bin/sh", "-c", GUEST_TOOL], timeout=120)
            guest.append(time.perf_counter() - t)
            lines = len(out.splitlines())
    walk: list[float] = []
    with open_kernel(vm, cache=True) as k:
        for _ in range(args.repeat):
            k.budget.reset()
            k.kernel.flush()
            t = time.perf_counter()
            net_view(k)
            walk.append(time.perf_counter() - t)
    h, g, w = statistics.median(host), statistics.median(guest), statistics.median(walk)
    print(f"host  (open the model from RAM + both kernel views): {h * 1000:8.1f} ms  {count} sockets")
    print(f"host  (both kernel views, model already open):       {w * 1000:8.1f} ms")
    print(f"guest ({tool} through the agent, exit {code}): {g * 1000:8.1f} ms  {lines} lines")
    print(f"ratio guest/host: {g / h:.2f}x (whole command), {g / w:.2f}x (walk only)  (median of {args.repeat})")


if __name__ == "__main__":
    main()
