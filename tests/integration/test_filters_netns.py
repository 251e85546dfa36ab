"""Filters on a routed namespace network with a stand-in VM (real nft, real haproxy; no guest needed).

The VM is a namespace behind a veth named like a tap, serving HTTP/1.1 on 80 and h2c on 8080 (haproxy as
the origin); the client is another namespace. Checks what each filter kind does to real traffic, the
atomic/idempotent table, the audit trail, and that gc reaps what a killed apply left behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from killed_apply import killed_apply

from nephoscope.lab import netns
from nephoscope.response import engine, haproxy, nft
from nephoscope.response.engine import FilterPlan, PlannedFilter
from nephoscope.response.nft import VmNet
from nephoscope.response.policy import Mitigation, load_policy
from nephoscope.store.sqlite import Store

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("haproxy"),
                                reason="needs root, nft and haproxy (scripts/setup.sh)")
VM = "filters-standin"


@pytest.fixture()
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[netns.NetLab, VmNet, Store]]:
    monkeypatch.setenv("NEPHOSCOPE_RUN", str(tmp_path / "run"))
    store = Store(tmp_path / "store.sqlite")
    with netns.lab_network(f"nphf{os.getpid() % 10000}", "veth") as net, netns.origin_server(net, tmp_path):
        yield net, VmNet(net.tap, netns.GUEST_IP, net.host_ns), store
        for _vm, d, _n in haproxy.iter_tracked():
            haproxy.stop_dir(d)
    store.close()


def _ruleset(net: netns.NetLab) -> list[dict[str, Any]]:
    return nft.comparable_ruleset(net.host_ns)


def _haproxy_alive(pid: int) -> bool:
    try:
        return b"haproxy" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _plan(*mitigations: Mitigation, ports: tuple[int, ...] | None = None) -> FilterPlan:
    return FilterPlan(VM, 1, [PlannedFilter(m, "1.22.1-9+deb12u9", ports or m.ports,
                                            {"scan_id": 1, "processes": [{"pid": 42, "comm": "nginx"}],
                                             "methods": ["agent"], "verdict": "reported", "ports_from": "test"})
                              for m in mitigations])


def _get(net: netns.NetLab, what: str, port: int) -> int:
    return int(netns.run_in(net.client_ns, what, netns.GUEST_IP, port, "/", 5.0)["status"])


def test_haproxy_h2_filter_cuts_rapid_reset_keeps_ordinary_requests(lab) -> None:
    net, vmnet, store = lab
    policy = load_policy()
    before = _ruleset(net)
    assert netns.run_in(net.client_ns, "rapid_reset", netns.GUEST_IP, 8080, 500)["cut_off"] is False
    changes = engine.apply(store, VM, vmnet, _plan(policy["nginx-h2-rapid-reset"]), who="test")
    assert [c.action for c in changes] == ["applied"] and changes[0].cve == "CVE-2023-44487"
    assert any("redirect to :" in r for r in changes[0].rules_summary)
    assert nft.table_name(VM) in nft.live_tables(net.host_ns)
    attack = netns.run_in(net.client_ns, "rapid_reset", netns.GUEST_IP, 8080, 500)
    assert attack["cut_off"] is True and attack["streams_sent"] < 500
    assert _get(net, "h2_get", 8080) == 200 and _get(net, "http1_get", 8080) == 200  # through haproxy
    assert _get(net, "http1_get", 80) == 200  # another port: untouched
    filtered = _ruleset(net)
    assert engine.apply(store, VM, vmnet, _plan(policy["nginx-h2-rapid-reset"]), who="test") == []  # idempotent
    assert _ruleset(net) == filtered
    gone = engine.remove(store, VM, who="test")
    assert [c.action for c in gone] == ["removed"]
    assert _ruleset(net) == before
    assert list(haproxy.iter_tracked()) == []
    assert netns.run_in(net.client_ns, "rapid_reset", netns.GUEST_IP, 8080, 500)["cut_off"] is False
    actions = [(r["action"], r["who"], r["mitigation"]) for r in engine.audit_log(store, VM)]
    assert actions == [("removed", "test", "nginx-h2-rapid-reset"), ("applied", "test", "nginx-h2-rapid-reset")]
    assert engine.audit_log(store, VM)[1]["rules"] == list(changes[0].rules_summary)


def test_nft_kinds_on_real_traffic(lab) -> None:
    net, vmnet, store = lab
    close = Mitigation("t-close", "CVE-2000-0001", "nginx", "2", "nft-close", (80,), {}, "closes port 80 here",
                       "everything on other ports", "test")
    engine.apply(store, VM, vmnet, _plan(close), who="test")
    assert _get(net, "http1_get", 80) == 0 and _get(net, "h2_get", 8080) == 200
    allow = Mitigation("t-allow", "CVE-2000-0002", "nginx", "2", "nft-allow", (8080,),
                       {"allow": [f"{netns.CLIENT_IP}/32"]}, "only the client may reach 8080", "spoofing", "test")
    engine.apply(store, VM, vmnet, _plan(allow), who="test")  # added to the VM's table, the close stays
    assert {a.mitigation for a in engine.active(store, VM)} == {"t-close", "t-allow"}
    assert _get(net, "h2_get", 8080) == 200 and _get(net, "http1_get", 80) == 0
    engine.remove(store, VM, ["t-close"], who="test")
    assert _get(net, "http1_get", 80) == 200
    deny = Mitigation("t-allow", "CVE-2000-0002", "nginx", "2", "nft-allow", (8080,), {"allow": ["192.0.2.0/24"]},
                      "only 192.0.2.0/24 may reach 8080", "spoofing", "test")
    engine.apply(store, VM, vmnet, _plan(deny), who="test")  # same id, new rule: replaced in one transaction
    assert _get(net, "h2_get", 8080) == 0
    conn = Mitigation("t-conn", "CVE-2000-0003", "nginx", "2", "nft-connlimit", (80,), {"max_per_source": 1},
                      "one connection per source", "many sources", "test")
    engine.remove(store, VM, who="test")
    engine.apply(store, VM, vmnet, _plan(conn), who="test")
    assert _get(net, "http1_get", 80) == 200  # one connection at a time still works
    engine.remove(store, VM, who="test")
    assert nft.table_name(VM) not in nft.live_tables(net.host_ns)


def test_gc_reaps_what_a_killed_apply_left_and_a_gone_vm(lab, tmp_path: Path) -> None:
    net, vmnet, store = lab
    policy = load_policy()
    m = policy["nginx-h2-rapid-reset"]
    f = nft.NftFilter(m.id, m.cve, m.kind, m.ports, m.params, (haproxy.proxy_port(VM, 8080),))
    # killed after haproxy started, before the nft transaction / store commit: tracked but owned by nobody
    pid = haproxy.start(VM, vmnet, [f])
    haproxy.track("orphan-vm", vmnet)  # what an apply records before its nft transaction
    nft.apply_table("orphan-vm", vmnet, [nft.NftFilter("x", "CVE-2000-1", "nft-close", (80,))])
    assert engine.gc(store) == []
    assert not _haproxy_alive(pid) and not haproxy.vm_dir(VM).exists()
    assert nft.live_tables(net.host_ns) == set()
    engine.apply(store, VM, vmnet, _plan(m), who="test")
    netns.ip("-n", net.host_ns, "link", "del", net.tap)  # the VM is gone (its tap with it)
    changes = engine.gc(store)
    assert [c.action for c in changes] == ["collected"]
    assert engine.active(store) == [] and list(haproxy.iter_tracked()) == []
    assert nft.live_tables(net.host_ns) == set()


@pytest.mark.parametrize(("where", "sig"), [("before-nft", "KILL"), ("after-nft", "KILL"), ("after-nft", "TERM")])
def test_killed_apply_leaves_nothing_behind(lab, tmp_path: Path, where: str, sig: str) -> None:
    net, vmnet, store = lab
    before = _ruleset(net)
    with killed_apply(str(store.path), VM, vmnet, where, sig, "nginx-h2-rapid-reset", "1.22.1-9+deb12u9"):
        tracked = [d for _vm, d, _n in haproxy.iter_tracked()]
        pid = haproxy.find_pid(tracked[0]) if tracked else None
        assert pid is not None  # haproxy started first
        assert (nft.table_name(VM) in nft.live_tables(net.host_ns)) == (where == "after-nft")
    if sig == "TERM":  # SIGTERM unwinds: the child put the previous (empty) state back itself
        assert _ruleset(net) == before and not _haproxy_alive(pid)
    assert engine.active(store) == [] and engine.audit_log(store) == []
    assert engine.gc(store) == []
    assert _ruleset(net) == before and list(haproxy.iter_tracked()) == [] and not _haproxy_alive(pid)


def test_two_stores_on_one_host_never_collect_each_others_filters(lab, tmp_path: Path) -> None:
    """Each table carries its store's owner tag (read back from nft's own listing); gc takes only its own or
    untagged leftovers, never another store's table or haproxy."""
    net, vmnet, store = lab
    other = Store(tmp_path / "other.sqlite")
    try:
        before = _ruleset(net)
        close = Mitigation("t-close", "CVE-2000-0001", "nginx", "2", "nft-close", (80,), {}, "closes 80", "others", "t")
        engine.apply(store, VM, vmnet, _plan(close), who="test")
        theirs = FilterPlan("other-vm", 1, [PlannedFilter(close, "1", (81,), {"scan_id": 1})])
        engine.apply(other, "other-vm", VmNet(net.tap, netns.GUEST_IP, net.host_ns), theirs, who="other")
        mine_id, their_id = engine.store_owner(store), engine.store_owner(other)
        assert mine_id != their_id
        assert nft.table_owner(net.host_ns, nft.table_name(VM)) == mine_id
        assert nft.table_owner(net.host_ns, nft.table_name("other-vm")) == their_id
        assert nft.table_owner(net.host_ns, nft.table_name("never-applied")) is None
        # a leftover from before owner tags (or of a killed apply of no store): anybody's to collect
        nft.apply_table("legacy-vm", vmnet, [nft.NftFilter("x", "CVE-2000-1", "nft-close", (82,))])
        assert nft.table_owner(net.host_ns, nft.table_name("legacy-vm")) == ""
        assert engine.gc(store) == []
        assert nft.live_tables(net.host_ns) == {nft.table_name(VM), nft.table_name("other-vm")}
        assert engine.gc(other) == []  # the other store keeps its own and leaves ours
        assert nft.live_tables(net.host_ns) == {nft.table_name(VM), nft.table_name("other-vm")}
        engine.remove(other, "other-vm", reason="test", who="other")
        engine.remove(store, VM, reason="test", who="test")
        assert _ruleset(net) == before
    finally:
        other.close()
