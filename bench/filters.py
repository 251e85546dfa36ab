"""Benchmark the filters: from a scan result to the filter in force, and the filtered path against the open one.

Runs on a routed namespace network (lab/netns.py, `kind="veth"`): a stand-in VM namespace behind a veth
named like a tap (haproxy serving HTTP/1.1 on 80 and h2c on 8080, python http.server with a bulk file on
8081), a client namespace, and the host namespace between them where the filters go. Same run, same
network: each path is measured open, then filtered, so the difference is what the filter adds.

- scan -> in force: a scan of a VM running a vulnerable nginx is stored; time until `apply` returned
  (plan from the stored scan + haproxy start + one nft transaction + the audit commit), for the haproxy kind
  (CVE-2023-44487 on 8080 and a bulk port 8081) and the nftables kind (connlimit + rate on 80 and 8081).
- latency: sequential requests, each on a new connection (h1 on 80 for nft, h2 on 8080 for haproxy).
- throughput: sequential requests on one keep-alive connection (req/s), and HTTP/1.1 bulk downloads (MB/s).
Open and filtered rounds alternate `--repeat` times; medians over all samples (client sockets TCP_NODELAY).

`--bridged` runs the same on the bridged lab network (the stand-in VM's veth and the client's are ports of
one bridge): the nft filters are then a `bridge` table, and the nftables kind is `nft-rate` (connlimit needs
conntrack in the bridge, which not every kernel has); the haproxy kind hands the port's frames up first.

Usage (root; needs nft, haproxy, iproute2): .venv/bin/python bench/filters.py [--requests 200] [--repeat 5]
  [--mib 16] [--bridged] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nephoscope.core.payloads import Package, Process, Socket
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.lab import netns
from nephoscope.response import engine
from nephoscope.response.nft import VmNet, find_bridge
from nephoscope.response.policy import Mitigation, load_policy
from nephoscope.store.sqlite import Store

VM = "bench-filters"
NGINX = "1.22.1-9+deb12u9"
BULK_PORT = 8081


def _scan_observations() -> list[Observation]:
    def obs(kind: str, key: str, payload: Any, method: str = "agent") -> Observation:
        return Observation(kind, key, payload, Provenance(method, VM), Verdict.REPORTED)

    out = [obs("package", "nginx", Package("nginx", NGINX, "nginx")),
           obs("process", "42", Process(42, comm="nginx", exe="/usr/sbin/nginx"))]
    out += [obs("socket", f"s{p}", Socket("tcp", "inet", "stream", "LISTEN", "0.0.0.0", p, owners=(42,)), "inspect")
            for p in (80, 8080, BULK_PORT)]
    return out


def _policies(bridged: bool = False) -> dict[str, dict[str, Mitigation]]:
    builtin = load_policy()["nginx-h2-rapid-reset"]
    bulk = Mitigation("bench-h2-bulk", builtin.cve, "nginx", builtin.fixed, "haproxy-h2", (BULK_PORT,),
                      {**builtin.params, "upstream": "h1"}, builtin.does, builtin.does_not_stop, "bench",
                      builtin.introduced)
    limits = Mitigation("bench-nft", "CVE-2024-6387", "nginx", builtin.fixed, "nft-connlimit", (80, BULK_PORT),
                        {"max_per_source": 10000, "new_per_minute": 1000000}, "connlimit + rate, never reached",
                        "bench: limits set so that nothing is dropped", "bench", builtin.introduced)
    if bridged:
        limits = Mitigation("bench-nft", "CVE-2024-6387", "nginx", builtin.fixed, "nft-rate", (80, BULK_PORT),
                            {"new_per_second": 1000000, "burst": 1000000}, "rate, never reached",
                            "bench: limits set so that nothing is dropped", "bench", builtin.introduced)
    return {"haproxy": {builtin.id: builtin, bulk.id: bulk}, "nftables": {limits.id: limits}}


def _stats(seconds: list[float]) -> dict[str, float]:
    s = sorted(seconds)
    p95 = s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]  # nearest rank
    return {"median_ms": round(statistics.median(s) * 1000, 3), "p95_ms": round(p95 * 1000, 3), "n": len(s)}


def _measure(net: netns.NetLab, kind: str, requests: int, into: dict[str, list[float]]) -> None:
    """Add one round of latency, keep-alive and bulk samples of the current path to `into`."""
    what, port = ("h1", 80) if kind == "nftables" else ("h2", 8080)
    c = net.client_ns
    into["latency"] += netns.run_in(c, "timed", what, netns.GUEST_IP, port, requests, timeout=600)["seconds"]
    ka = netns.run_in(c, "keepalive", what, netns.GUEST_IP, port, requests, timeout=600)
    bulk = netns.run_in(c, "download", netns.GUEST_IP, BULK_PORT, "/bulk.bin", 1, timeout=600)["runs"]
    assert ka["requests"] == requests and bulk[0]["bytes"] > 0, (ka, bulk)
    into["keepalive_rps"].append(ka["requests"] / ka["seconds"])
    into["bulk_mb_s"].append(bulk[0]["bytes"] / bulk[0]["seconds"] / 1e6)


def _summary(kind: str, samples: dict[str, list[float]]) -> dict[str, Any]:
    what, port = ("h1", 80) if kind == "nftables" else ("h2", 8080)
    return {"latency": {"protocol": what, "port": port, **_stats(samples["latency"])},
            "keepalive_rps": round(statistics.median(samples["keepalive_rps"]), 1),
            "bulk_mb_s": round(statistics.median(samples["bulk_mb_s"]), 1)}


def run(requests: int, repeat: int, mib: int, bridged: bool = False) -> dict[str, Any]:
    """Build the network, measure every kind, tear everything down; return the numbers."""
    tmp = Path(tempfile.mkdtemp(prefix="nph-bench-filters-"))
    os.environ["NEPHOSCOPE_RUN"] = str(tmp / "run")
    (tmp / "www").mkdir()
    (tmp / "www" / "bulk.bin").write_bytes(os.urandom(mib << 20))
    store = Store(tmp / "store.sqlite")
    owner = {"/usr/sbin/nginx": "nginx"}.get
    out: dict[str, Any] = {"requests": requests, "repeat": repeat, "bulk_mib": mib, "bridged": bridged, "kinds": {}}
    with netns.lab_network(f"nphb{os.getpid() % 1000}", "veth", bridged) as net, netns.origin_server(net, tmp):
        bulk = subprocess.Popen(["ip", "netns", "exec", net.vm_ns, sys.executable, "-m", "http.server",
                                 str(BULK_PORT), "--bind", netns.GUEST_IP, "--directory", str(tmp / "www")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(60):  # http.server looks its own name up first: slow where DNS is unreachable
                if netns.run_in(net.client_ns, "connects", netns.GUEST_IP, BULK_PORT, 1, 0.5)["connected"]:
                    break
                time.sleep(0.5)
            vmnet = VmNet(net.tap, netns.GUEST_IP, net.host_ns, find_bridge(net.tap, net.host_ns) or "")
            assert vmnet.bridge == net.bridge, (vmnet, net)
            for kind, policy in _policies(bridged).items():
                to_force, plan_ms = [], []
                for _ in range(repeat):
                    scan_id = store.save_scan(VM, ["agent", "inspect"], _scan_observations(), [], {"status": "ok"},
                                              time.time())
                    t0 = time.perf_counter()
                    plan = engine.plan_latest(store, VM, policy, owner)
                    t1 = time.perf_counter()
                    changes = engine.apply(store, VM, vmnet, plan, who="bench")
                    t2 = time.perf_counter()
                    assert plan.scan_id == scan_id and len(changes) == len(policy), (plan.to_dict(), changes)
                    to_force.append(t2 - t0)
                    plan_ms.append(t1 - t0)
                    engine.remove(store, VM, who="bench")
                raw: dict[str, dict[str, list[float]]] = {
                    side: {"latency": [], "keepalive_rps": [], "bulk_mb_s": []} for side in ("open", "filtered")}
                for _ in range(repeat):  # alternate, so warm-up and load drift hit both paths alike
                    _measure(net, kind, requests, raw["open"])
                    engine.apply(store, VM, vmnet, engine.plan_latest(store, VM, policy, owner), who="bench")
                    _measure(net, kind, requests, raw["filtered"])
                    engine.remove(store, VM, who="bench")
                open_path, filtered = _summary(kind, raw["open"]), _summary(kind, raw["filtered"])
                out["kinds"][kind] = {
                    "scan_to_force": {**_stats(to_force), "plan_median_ms": _stats(plan_ms)["median_ms"]},
                    "open": open_path, "filtered": filtered,
                    "added_latency_ms": round(filtered["latency"]["median_ms"] - open_path["latency"]["median_ms"], 3),
                    "keepalive_ratio": round(filtered["keepalive_rps"] / open_path["keepalive_rps"], 3),
                    "bulk_ratio": round(filtered["bulk_mb_s"] / open_path["bulk_mb_s"], 3)}
        finally:
            bulk.terminate()
            bulk.wait(10)
            engine.gc(store)
    store.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per latency / keep-alive measurement")
    ap.add_argument("--repeat", type=int, default=5, help="applies timed, and open/filtered rounds")
    ap.add_argument("--mib", type=int, default=16, help="bulk file size in MiB")
    ap.add_argument("--bridged", action="store_true", help="the tap is a bridge port (bridge-family filters)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/filters.py needs root (network namespaces, nft)", file=sys.stderr)
        return 2
    res = run(args.requests, args.repeat, args.mib, args.bridged)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    for kind, r in res["kinds"].items():
        s = r["scan_to_force"]
        print(f"{kind}: scan result -> in force median {s['median_ms']} ms (p95 {s['p95_ms']}, plan "
              f"{s['plan_median_ms']} ms), n={s['n']}")
        for name in ("open", "filtered"):
            m = r[name]
            print(f"  {name:8s} latency {m['latency']['protocol']}:{m['latency']['port']} median "
                  f"{m['latency']['median_ms']} ms p95 {m['latency']['p95_ms']} ms; keep-alive {m['keepalive_rps']} "
                  f"req/s; bulk {m['bulk_mb_s']} MB/s")
        print(f"  added latency {r['added_latency_ms']} ms; keep-alive x{r['keepalive_ratio']}; "
              f"bulk x{r['bulk_ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
