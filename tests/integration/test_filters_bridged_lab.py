"""Filters against a real guest whose tap is a bridge port (the libvirt virbr0 / provider br0 case).

One server-h2 lab guest (the old nginx: HTTP/1.1 on 80, h2c on 8080) on a tap enslaved to a bridge in a host
namespace, a client namespace on the same bridge. Ground truth: the guest's nginx answering (or not) real
clients, the rapid-reset pattern from the `h2` library, the running nginx version from a real scan, and
`nft -j list ruleset` of the host namespace before/after.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nephoscope.lab import netns, runner
from nephoscope.lab.build import build_image
from nephoscope.lab.profile import load_profile
from nephoscope.response import engine, nft
from nephoscope.service import filters
from nephoscope.service.scan import run_scan
from nephoscope.service.targets import resolve_target
from nephoscope.store.sqlite import Store

pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("haproxy"),
                                 reason="needs root, nft and haproxy (scripts/setup.sh)")]
POLICY = """schema = 1
[[mitigation]]
id = "t-nginx-rate"
cve = "CVE-2000-0010"
package = "nginx"
fixed = "99"
kind = "nft-rate"
ports = [80]
params = { new_per_second = 1, burst = 2 }
does = "limits new connections to the guest's port 80 per source"
does_not_stop = "a flood spread over many sources"
source = "nephoscope test"

[[mitigation]]
id = "t-nginx-conn"
cve = "CVE-2000-0011"
package = "nginx"
fixed = "99"
kind = "nft-connlimit"
ports = [80]
params = { max_per_source = 2 }
does = "caps concurrent connections per source on port 80"
does_not_stop = "a flood spread over many sources"
source = "nephoscope test"
"""


@pytest.fixture(scope="module")
def bridged_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[runner.Guest, netns.NetLab, Store,
                                                                               Path]]:
    run = tmp_path_factory.mktemp("bridged-run")
    old = os.environ.get("NEPHOSCOPE_RUN")
    os.environ["NEPHOSCOPE_RUN"] = str(run)
    image = build_image(load_profile("server-h2"))
    net = netns.create(f"brgl{os.getpid() % 1000}", bridged=True)
    name = f"bridged-h2-{os.getpid() % 100000}"
    store = Store(run / "store.sqlite")
    policy = run / "policy.toml"
    policy.write_text(POLICY)
    try:
        guest = runner.start(name, image, tap=net.tap, netns=net.host_ns)
        runner.set_address(guest, f"{netns.GUEST_IP}/24", netns.HOST_TAP_IP)
        yield guest, net, store, policy
    finally:
        runner.stop(name, quiet=True)
        netns.destroy(net)
        store.close()
        if old is None:
            os.environ.pop("NEPHOSCOPE_RUN", None)
        else:
            os.environ["NEPHOSCOPE_RUN"] = old


def _ruleset(net: netns.NetLab) -> list[dict[str, Any]]:
    return nft.comparable_ruleset(net.host_ns)


def test_rapid_reset_filter_through_the_bridge_on_a_real_nginx(bridged_guest) -> None:
    guest, net, store, _policy = bridged_guest
    attack = netns.run_in(net.client_ns, "rapid_reset", netns.GUEST_IP, 8080, 500)
    assert attack["cut_off"] is False and attack["final_status"] == 200  # the old nginx takes the whole burst
    before = _ruleset(net)
    run_scan(resolve_target(guest.name), ["agent"], store=store)
    vmnet = filters.vm_net(guest.name)
    assert vmnet.bridge == net.bridge and vmnet.guest_ip == netns.GUEST_IP
    plan = filters.plan_vm(guest.name, None, store, vmnet)
    assert [p.mitigation.id for p in plan.filters] == ["nginx-h2-rapid-reset"], plan.skipped
    changes = filters.apply_vm(guest.name, vmnet, store=store)
    assert [(c.action, c.mitigation) for c in changes] == [("applied", "nginx-h2-rapid-reset")]
    cut = netns.run_in(net.client_ns, "rapid_reset", netns.GUEST_IP, 8080, 500)
    assert cut["cut_off"] is True and cut["streams_sent"] < 500
    assert netns.run_in(net.routed_client_ns, "rapid_reset", netns.GUEST_IP, 8080, 500)["cut_off"] is True
    for what, port in (("h2_get", 8080), ("http1_get", 8080), ("http1_get", 80)):
        assert netns.run_in(net.client_ns, what, netns.GUEST_IP, port, "/", 20.0)["status"] == 200, (what, port)
    filters.remove_vm(guest.name, store=store)
    assert _ruleset(net) == before
    assert netns.run_in(net.client_ns, "rapid_reset", netns.GUEST_IP, 8080, 500)["cut_off"] is False


def test_rate_filter_on_a_real_guest_behind_a_bridge(bridged_guest) -> None:
    guest, net, store, policy = bridged_guest
    status = netns.run_in(net.client_ns, "http1_get", netns.GUEST_IP, 80, "/", 20.0)
    assert status["status"] == 200, status  # switched by the bridge to the guest's own nginx
    assert netns.run_in(net.client_ns, "connects", netns.GUEST_IP, 80, 10, 2.0)["connected"] == 10
    before = _ruleset(net)

    run_scan(resolve_target(guest.name), ["agent"], store=store)
    vmnet = filters.vm_net(guest.name)  # from the lab guest's run state; bridged asked of the kernel
    assert (vmnet.tap, vmnet.bridge, vmnet.netns) == (net.tap, net.bridge, net.host_ns)
    plan = filters.plan_vm(guest.name, [policy], store, vmnet)
    assert [p.mitigation.id for p in plan.filters if p.mitigation.id.startswith("t-")] == (
        ["t-nginx-conn", "t-nginx-rate"] if nft.bridge_caps(net.host_ns).conntrack else ["t-nginx-rate"])
    if not nft.bridge_caps(net.host_ns).conntrack:
        why = {s["mitigation"]: s["why"] for s in plan.skipped}
        assert "conntrack" in why["t-nginx-conn"]
    assert plan.filters[-1].version == guest.manifest()["packages"]["nginx"]

    changes = filters.apply_vm(guest.name, vmnet, only=["t-nginx-rate"], policy_paths=[policy], store=store)
    assert [(c.action, c.mitigation) for c in changes] == [("applied", "t-nginx-rate")]
    assert any(i["table"]["family"] == "bridge" for i in nft.list_json(net.host_ns)["nftables"] if "table" in i)
    burst = netns.run_in(net.client_ns, "connects", netns.GUEST_IP, 80, 10, 0.3)["connected"]
    assert 2 <= burst < 10  # the burst reaches the guest, then new connections are dropped at its port
    routed = netns.run_in(net.routed_client_ns, "connects", netns.GUEST_IP, 80, 10, 0.3)["connected"]
    assert 2 <= routed < 10  # the same for a client the host routes into the bridge (bridge output hook)
    filters.remove_vm(guest.name, store=store)
    assert _ruleset(net) == before
    assert netns.run_in(net.client_ns, "connects", netns.GUEST_IP, 80, 10, 2.0)["connected"] == 10

    filters.apply_vm(guest.name, vmnet, only=["t-nginx-rate"], policy_paths=[policy], store=store)
    runner.stop(guest.name, quiet=True)
    netns.ip("-n", net.host_ns, "link", "del", net.tap)  # the VM is gone: its bridge port with it
    assert [c.action for c in filters.gc(store=store)] == ["collected"]
    assert _ruleset(net) == before and engine.active(store) == []
