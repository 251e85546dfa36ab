"""Filters on a bridged tap: a bridge in a namespace, the client and a stand-in VM both ports of it.

    client ns (10.77.0.3) ──veth── [bridge in host ns] ──veth "tap"── stand-in VM ns (10.77.0.2)

Client → VM frames are switched by the bridge, never routed: the routed (inet) filters do nothing to them,
which the first test shows; the bridge-family table (`oifname TAP` in a bridge `forward` chain) cuts what
each kind should while the allowed traffic passes. Ground truth: real connections from the client
namespace, the kernel's own answer on what the bridge family supports (`nft -c`, and /proc/config.gz when
present), and `nft -j list ruleset` before and after.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from killed_apply import killed_apply

from nephoscope.lab import netns
from nephoscope.response import engine, haproxy, nft
from nephoscope.response.engine import FilterPlan, PlannedFilter
from nephoscope.response.nft import FilterError, VmNet
from nephoscope.response.policy import Mitigation, load_policy
from nephoscope.service import filters
from nephoscope.store.sqlite import Store

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("haproxy"),
                                reason="needs root, nft and haproxy (scripts/setup.sh)")
VM = "bridged-standin"
CLOSE = Mitigation("t-close", "CVE-2000-0001", "nginx", "2", "nft-close", (80,), {}, "closes port 80 here",
                   "everything on other ports", "test")
RATE = Mitigation("t-rate", "CVE-2000-0004", "nginx", "2", "nft-rate", (80,), {"new_per_second": 1, "burst": 2},
                  "one new connection per second per source", "many sources", "test")
CONN = Mitigation("t-conn", "CVE-2000-0003", "nginx", "2", "nft-connlimit", (80,), {"max_per_source": 2},
                  "two connections per source", "many sources", "test")


@pytest.fixture()
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[netns.NetLab, VmNet, Store]]:
    monkeypatch.setenv("NEPHOSCOPE_RUN", str(tmp_path / "run"))
    store = Store(tmp_path / "store.sqlite")
    with netns.lab_network(f"brgd{os.getpid() % 10000}", "veth", bridged=True) as net, \
            netns.origin_server(net, tmp_path):
        yield net, filters.vm_net(VM, net.tap, netns.GUEST_IP, net.host_ns), store
        for _vm, d, _n in haproxy.iter_tracked():
            haproxy.stop_dir(d)
    store.close()


def _ruleset(net: netns.NetLab) -> list[dict[str, Any]]:
    return nft.comparable_ruleset(net.host_ns)


def _plan(*mitigations: Mitigation, net: VmNet | None = None) -> FilterPlan:
    return FilterPlan(VM, 1, [PlannedFilter(m, "1.22.1-9+deb12u9", m.ports,
                                            {"scan_id": 1, "processes": [{"pid": 42, "comm": "nginx"}],
                                             "methods": ["agent"], "verdict": "reported", "ports_from": "test"})
                              for m in mitigations], net=net)


def _get(net: netns.NetLab, what: str, port: int, client: str = "") -> int:
    return int(netns.run_in(client or net.client_ns, what, netns.GUEST_IP, port, "/", 2.0)["status"])


def _kernel_config() -> dict[str, str]:
    try:
        text = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line[2:-11]] = "n"
    return out


def test_bridge_port_is_detected_and_the_kernel_says_what_works(lab) -> None:
    net, vmnet, _store = lab
    assert (vmnet.tap, vmnet.bridge, vmnet.netns, vmnet.family) == (net.tap, net.bridge, net.host_ns, "bridge")
    assert nft.find_bridge("hcli0", net.host_ns) == net.bridge  # the client's port too
    assert nft.find_bridge(net.bridge, net.host_ns) == ""       # the bridge itself is no port
    assert nft.find_bridge("nosuchdev0", net.host_ns) is None
    caps = nft.bridge_caps(net.host_ns)
    config = _kernel_config()  # ground truth when the kernel says how it was built (y: in, n: absent)
    for option, have in (("CONFIG_NFT_BRIDGE_REJECT", caps.reject), ("CONFIG_NF_CONNTRACK_BRIDGE", caps.conntrack)):
        if config.get(option) in ("y", "n"):
            assert have == (config[option] == "y"), option
    with netns.lab_network(f"brgr{os.getpid() % 10000}", "veth") as routed:
        assert filters.vm_net(VM, routed.tap, netns.GUEST_IP, routed.host_ns).bridge == ""


def test_routed_rules_do_nothing_on_a_bridge_port(lab) -> None:
    """Why the bridge family: an inet table matching `oifname TAP` never sees the switched frames."""
    net, vmnet, _store = lab
    before = _ruleset(net)
    routed = VmNet(vmnet.tap, vmnet.guest_ip, vmnet.netns)
    nft.apply_table(VM, routed, [nft.NftFilter("t-close", "CVE-2000-0001", "nft-close", (80,))])
    try:
        assert _get(net, "http1_get", 80) == 200  # the inet rule is there and cuts nothing
    finally:
        nft.apply_table(VM, routed, [])
    assert _ruleset(net) == before


def test_supported_kinds_cut_what_they_should_on_a_bridged_tap(lab) -> None:
    net, vmnet, store = lab
    before = _ruleset(net)
    assert _get(net, "http1_get", 80) == 200 and _get(net, "h2_get", 8080) == 200
    assert netns.run_in(net.client_ns, "connects", netns.GUEST_IP, 80, 10)["connected"] == 10

    changes = engine.apply(store, VM, vmnet, _plan(CLOSE, net=vmnet), who="test")
    assert [c.action for c in changes] == ["applied"] and "oifname" in changes[0].rules_summary[0]
    assert nft.table_name(VM) in nft.live_tables(net.host_ns)
    families = {i["table"]["family"] for i in nft.list_json(net.host_ns)["nftables"] if "table" in i
                and i["table"]["name"] == nft.table_name(VM)}
    assert families == {"bridge"}
    assert _get(net, "http1_get", 80) == 0 and _get(net, "h2_get", 8080) == 200  # 80 cut, 8080 passes
    assert _get(net, "http1_get", 80, net.routed_client_ns) == 0  # routed into the bridge: the output hook
    assert _get(net, "h2_get", 8080, net.routed_client_ns) == 200
    host = subprocess.run(["ip", "netns", "exec", net.host_ns, sys.executable, "-m", "nephoscope.lab.h2client",
                           "http1_get", f'["{netns.GUEST_IP}", 80, "/", 2.0]'], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert '"status": 200' in host.stdout, host  # the host's own connections to the VM are not filtered
    closed = _ruleset(net)
    assert engine.apply(store, VM, vmnet, _plan(CLOSE, net=vmnet), who="test") == []  # idempotent
    assert _ruleset(net) == closed
    engine.remove(store, VM, who="test")
    assert _ruleset(net) == before and _get(net, "http1_get", 80) == 200

    allow = Mitigation("t-allow", "CVE-2000-0002", "nginx", "2", "nft-allow", (8080,),
                       {"allow": [f"{net.client_ip}/32"]}, "only the client may reach 8080", "spoofing", "test")
    engine.apply(store, VM, vmnet, _plan(allow), who="test")
    assert _get(net, "h2_get", 8080) == 200  # the allowed source passes
    assert _get(net, "h2_get", 8080, net.routed_client_ns) == 0  # 10.78.0.2 is not on the list
    deny = Mitigation("t-allow", "CVE-2000-0002", "nginx", "2", "nft-allow", (8080,), {"allow": ["192.0.2.0/24"]},
                      "only 192.0.2.0/24 may reach 8080", "spoofing", "test")
    engine.apply(store, VM, vmnet, _plan(deny), who="test")  # same id, new rule: one transaction
    assert _get(net, "h2_get", 8080) == 0 and _get(net, "http1_get", 80) == 200
    engine.remove(store, VM, who="test")

    engine.apply(store, VM, vmnet, _plan(RATE), who="test")
    burst = netns.run_in(net.client_ns, "connects", netns.GUEST_IP, 80, 10)["connected"]
    assert 2 <= burst < 10  # the burst gets through, then new connections are dropped
    assert _get(net, "h2_get", 8080) == 200  # other ports untouched
    engine.remove(store, VM, who="test")
    assert _ruleset(net) == before
    trail = [(r["action"], r["mitigation"]) for r in engine.audit_log(store, VM)]
    assert trail[0] == ("removed", "t-rate") and trail[-1] == ("applied", "t-close")


def test_connlimit_needs_conntrack_in_the_bridge(lab) -> None:
    net, vmnet, store = lab
    caps = nft.bridge_caps(net.host_ns)
    why = nft.refusal("nft-connlimit", vmnet)
    before = _ruleset(net)
    if caps.conntrack:
        assert why is None
        engine.apply(store, VM, vmnet, _plan(CONN), who="test")
        held = netns.run_in(net.client_ns, "hold", netns.GUEST_IP, 80, 4)["answered"]
        assert held[:2] == [True, True] and not any(held[2:])
        engine.remove(store, VM, who="test")
    else:
        assert why is not None and "conntrack" in why
        planned = engine.plan(VM, [], ["agent"], {}, net=vmnet)
        assert planned.net == vmnet
        with pytest.raises(FilterError, match="conntrack"):  # never a rule that would do nothing
            engine.apply(store, VM, vmnet, _plan(CONN), who="test")
        assert engine.active(store) == [] and engine.audit_log(store) == []
    assert _ruleset(net) == before and list(haproxy.iter_tracked()) == []


@pytest.mark.parametrize("br_netfilter", ["0", "1"])
def test_haproxy_h2_filter_on_a_bridged_tap(lab, br_netfilter: str) -> None:
    """The rapid-reset filter through the bridge: frames for the port go up to the host, then to haproxy."""
    net, vmnet, store = lab
    subprocess.run(["ip", "netns", "exec", net.host_ns, "sysctl", "-qw",
                    f"net.bridge.bridge-nf-call-iptables={br_netfilter}"], check=True, capture_output=True, timeout=30)
    m = load_policy()["nginx-h2-rapid-reset"]
    assert nft.refusal(m.kind, vmnet) is None  # the host has 10.77.0.1/24 on the bridge
    assert nft.refusal(m.kind, VmNet(vmnet.tap, "192.0.2.9", vmnet.netns, vmnet.bridge)) is not None
    before = _ruleset(net)
    assert netns.run_in(net.client_ns, "rapid_reset", netns.GUEST_IP, 8080, 500)["cut_off"] is False
    changes = engine.apply(store, VM, vmnet, _plan(m, net=vmnet), who="test")
    assert [c.action for c in changes] == ["applied"]
    assert any("meta pkttype set host" in r for r in changes[0].rules_summary)
    assert any("redirect to :" in r for r in changes[0].rules_summary)
    attack = netns.run_in(net.client_ns, "rapid_reset", netns.GUEST_IP, 8080, 500)
    assert attack["cut_off"] is True and attack["streams_sent"] < 500
    assert _get(net, "h2_get", 8080) == 200 and _get(net, "http1_get", 8080) == 200  # through haproxy
    assert _get(net, "http1_get", 80) == 200  # another port: switched to the VM as before
    routed = netns.run_in(net.routed_client_ns, "rapid_reset", netns.GUEST_IP, 8080, 500)
    assert routed["cut_off"] is True  # routed into the bridge: the inet redirect takes it at the host's ingress
    assert _get(net, "h2_get", 8080, net.routed_client_ns) == 200
    filtered = _ruleset(net)
    assert engine.apply(store, VM, vmnet, _plan(m, net=vmnet), who="test") == []  # idempotent
    assert _ruleset(net) == filtered
    engine.remove(store, VM, who="test")
    assert _ruleset(net) == before and list(haproxy.iter_tracked()) == []
    assert netns.run_in(net.client_ns, "rapid_reset", netns.GUEST_IP, 8080, 500)["cut_off"] is False
    engine.apply(store, VM, vmnet, _plan(m, net=vmnet), who="test")
    netns.ip("-n", net.host_ns, "link", "del", net.tap)  # the VM goes: its tap (whose MAC the rule used) with it
    collected = engine.gc(store)
    assert [c.action for c in collected] == ["collected"] and any("redirect" in r for r in collected[0].rules_summary)
    assert _ruleset(net) == before and list(haproxy.iter_tracked()) == [] and engine.active(store) == []


def test_gc_takes_a_gone_bridged_vm_s_table(lab) -> None:
    net, vmnet, store = lab
    before = _ruleset(net)
    engine.apply(store, VM, vmnet, _plan(CLOSE, RATE), who="test")
    netns.ip("-n", net.host_ns, "link", "del", net.tap)  # the VM is gone, its tap (bridge port) with it
    assert [c.action for c in engine.gc(store)] == ["collected", "collected"]
    assert engine.active(store) == [] and _ruleset(net) == before


@pytest.mark.parametrize(("where", "sig", "kind"), [
    ("before-nft", "KILL", "nft-close"), ("after-nft", "KILL", "nft-close"), ("after-nft", "TERM", "nft-close"),
    ("after-nft", "KILL", "haproxy-h2")])
def test_killed_bridged_apply_leaves_nothing_behind(lab, where: str, sig: str, kind: str) -> None:
    net, vmnet, store = lab
    before = _ruleset(net)
    with killed_apply(str(store.path), VM, vmnet, where, sig, kind if kind == "nft-close" else "nginx-h2-rapid-reset"):
        assert (nft.table_name(VM) in nft.live_tables(net.host_ns)) == (where == "after-nft")
        if kind == "haproxy-h2":  # both tables of the VM went in, in the one transaction
            assert {i["table"]["family"] for i in nft.list_json(net.host_ns)["nftables"] if "table" in i
                    and i["table"]["name"] == nft.table_name(VM)} == {"bridge", "inet"}
    if sig == "TERM":  # SIGTERM unwinds: the child put the previous (empty) table back itself
        assert _ruleset(net) == before
    assert engine.active(store) == [] and engine.audit_log(store) == []
    assert engine.gc(store) == []
    assert _ruleset(net) == before and list(haproxy.iter_tracked()) == []
