"""Filters without a host change: policy validation, planning from observations, nft rulesets, the engine.

The engine tests replace the two commands that change the host (nft transaction, haproxy start/stop) with
recorders, so what is checked is the order, idempotency, the audit and the rollback on failure.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from nephoscope.core.payloads import Package, Process, Socket
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.lab import runner
from nephoscope.response import engine, haproxy, nft
from nephoscope.response.nft import FilterError, NftFilter, VmNet
from nephoscope.response.policy import BUILTIN, PolicyError, load_file, load_policy, validate
from nephoscope.store.sqlite import Store

VM = "unit-vm"
NET = VmNet("tap-unit", "10.77.0.2", "")
NGINX_OLD, NGINX_FIXED = "1.22.1-9+deb12u9", "1.22.1-9+deb12u11"


def _entry(**over: Any) -> dict[str, Any]:
    base = {"id": "t-close", "cve": "CVE-2024-0001", "package": "nginx", "fixed": "1.2-1", "introduced": "1.0",
            "kind": "nft-close", "ports": [80], "params": {}, "does": "closes the port here",
            "does_not_stop": "anything on other ports", "source": "unit test"}
    return {**base, **over}


def _obs(kind: str, key: str, payload: Any, method: str = "agent") -> Observation:
    return Observation(kind, key, payload, Provenance(method, VM), Verdict.REPORTED)


def _scan(nginx_version: str = NGINX_OLD, nginx_running: bool = True, listen: tuple[int, ...] | None = None
          ) -> list[Observation]:
    out = [_obs("package", "nginx", Package("nginx", nginx_version, "nginx")),
           _obs("package", "openssh-server", Package("openssh-server", "1:9.2p1-2+deb12u10", "openssh")),
           _obs("process", "1", Process(1, comm="systemd", exe="/usr/lib/systemd/systemd")),
           _obs("process", "9", Process(9, comm="sshd", exe="/usr/sbin/sshd"))]
    if nginx_running:
        out += [_obs("process", "42", Process(42, comm="nginx", exe="/usr/sbin/nginx")),
                _obs("process", "43", Process(43, comm="nginx", exe="/usr/sbin/nginx"))]
    for port in listen or ():
        out.append(_obs("socket", f"s{port}", Socket("tcp", "inet", "stream", "LISTEN", "0.0.0.0", port,
                                                     owners=(42,)), "inspect"))
    return out


OWNER = {"/usr/sbin/nginx": "nginx", "/usr/sbin/sshd": "openssh-server"}.get


def test_builtin_policy_validates_and_ranges_follow_debian_order() -> None:
    policy = load_policy()
    m = policy["nginx-h2-rapid-reset"]
    assert m.cve == "CVE-2023-44487" and m.kind == "haproxy-h2" and m.does and m.does_not_stop and m.source
    assert m.covers(NGINX_OLD) and m.covers("1.22.1-9") and not m.covers(NGINX_FIXED)
    assert not m.covers("1.22.1-9+deb12u12") and not m.covers("1.9.4") and m.covers("1.9.5")
    assert m.covers("1.22.1-9+deb12u11~bpo1")  # ~ sorts before the fix: still vulnerable
    ssh = policy["openssh-regresshion-connlimit"]
    assert ssh.covers("1:9.2p1-2+deb12u2") and not ssh.covers("1:9.2p1-2+deb12u3") and not ssh.covers("9.9")


@pytest.mark.parametrize(("change", "message"), [
    ({"kind": "nft-teleport"}, "kind"),
    ({"cve": "CVE-24-1"}, "cve"),
    ({"ports": [0]}, "ports/0"),
    ({"ports": []}, "ports"),
    ({"kind": "nft-rate", "params": {"new_per_second": 5}}, "burst"),
    ({"kind": "nft-allow", "params": {"allow": ["10.0.0.0/8; drop"]}}, "allow"),
    ({"kind": "haproxy-h2", "params": {"max_concurrent_streams": 10, "streams_per_conn_10s": 5,
                                       "upstream": "h3"}}, "upstream"),
    ({"does_not_stop": ""}, "does_not_stop"),
    ({"fixed": "not a version"}, "fixed"),
    ({"introduced": "2.0"}, "not below fixed"),
    ({"surprise": 1}, "surprise"),
])
def test_invalid_policies_are_refused_with_the_place(change: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        validate({"schema": 1, "mitigation": [_entry(**change)]}, "p.toml")


def test_duplicate_ids_refused_and_provider_file_overrides(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="twice"):
        validate({"schema": 1, "mitigation": [_entry(), _entry()]}, "p.toml")
    builtin = tomllib.loads(BUILTIN.read_text())["mitigation"][0]
    mine = tmp_path / "provider"
    mine.mkdir()
    (mine / "a.toml").write_text(f'schema = 1\n[[mitigation]]\nid = "{builtin["id"]}"\ncve = "{builtin["cve"]}"\n'
                                 'package = "nginx"\nfixed = "1.22.1-9+deb12u11"\nkind = "nft-close"\n'
                                 'ports = [8080]\nparams = {}\ndoes = "closes 8080 instead"\n'
                                 'does_not_stop = "the service on 8080 is gone"\nsource = "provider"\n')
    (mine / "bad.txt").write_text("ignored: not *.toml")
    policy = load_policy([mine])
    assert policy[builtin["id"]].kind == "nft-close" and policy[builtin["id"]].origin.endswith("a.toml")
    (mine / "b.toml").write_text("schema = 1\nmitigation = [")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_file(mine / "b.toml")


def test_plan_takes_running_vulnerable_code_only() -> None:
    policy = load_policy()
    p = engine.plan(VM, _scan(listen=(80, 8080)), ["agent", "inspect"], policy, scan_id=7, owner=OWNER)
    assert [f.mitigation.id for f in p.filters] == ["nginx-h2-rapid-reset"]
    f = p.filters[0]
    assert f.version == NGINX_OLD and f.ports == (8080,) and f.evidence["ports_from"] == "listening in the scan"
    assert [x["pid"] for x in f.evidence["processes"]] == [42, 43] and "scan 7" in f.reason()
    assert any(s["mitigation"] == "openssh-regresshion-connlimit" and "not in the vulnerable range" in s["why"]
               for s in p.skipped)
    assert engine.plan(VM, _scan(NGINX_FIXED), ["agent"], policy, owner=OWNER).filters == []
    assert engine.plan(VM, _scan(nginx_running=False), ["agent"], policy, owner=OWNER).filters == []
    no_port = engine.plan(VM, _scan(listen=(80,)), ["agent", "inspect"], policy, owner=OWNER)
    assert no_port.filters == [] and "listens on none" in no_port.skipped[0]["why"]
    from_policy = engine.plan(VM, _scan(), ["agent"], policy, owner=OWNER).filters[0]
    assert from_policy.ports == (8080,) and "from the policy" in from_policy.evidence["ports_from"]


def test_ruleset_is_deterministic_and_names_each_filter() -> None:
    fs = [NftFilter("b", "CVE-1-2", "nft-rate", (443, 80), {"new_per_second": 5, "burst": 10}),
          NftFilter("a", "CVE-1-1", "nft-close", (23,)),
          NftFilter("h", "CVE-2023-44487", "haproxy-h2", (8080,), {}, (41234,))]
    text = nft.ruleset("vm one", NET, fs)
    assert text == nft.ruleset("vm one", NET, list(reversed(fs)))
    assert text.startswith(f"table inet {nft.table_name('vm one')} {{")
    assert 'oifname "tap-unit" tcp dport 23 reject with tcp reset comment "a CVE-1-1"' in text
    assert "tcp dport { 80, 443 } ct state new update @rate_b_v4 { ip saddr limit rate over 5/second burst 10" in text
    assert 'iifname != "tap-unit" ip daddr 10.77.0.2 tcp dport 8080 redirect to :41234' in text
    assert nft.table_name("vm one") != nft.table_name("vm_one")  # distinct VMs never share a table
    tx = nft.replace_transaction("vm one", text)
    assert tx.splitlines()[:2] == [f"table inet {nft.table_name('vm one')} {{}}",
                                   f"delete table inet {nft.table_name('vm one')}"]
    with pytest.raises(FilterError, match="guest-ip"):
        nft.ruleset("v", VmNet("tap0"), [fs[2]])
    with pytest.raises(FilterError):
        VmNet('tap0"; flush ruleset; "')
    with pytest.raises(FilterError):
        nft.delete_table_named("", "filter")


def test_haproxy_config_counts_streams_per_connection() -> None:
    f = NftFilter("h", "CVE-2023-44487", "haproxy-h2", (8080,),
                  {"max_concurrent_streams": 50, "streams_per_conn_10s": 120, "upstream": "h2"}, (41234,))
    cfg = haproxy.config(VM, NET, [f])
    assert "tune.h2.max-concurrent-streams 50" in cfg and "bind :41234" in cfg
    assert "sc_http_req_rate(0) gt 120" in cfg and "server vm 10.77.0.2:8080 proto h2" in cfg
    assert haproxy.proxy_port(VM, 8080) == haproxy.proxy_port(VM, 8080) != haproxy.proxy_port(VM, 8081)


class Host:
    """Records what would change on the host instead of changing it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.tables: dict[str, str] = {}
        self.owners: dict[str, str] = {}  # table -> the owner tag it was put with
        self.haproxy: dict[str, list[NftFilter]] = {}
        self.fail_nft = False
        monkeypatch.setenv("NEPHOSCOPE_RUN", str(tmp_path / "run"))
        monkeypatch.setattr(nft, "apply_table", self.apply_table)
        monkeypatch.setattr(nft, "live_tables", lambda netns="": set(self.tables))
        monkeypatch.setattr(nft, "table_owner", lambda netns, name: self.owners.get(name))
        monkeypatch.setattr(haproxy, "start", lambda vm, net, fs, owner="": self.haproxy.__setitem__(vm, fs) or 1)
        monkeypatch.setattr(haproxy, "stop", lambda vm, keep_track=False: self.haproxy.pop(vm, None) is not None)
        monkeypatch.setattr(engine, "net_present", lambda net: True)

    def apply_table(self, vm: str, net: VmNet, filters: list[NftFilter], owner: str = "") -> str:
        if self.fail_nft:
            self.fail_nft = False
            raise FilterError("nft: simulated failure")
        text = nft.ruleset(vm, net, filters, owner=owner) if filters else ""
        if text:
            self.tables[nft.table_name(vm)] = text
            self.owners[nft.table_name(vm)] = owner
        else:
            self.tables.pop(nft.table_name(vm), None)
            self.owners.pop(nft.table_name(vm), None)
        return text


@pytest.fixture()
def host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Host:
    return Host(monkeypatch, tmp_path)


def test_apply_is_idempotent_audited_and_expires(host: Host, tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    plan = engine.plan(VM, _scan(), ["agent"], load_policy(), scan_id=3, owner=OWNER)
    changes = engine.apply(store, VM, NET, plan, who="alice")
    assert [(c.action, c.mitigation, c.who) for c in changes] == [("applied", "nginx-h2-rapid-reset", "alice")]
    assert changes[0].rules_summary and VM in host.haproxy
    table = dict(host.tables)
    assert engine.apply(store, VM, NET, plan, who="alice") == [] and host.tables == table
    assert len(engine.audit_log(store, VM)) == 1
    assert engine.expire(store, VM, _scan(), ["agent"], owner=OWNER) == []  # still vulnerable: stays
    assert engine.expire(store, VM, [], ["agent"], owner=OWNER) == []  # a scan that saw nothing: stays
    gone = engine.expire(store, VM, _scan(NGINX_FIXED), ["agent"], owner=OWNER)
    assert [c.action for c in gone] == ["expired"] and "fixed version" in gone[0].reason
    assert host.tables == {} and host.haproxy == {} and engine.active(store) == []
    engine.apply(store, VM, NET, plan, who="alice")
    assert engine.expire(store, VM, _scan(nginx_running=False), ["agent"], owner=None) == []  # could not see it
    gone = engine.expire(store, VM, _scan(nginx_running=False), ["agent"], owner=OWNER)
    assert "no longer executing" in gone[0].reason
    assert [r["action"] for r in engine.audit_log(store, VM)] == ["expired", "applied", "expired", "applied"]


def test_failed_transaction_puts_the_previous_state_back(host: Host, tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    policy = load_policy()
    plan = engine.plan(VM, _scan(), ["agent"], policy, owner=OWNER)
    engine.apply(store, VM, NET, plan, who="t")
    table = dict(host.tables)
    host.fail_nft = True
    with pytest.raises(FilterError, match="simulated"):
        engine.remove(store, VM, who="t")
    assert host.tables == table and [a.mitigation for a in engine.active(store)] == ["nginx-h2-rapid-reset"]
    assert len(engine.audit_log(store, VM)) == 1  # nothing recorded for the failed change
    with pytest.raises(FilterError, match="not in the plan"):
        engine.apply(store, VM, NET, plan, only=["nope"])
    with pytest.raises(FilterError, match="not"):
        engine.apply(store, VM, VmNet("other-tap", "10.77.0.2"), plan)


def test_filter_change_is_json_ready() -> None:
    c = engine.FilterChange(VM, "applied", "m", "CVE-1-1", "nginx", "1", "nft-close", (80,), ("rule",), "why",
                            "who", 1.0)
    assert c.to_dict()["ports"] == [80] and c.to_dict()["rules_summary"] == ["rule"]


def test_qemu_tap_networking_keeps_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEPHOSCOPE_RUN", str(tmp_path))

    class Img:
        kernel, initrd, is_disk = Path("/k"), Path("/i"), False

    g = runner.Guest("g", "clean", 0, 512, 1, True, "tcg", "qemu64", 0, 8080, 2222, "/img", 0.0)
    assert "hostfwd=tcp:127.0.0.1:8080-:80" in " ".join(runner.qemu_command(g, Img()))  # type: ignore[arg-type]
    assert runner.launch_argv(g, ["qemu"]) == ["qemu"]
    g.tap, g.netns = "t0", "ns0"
    argv = runner.qemu_command(g, Img())  # type: ignore[arg-type]
    assert "tap,id=net0,ifname=t0,script=no,downscript=no" in argv and "hostfwd" not in " ".join(argv)
    assert runner.launch_argv(g, ["qemu"]) == ["ip", "netns", "exec", "ns0", "qemu"]


def test_cli_plan_and_list_from_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import time

    from typer.testing import CliRunner

    from nephoscope.cli.main import app
    from nephoscope.service import filters

    monkeypatch.setenv("NEPHOSCOPE_DB", str(tmp_path / "s.sqlite"))
    monkeypatch.setenv("NEPHOSCOPE_RUN", str(tmp_path / "run"))
    monkeypatch.setattr(filters, "kb_owner", lambda: OWNER)
    monkeypatch.setattr(filters, "_libvirt_tap", lambda vm: None)  # no libvirt domain of that name (hermetic)
    Store().save_scan(VM, ["agent", "inspect"], _scan(listen=(8080,)), [], {"status": "ok"}, time.time())
    cli = CliRunner()
    out = cli.invoke(app, ["filters", "plan", VM, "--json"])
    assert out.exit_code == 0, out.output
    plan = json.loads(out.stdout)
    assert [f["mitigation"]["id"] for f in plan["filters"]] == ["nginx-h2-rapid-reset"]
    assert plan["filters"][0]["evidence"]["ports_from"] == "listening in the scan"
    assert plan["net"] is None  # no tap known: the kinds are not checked against one
    listed = cli.invoke(app, ["filters", "list", "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []
    missing = cli.invoke(app, ["filters", "apply", VM])  # not a lab guest on a tap: where does traffic pass?
    assert missing.exit_code != 0 and "--tap" in missing.output


def test_taps_from_libvirt_domain_xml() -> None:
    from nephoscope.service.filters import taps_from_domain_xml

    xml = """<domain type='qemu'><name>web</name><devices>
      <interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/><target dev='vnet3'/></interface>
      <interface type='user'><mac address='52:54:00:00:00:02'/></interface>
      <interface type='network'><source network='default'/><target dev='vnet4'/></interface>
    </devices></domain>"""
    assert taps_from_domain_xml(xml) == [("vnet3", "bridge"), ("vnet4", "network")]
    assert taps_from_domain_xml("<domain") == []


def test_changes_carry_what_a_notice_needs(host: Host, tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    plan = engine.plan(VM, _scan(), ["agent"], load_policy(), scan_id=3, owner=OWNER)
    applied = engine.apply(store, VM, NET, plan, who="t")[0]
    assert applied.notice_action == "applied" and "What it does not stop:" in applied.notice_summary()
    assert "CVE-2023-44487" in applied.notice_summary() and applied.does_not_stop
    expired = engine.expire(store, VM, _scan(NGINX_FIXED), ["agent"], owner=OWNER)[0]
    assert expired.action == "expired" and expired.notice_action == "removed"
    assert "no longer filters" in expired.notice_summary() and expired.does  # kept from the store row


BRIDGED = VmNet("vnet3", "10.77.0.2", "", "virbr0")
NO_BRIDGE_CT = nft.BridgeCaps(reject=False, conntrack=False)  # this host's kernel (no nft_reject_bridge, no ct)
FULL_BRIDGE = nft.BridgeCaps(reject=True, conntrack=True)      # e.g. Debian's kernel with both modules


def test_bridged_ruleset_is_a_bridge_table_in_the_kernel_s_dialect() -> None:
    fs = [NftFilter("c", "CVE-1-1", "nft-close", (23,)),
          NftFilter("a", "CVE-1-2", "nft-allow", (80,), {"allow": ["10.0.0.0/8"]}),
          NftFilter("r", "CVE-1-3", "nft-rate", (22,), {"new_per_second": 5, "burst": 10})]
    text = nft.ruleset("vm", BRIDGED, fs, NO_BRIDGE_CT)
    assert text == nft.ruleset("vm", BRIDGED, list(reversed(fs)), NO_BRIDGE_CT)  # deterministic
    assert text.startswith(f"table bridge {nft.table_name('vm')} {{") and "on bridge virbr0" in text
    assert "type filter hook forward priority filter - 10; policy accept;" in text and "prerouting" not in text
    assert 'oifname "vnet3" tcp dport 23 drop comment "c CVE-1-1"' in text  # no reject in this bridge family
    assert 'oifname "vnet3" tcp dport 80 ip saddr != { 10.0.0.0/8 } drop' in text
    assert 'oifname "vnet3" tcp dport 80 meta protocol ip6 drop' in text  # never `meta nfproto` in a bridge
    assert "nfproto" not in text and "ct state" not in text and "reject" not in text
    assert ("tcp dport 22 tcp flags & (syn | ack) == syn update @rate_r_v4 { ip saddr limit rate over 5/second "
            "burst 10 packets } drop") in text
    full = nft.ruleset("vm", BRIDGED, [*fs, NftFilter("n", "CVE-1-4", "nft-connlimit", (22,),
                                                     {"max_per_source": 3})], FULL_BRIDGE)
    assert 'oifname "vnet3" tcp dport 23 reject with tcp reset' in full
    forward, output = full.split("  chain output {")
    assert "reject" in forward and "reject" not in output  # the kernel allows no bridge reject in `output`
    assert "type filter hook output priority filter - 10;" in output and "meta skuid 0-4294967295 accept" in output
    assert 'oifname "vnet3" tcp dport 23 drop comment "c CVE-1-1"' in output
    assert "ct state new update @rate_r_v4" in full
    assert "ct state new add @conn_n_v4 { ip saddr ct count over 3 }" in full
    assert nft.ruleset("vm", VmNet("vnet3", "10.77.0.2"), fs).startswith("table inet ")  # routed: unchanged
    # one transaction clears the VM's table in both families, whatever its tap was before
    tx = nft.replace_transaction("vm", text).splitlines()
    assert tx[:4] == [f"table inet {nft.table_name('vm')} {{}}", f"delete table inet {nft.table_name('vm')}",
                      f"table bridge {nft.table_name('vm')} {{}}", f"delete table bridge {nft.table_name('vm')}"]


def test_what_a_bridged_tap_cannot_do_is_refused_with_the_reason() -> None:
    assert nft.refusal("haproxy-h2", NET) is None and nft.refusal("nft-connlimit", NET) is None
    on_bridge = nft.PortFacts("fe:54:00:12:34:56", ("10.77.0.1/24",))
    assert nft.refusal("haproxy-h2", BRIDGED, FULL_BRIDGE, on_bridge) is None
    assert "subnet" in (nft.refusal("haproxy-h2", BRIDGED, NO_BRIDGE_CT, nft.PortFacts(on_bridge.mac, ())) or "")
    assert "subnet" in (nft.refusal("haproxy-h2", BRIDGED, NO_BRIDGE_CT,
                                    nft.PortFacts(on_bridge.mac, ("192.168.122.1/24",))) or "")
    assert "MAC" in (nft.refusal("haproxy-h2", BRIDGED, NO_BRIDGE_CT, nft.PortFacts("", on_bridge.nets)) or "")
    assert "--guest-ip" in (nft.refusal("haproxy-h2", VmNet("vnet3", bridge="virbr0"), NO_BRIDGE_CT, on_bridge) or "")
    assert "conntrack" in (nft.refusal("nft-connlimit", BRIDGED, NO_BRIDGE_CT) or "")
    assert nft.refusal("nft-connlimit", BRIDGED, FULL_BRIDGE) is None
    assert all(nft.refusal(k, BRIDGED, NO_BRIDGE_CT) is None for k in ("nft-close", "nft-allow", "nft-rate"))
    with pytest.raises(FilterError, match="conntrack"):
        nft.ruleset("vm", BRIDGED, [NftFilter("n", "CVE-1-4", "nft-connlimit", (22,), {"max_per_source": 3})],
                    NO_BRIDGE_CT)
    with pytest.raises(FilterError, match="subnet"):
        nft.ruleset("vm", BRIDGED, [NftFilter("h", "CVE-2023-44487", "haproxy-h2", (8080,), {}, (41234,))],
                    FULL_BRIDGE, nft.PortFacts(on_bridge.mac, ()))


def test_bridged_l7_hands_the_port_up_to_the_host_then_redirects() -> None:
    port = nft.PortFacts("fe:54:00:12:34:56", ("10.77.0.1/24",))
    fs = [NftFilter("h", "CVE-2023-44487", "haproxy-h2", (8080,), {}, (41234,)),
          NftFilter("c", "CVE-1-1", "nft-close", (23,))]
    text = nft.ruleset("vm", BRIDGED, fs, NO_BRIDGE_CT, port)
    bridge, inet = text.split(f"table inet {nft.table_name('vm')} {{")
    assert bridge.startswith(f"table bridge {nft.table_name('vm')} {{")
    assert "type filter hook prerouting priority dstnat - 10;" in bridge
    assert ('iifname != "vnet3" ether type ip ip daddr 10.77.0.2 tcp dport 8080 meta pkttype set host '
            'ether daddr set fe:54:00:12:34:56 comment "h CVE-2023-44487"') in bridge
    assert 'oifname "vnet3" tcp dport 23 drop' in bridge and "redirect" not in bridge
    assert "type nat hook prerouting priority dstnat - 10;" in inet
    assert 'iifname != "vnet3" ip daddr 10.77.0.2 tcp dport 8080 redirect to :41234' in inet
    assert "forward" not in inet and "vnet3\" tcp dport 23" not in inet
    assert text == nft.ruleset("vm", BRIDGED, list(reversed(fs)), NO_BRIDGE_CT, port)
    assert "table inet" not in nft.ruleset("vm", BRIDGED, fs[1:], NO_BRIDGE_CT, port)  # no L7: bridge only
    with pytest.raises(FilterError):
        VmNet("vnet3", bridge='br0"; flush ruleset')
    assert VmNet.from_dict(BRIDGED.to_dict()) == BRIDGED and "bridge" not in NET.to_dict()
    assert VmNet.from_dict({"tap": "t0"}) == VmNet("t0")  # rows stored before bridges existed


def test_plan_leaves_out_kinds_the_tap_cannot_take(host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    monkeypatch.setattr(nft, "bridge_caps", lambda netns="": NO_BRIDGE_CT)
    monkeypatch.setattr(nft, "port_facts", lambda net: nft.PortFacts("fe:54:00:12:34:56", ("192.168.122.1/24",)))
    policy = load_policy()
    p = engine.plan(VM, _scan(listen=(8080,)), ["agent", "inspect"], policy, owner=OWNER, net=BRIDGED)
    assert p.filters == [] and p.net == BRIDGED and p.to_dict()["net"]["bridge"] == "virbr0"
    refused = [s for s in p.skipped if s["mitigation"] == "nginx-h2-rapid-reset"]
    assert refused and "haproxy-h2 refused" in refused[0]["why"] and "virbr0" in refused[0]["why"]
    assert "subnet" in refused[0]["why"]  # 10.77.0.2 is not in the host's 192.168.122.1/24 on the bridge
    routed = engine.plan(VM, _scan(listen=(8080,)), ["agent", "inspect"], policy, owner=OWNER, net=NET)
    assert [f.mitigation.id for f in routed.filters] == ["nginx-h2-rapid-reset"]
    with pytest.raises(FilterError, match="haproxy-h2 refused"):  # --only names a refused one: say why
        engine.apply(Store(tmp_path / "s.sqlite"), VM, BRIDGED, p, only=["nginx-h2-rapid-reset"])
    assert host.tables == {}


class _Proc:
    def __init__(self, rc: int, out: str) -> None:
        self.returncode, self.stdout, self.stderr = rc, out, ""


@pytest.mark.parametrize(("rc", "out", "want"), [
    (0, '[{"ifname": "vnet3", "master": "virbr0", "linkinfo": {"info_slave_kind": "bridge"}}]', "virbr0"),
    (0, '[{"ifname": "vnet3", "linkinfo": {"info_kind": "tun"}}]', ""),
    (1, "", None),
])
def test_find_bridge_reads_the_kernel_s_link_details(monkeypatch: pytest.MonkeyPatch, rc: int, out: str,
                                                     want: str | None) -> None:
    import subprocess

    seen: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: seen.append(argv) or _Proc(rc, out))
    assert nft.find_bridge("vnet3", "ns1") == want
    assert seen[0][:3] == ["ip", "-n", "ns1"] and seen[0][-2:] == ["dev", "vnet3"]


def test_find_bridge_refuses_other_kinds_of_port(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    ovs = '[{"ifname": "vnet3", "master": "ovs-system", "linkinfo": {"info_slave_kind": "openvswitch"}}]'
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: _Proc(0, ovs))
    with pytest.raises(FilterError, match="openvswitch"):
        nft.find_bridge("vnet3")


def test_libvirt_interfaces_on_a_bridge_are_taps_now() -> None:
    from nephoscope.service.filters import pick_tap

    assert pick_tap("web", [("vnet3", "bridge"), ("vnet4", "network")]) == "vnet3"
    assert pick_tap("web", [("macvtap0", "direct"), ("vnet5", "ethernet")]) == "vnet5"
    assert pick_tap("web", []) is None
    with pytest.raises(FilterError, match="direct"):
        pick_tap("web", [("macvtap0", "direct")])
