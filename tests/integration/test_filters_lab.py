"""Filters against a real guest: the old nginx with HTTP/2 (server-h2) on a tap in a network namespace.

Ground truth: the guest's own nginx answering (or not) real HTTP/1.1 and HTTP/2 clients in a client
namespace, the rapid-reset pattern (CVE-2023-44487) from the `h2` library, the image's dpkg versions in the
manifest, and the host namespace's `nft -j list ruleset` before and after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.lab import netns, runner
from nephoscope.lab.build import build_image
from nephoscope.lab.profile import load_profile
from nephoscope.response import engine, haproxy, nft
from nephoscope.response.policy import load_policy
from nephoscope.service import filters
from nephoscope.service.scan import run_scan
from nephoscope.service.targets import resolve_target
from nephoscope.store.sqlite import Store

pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("haproxy"),
                                 reason="needs root, nft and haproxy (scripts/setup.sh)")]
MITIGATION = "nginx-h2-rapid-reset"
STREAMS = 500  # below nginx's keepalive_requests (1000): without a filter the whole burst is served


@pytest.fixture(scope="module")
def h2_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[runner.Guest, netns.NetLab, Store]]:
    """Boot server-h2 on a tap in its own namespaces, with a static address set through its agent."""
    run = tmp_path_factory.mktemp("filters-run")
    old = os.environ.get("NEPHOSCOPE_RUN")
    os.environ["NEPHOSCOPE_RUN"] = str(run)  # the guest's and the filters' state: this module's only
    image = build_image(load_profile("server-h2"))
    net = netns.create(f"nphl{os.getpid() % 1000}")
    name = f"filters-h2-{os.getpid() % 100000}"
    store = Store(run / "store.sqlite")
    try:
        guest = runner.start(name, image, tap=net.tap, netns=net.host_ns)
        runner.set_address(guest, f"{netns.GUEST_IP}/24", netns.HOST_TAP_IP)
        yield guest, net, store
    finally:
        runner.stop(name, quiet=True)
        for _vm, d, _n in haproxy.iter_tracked():
            haproxy.stop_dir(d)
        netns.destroy(net)
        store.close()
        if old is None:
            os.environ.pop("NEPHOSCOPE_RUN", None)
        else:
            os.environ["NEPHOSCOPE_RUN"] = old


def _ruleset(net: netns.NetLab) -> list[dict[str, Any]]:
    return nft.comparable_ruleset(net.host_ns)


def _status(net: netns.NetLab, what: str, port: int) -> int:
    return int(netns.run_in(net.client_ns, what, netns.GUEST_IP, port, "/", 20.0)["status"])


def _attack(net: netns.NetLab) -> dict[str, Any]:
    return dict(netns.run_in(net.client_ns, "rapid_reset", netns.GUEST_IP, 8080, STREAMS))


def _scan(guest: runner.Guest, store: Store) -> Any:
    return run_scan(resolve_target(guest.name), ["agent", "inspect"], store=store)


def _agent(guest: runner.Guest, *argv: str) -> None:
    with GuestAgent(guest.qga_socket, timeout=120) as agent:
        rc, _out, err = agent.exec(list(argv), timeout=120)
    assert rc == 0, err


def test_rapid_reset_filter_on_a_real_vulnerable_nginx(h2_guest) -> None:
    guest, net, store = h2_guest
    nginx = guest.manifest()["packages"]["nginx"]
    assert load_policy()[MITIGATION].covers(nginx), f"the lab's nginx {nginx} should be the vulnerable one"
    # the original path: HTTP/1.1 on 80, h2c on 8080, and the rapid-reset burst gets through
    assert _status(net, "http1_get", 80) == 200 and _status(net, "h2_get", 8080) == 200
    open_path = _attack(net)
    assert open_path["cut_off"] is False and open_path["streams_sent"] == STREAMS
    assert open_path["final_status"] == 200
    before = _ruleset(net)

    scan = _scan(guest, store)
    assert scan.filter_changes == []
    plan = engine.plan_latest(store, guest.name, load_policy(), filters.kb_owner())
    by_id = {p.mitigation.id: p for p in plan.filters}
    assert list(by_id) == [MITIGATION], (plan.to_dict(), plan.skipped)
    planned = by_id[MITIGATION]
    assert planned.version == nginx and planned.ports == (8080,)
    assert {p["comm"] for p in planned.evidence["processes"]} == {"nginx"}
    assert planned.evidence["scan_id"] == scan.scan_id

    vmnet = filters.vm_net(guest.name)
    assert (vmnet.tap, vmnet.netns, vmnet.guest_ip) == (net.tap, net.host_ns, netns.GUEST_IP)
    changes = filters.apply_vm(guest.name, vmnet, store=store)
    assert [(c.action, c.mitigation, c.version) for c in changes] == [("applied", MITIGATION, nginx)]
    filtered = _ruleset(net)
    assert filtered != before and nft.table_name(guest.name) in nft.live_tables(net.host_ns)
    cut = _attack(net)
    assert cut["cut_off"] is True and cut["streams_sent"] < STREAMS and cut["final_status"] is None
    assert _status(net, "h2_get", 8080) == 200      # ordinary HTTP/2 through haproxy to the guest's nginx
    assert _status(net, "http1_get", 8080) == 200   # HTTP/1.1 client, h2 upstream
    assert _status(net, "http1_get", 80) == 200     # the unfiltered port
    assert filters.apply_vm(guest.name, vmnet, store=store) == []  # idempotent
    assert _ruleset(net) == filtered

    removed = filters.remove_vm(guest.name, store=store)
    assert [c.action for c in removed] == ["removed"]
    assert _ruleset(net) == before and list(haproxy.iter_tracked()) == []
    assert _attack(net)["cut_off"] is False  # the original path is back

    # expiry through the scan path: the vulnerable code stops running
    filters.apply_vm(guest.name, vmnet, store=store)
    _agent(guest, "/bin/systemctl", "stop", "nginx.service")
    try:
        scan = _scan(guest, store)
        assert [(c.action, c.mitigation) for c in scan.filter_changes] == [("expired", MITIGATION)]
        assert "no longer executing" in scan.filter_changes[0].reason
        assert _ruleset(net) == before and engine.active(store, guest.name) == []
    finally:
        _agent(guest, "/bin/systemctl", "start", "nginx.service")

    # the VM disappears (its QEMU stopped, its tap deleted): gc takes its filters with it
    _scan(guest, store)
    filters.apply_vm(guest.name, vmnet, store=store)
    runner.stop(guest.name, quiet=True)
    subprocess.run(["ip", "-n", net.host_ns, "link", "del", net.tap], check=True, timeout=30)
    collected = filters.gc(store=store)
    assert [c.action for c in collected] == ["collected"]
    assert _ruleset(net) == before and list(haproxy.iter_tracked()) == []
    trail = [(r["action"], r["mitigation"]) for r in filters.audit(guest.name, store=store)]
    assert [a for a, _m in reversed(trail)] == ["applied", "removed", "applied", "expired", "applied", "collected"]
    assert all(r["who"] and r["reason"] and r["rules"] for r in filters.audit(guest.name, store=store))

