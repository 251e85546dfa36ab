"""A `filters apply` killed mid-transaction, in a child process (shared by the routed and bridged filter tests).

The child applies one filter and hangs either before the nft transaction (`before-nft`) or after it, before
the store commit (`after-nft`), printing "ready" when it got there; the test then signals it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from nephoscope.response.nft import VmNet

CHILD = r"""
import sys, time
from pathlib import Path
from nephoscope.response import engine, nft
from nephoscope.response.engine import FilterPlan, PlannedFilter
from nephoscope.response.nft import VmNet
from nephoscope.response.policy import Mitigation, load_policy
from nephoscope.store.sqlite import Store

where, db, tap, ip, ns, bridge, vm, kind, version = sys.argv[1:10]

def hang(*args, **kwargs):
    print("ready", flush=True)
    time.sleep(600)

if where == "before-nft":
    nft.apply_table = hang
else:  # after the nft transaction, before the store commit
    engine._record = hang
if kind == "nft-close":
    m = Mitigation("t-close", "CVE-2000-0001", "nginx", "2", "nft-close", (80,), {}, "closes port 80", "others", "t")
else:
    m = load_policy()[kind]
plan = FilterPlan(vm, 1, [PlannedFilter(m, version, m.ports, {"scan_id": 1})])
engine.apply(Store(Path(db)), vm, VmNet(tap, ip, ns, bridge), plan, who="child")
"""


@contextmanager
def killed_apply(db: str, vm: str, net: VmNet, where: str, sig: str, mitigation: str,
                 version: str = "1") -> Iterator[subprocess.Popen[str]]:
    """Start the child applying `mitigation` (a policy id, or "nft-close"), yield once it hangs at `where`,
    then send it SIG`sig` and reap it (killing it if it outlives the signal)."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, where, db, net.tap, net.guest_ip, net.netns, net.bridge,
                              vm, mitigation, version], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready", child.stderr
        yield child
        child.send_signal(getattr(signal, f"SIG{sig}"))
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
