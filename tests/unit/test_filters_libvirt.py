"""Filters of libvirt domains without libvirt: the tap and UUID from the domain, collection when it is gone.

A fake libvirt connection answers `lookupByUUIDString` as libvirtd does (the domain, or VIR_ERR_NO_DOMAIN);
nft and haproxy are replaced by recorders as in test_filters.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nephoscope.core.payloads import Package, Process
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.response import engine, haproxy, nft
from nephoscope.response.nft import FilterError, NftFilter, VmNet
from nephoscope.response.policy import load_policy
from nephoscope.service import filters
from nephoscope.store.sqlite import Store

libvirt_api = pytest.importorskip("libvirt")
VM, UUID = "web-1", "6f1c2a8e-3b7d-4e0a-9c55-0d2e4f6a8b10"
XML = """<domain type='qemu'><name>web-1</name><devices>
  <interface type='ethernet'><target dev='vftap1' managed='no'/></interface>
  <interface type='bridge'><source bridge='br0'/><target dev='vnet7'/></interface>
</devices></domain>"""


class NoDomain(libvirt_api.libvirtError):
    def __init__(self, code: int = libvirt_api.VIR_ERR_NO_DOMAIN) -> None:
        super().__init__("no domain")
        self.code = code

    def get_error_code(self) -> int:
        return self.code


class Dom:
    def __init__(self, active: bool = True, xml: str = XML) -> None:
        self.active, self.xml = active, xml

    def isActive(self) -> int:
        return int(self.active)

    def XMLDesc(self, _flags: int) -> str:
        return self.xml

    def UUIDString(self) -> str:
        return UUID


class Conn:
    def __init__(self) -> None:
        self.dom: Dom | None = Dom()
        self.error = libvirt_api.VIR_ERR_NO_DOMAIN

    def lookupByUUIDString(self, uuid: str) -> Dom:
        if self.dom is None or uuid != UUID:
            raise NoDomain(self.error)
        return self.dom


@pytest.fixture()
def conn(monkeypatch: pytest.MonkeyPatch) -> Conn:
    from nephoscope.hypervisor import libvirt

    c = Conn()
    monkeypatch.setattr(libvirt, "shared_connection", lambda uri=None: c)
    return c


def test_vm_net_keeps_the_domain_s_uuid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from nephoscope.hypervisor import libvirt

    monkeypatch.setenv("NEPHOSCOPE_RUN", str(tmp_path / "run"))
    monkeypatch.setattr(libvirt, "lookup_domain", lambda _conn, spec: Dom() if spec == VM else None)
    monkeypatch.setattr(libvirt, "shared_connection", lambda uri=None: object())
    net = filters.vm_net(VM)
    assert (net.tap, net.domain, net.netns) == ("vftap1", UUID, "")  # the first tap-backed NIC, from the XML
    assert filters.vm_net(VM, tap="vnet7").domain == UUID             # another NIC of the domain: still its
    assert filters.vm_net(VM, tap="tap9").domain == ""                # not the domain's tap: the operator's
    assert filters.vm_net(VM, tap="vftap1", netns="ns1").domain == ""  # libvirt's taps are in the host's namespace
    assert filters.vm_net("other", tap="tap9").domain == ""


def test_vmnet_stores_the_domain_only_when_known() -> None:
    net = VmNet("vftap1", domain=UUID)
    assert net.to_dict() == {"tap": "vftap1", "guest_ip": "", "netns": "", "domain": UUID}
    assert VmNet.from_dict(net.to_dict()) == net and "domain" not in VmNet("t0").to_dict()
    with pytest.raises(FilterError):
        VmNet("t0", domain="x'; flush ruleset")


def test_haproxy_on_a_routed_tap_without_the_vm_s_address_is_refused() -> None:
    assert "--guest-ip" in (nft.refusal("haproxy-h2", VmNet("vftap1", domain=UUID)) or "")
    assert nft.refusal("haproxy-h2", VmNet("vftap1", "10.79.0.2")) is None
    assert nft.refusal("nft-close", VmNet("vftap1")) is None


def test_domain_present_asks_libvirt(conn: Conn) -> None:
    net = VmNet("vftap1", domain=UUID)
    assert filters.domain_present(net) and filters.domain_present(VmNet("vftap1"))
    assert not filters.domain_present(VmNet("vnet9", domain=UUID))  # the domain no longer has that tap
    conn.dom = Dom(active=False)
    assert not filters.domain_present(net)                          # shut off
    conn.dom = None
    assert not filters.domain_present(net)                          # undefined (or a transient one destroyed)
    conn.error = libvirt_api.VIR_ERR_INTERNAL_ERROR
    assert filters.domain_present(net)                              # libvirt cannot tell: keep the filter


def _obs(kind: str, key: str, payload: Any) -> Observation:
    return Observation(kind, key, payload, Provenance("agent", VM), Verdict.REPORTED)


def test_gc_collects_the_filters_of_a_gone_domain_whose_tap_stays(conn: Conn, monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    tables: dict[str, str] = {}

    def apply_table(vm: str, net: VmNet, fs: list[NftFilter], owner: str = "") -> str:
        text = nft.ruleset(vm, net, fs, owner=owner) if fs else ""
        tables.update({nft.table_name(vm): text} if text else {})
        if not text:
            tables.pop(nft.table_name(vm), None)
        return text

    monkeypatch.setenv("NEPHOSCOPE_RUN", str(tmp_path / "run"))
    monkeypatch.setattr(nft, "apply_table", apply_table)
    monkeypatch.setattr(nft, "live_tables", lambda netns="": set(tables))
    monkeypatch.setattr(nft, "table_owner", lambda netns, name: "" if name in tables else None)
    monkeypatch.setattr(haproxy, "stop", lambda vm, keep_track=False: False)
    monkeypatch.setattr(engine, "net_present", lambda net: True)  # a tap libvirt did not create outlives the domain
    monkeypatch.setattr(filters, "notify", lambda changes, store: changes)
    store = Store(tmp_path / "s.sqlite")
    scan = [_obs("package", "nginx", Package("nginx", "1.22.1-9+deb12u9", "nginx")),
            _obs("process", "42", Process(42, comm="nginx", exe="/usr/sbin/nginx"))]
    policy = {k: v for k, v in load_policy().items() if k == "nginx-h2-rapid-reset"}
    net = VmNet("vftap1", "10.79.0.2", domain=UUID)
    plan = engine.plan(VM, scan, ["agent"], policy, owner={"/usr/sbin/nginx": "nginx"}.get)
    monkeypatch.setattr(haproxy, "start", lambda vm, n, fs, owner="": 1)
    assert [c.action for c in engine.apply(store, VM, net, plan, who="t")] == ["applied"]
    assert filters.gc(store) == [] and tables  # the domain runs with its tap
    conn.dom = None                            # destroyed / undefined
    assert [c.action for c in filters.gc(store)] == ["collected"]
    assert tables == {} and engine.active(store) == []
