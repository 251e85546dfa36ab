"""Filters on a real libvirt domain: its tap found in the domain's XML (no --tap), collected when the domain goes.

One server-h2 image (the old nginx: HTTP/1.1 on 80, h2c on 8080) booted by libvirtd as a transient TCG domain
whose NIC is `<interface type='ethernet'>` on a tap this module creates (`managed='no'`: libvirt opens it and
leaves it in place when the domain goes, as with a provider's pre-made taps). libvirt's QEMU runs in the host's
own namespace, so the tap and a bridge are there; a client namespace has a veth on the same bridge:

    client ns 10.79.0.3 ──veth── [bridge vfbrN, 10.79.0.1, host namespace] ──tap vftapN── domain 10.79.0.2

Ground truth: the domain's own nginx answering (or not) real TCP clients, libvirt's live XML and UUID, the
host namespace's `nft -j list ruleset` before and after, and the tap still there after the domain is gone.
Everything goes through the CLI (`nephoscope scan/filters ...`) as an operator runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nephoscope.core.errors import LabError
from nephoscope.hypervisor.qga import open_agent
from nephoscope.lab import libvirt_runner, netns
from nephoscope.lab.build import build_image
from nephoscope.lab.profile import load_profile
from nephoscope.response import haproxy, nft
from nephoscope.service.targets import resolve_target

pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft")]
SRC = Path(__file__).resolve().parents[2] / "src"
SCRIPT = Path(sys.executable).with_name("nephoscope")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "nephoscope.cli.main"]
# not the namespace labs' 10.77/10.78: these addresses are in the host's own namespace (the bridge's for haproxy)
GUEST_IP, CLIENT_IP, BRIDGE_IP = "10.79.0.2", "10.79.0.3", "10.79.0.1"
POLICY = """schema = 1
[[mitigation]]
id = "t-nginx-close"
cve = "CVE-2000-0020"
package = "nginx"
fixed = "99"
kind = "nft-close"
ports = [8080]
params = {}
does = "closes the guest's port 8080"
does_not_stop = "anything on other ports"
source = "nephoscope test"

[[mitigation]]
id = "t-nginx-rate"
cve = "CVE-2000-0021"
package = "nginx"
fixed = "99"
kind = "nft-rate"
ports = [80]
params = { new_per_second = 1, burst = 2 }
does = "limits new connections to the guest's port 80 per source"
does_not_stop = "a flood spread over many sources"
source = "nephoscope test"
"""
MINE = ["t-nginx-close", "t-nginx-rate"]


@dataclass(frozen=True, slots=True)
class Domain:
    """The module's domain and its network: names the test created, the domain's name and UUID."""

    name: str
    uuid: str
    tap: str
    bridge: str
    client_ns: str
    policy: Path
    env: dict[str, str]


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _cleanup_net(tap: str, bridge: str, client_ns: str) -> None:
    for argv in (["ip", "netns", "del", client_ns], ["ip", "link", "del", tap], ["ip", "link", "del", bridge]):
        subprocess.run(argv, capture_output=True, timeout=30, check=False)


def _set_address(name: str) -> None:
    """Give the domain's first ethernet NIC its static address through its agent (libvirt's channel)."""
    with open_agent(resolve_target(name), timeout=60) as agent:
        rc, out, err = agent.exec(["/bin/sh", "-c", "ls /sys/class/net | grep -E '^(en|eth)' | head -1"])
        nic = out.decode().strip()
        assert rc == 0 and nic, err
        script = f"ip link set {nic} up && ip addr replace {GUEST_IP}/24 dev {nic}"
        rc, _out, err = agent.exec(["/bin/sh", "-c", script])
        assert rc == 0, err


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Domain]:
    """Boot server-h2 as a libvirt domain on a tap (bridge port) in the host's namespace; remove it all after."""
    try:
        daemons = libvirt_runner.start_daemons()
    except LabError as exc:
        pytest.skip(f"libvirt unavailable: {exc}")
    run = tmp_path_factory.mktemp("virtfilter-run")
    old = os.environ.get("NEPHOSCOPE_RUN")
    os.environ["NEPHOSCOPE_RUN"] = str(run)  # lab and filter state of this module only
    suffix = os.getpid() % 10000
    tap, bridge, client_ns = f"vftap{suffix}", f"vfbr{suffix}", f"virtfilter-cli{suffix}"
    name = f"virtfilter-h2-{suffix}"
    policy = run / "policy.toml"
    policy.write_text(POLICY)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "NEPHOSCOPE_DB": str(run / "store.sqlite"), "NEPHOSCOPE_RUN": str(run)}
    try:
        image = build_image(load_profile("server-h2"))
        _cleanup_net(tap, bridge, client_ns)
        _sh("ip", "tuntap", "add", "dev", tap, "mode", "tap")
        _sh("ip", "link", "add", bridge, "type", "bridge")
        _sh("ip", "link", "set", tap, "master", bridge)
        _sh("ip", "netns", "add", client_ns)
        _sh("ip", "link", "add", f"vfcl{suffix}", "type", "veth", "peer", "name", "cli0", "netns", client_ns)
        _sh("ip", "link", "set", f"vfcl{suffix}", "master", bridge)
        _sh("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", bridge)
        for dev in (tap, bridge, f"vfcl{suffix}"):
            _sh("ip", "link", "set", dev, "up")
        _sh("ip", "-n", client_ns, "addr", "add", f"{CLIENT_IP}/24", "dev", "cli0")
        _sh("ip", "-n", client_ns, "link", "set", "cli0", "up")
        _sh("ip", "-n", client_ns, "link", "set", "lo", "up")
        guest = libvirt_runner.start(name, image, tap=tap)
        _set_address(name)
        yield Domain(name, guest.uuid, tap, bridge, client_ns, policy, env)
    finally:
        libvirt_runner.stop(name, quiet=True)
        for _vm, directory, _net in haproxy.iter_tracked():  # a failed test's haproxy (this module's run dir)
            haproxy.stop_dir(directory)
        with contextlib.suppress(Exception):  # a failed test's table: never left in the host's ruleset
            nft.delete_table_named("", nft.table_name(name))
        _cleanup_net(tap, bridge, client_ns)
        libvirt_runner.stop_daemons(daemons)
        if old is None:
            os.environ.pop("NEPHOSCOPE_RUN", None)
        else:
            os.environ["NEPHOSCOPE_RUN"] = old


def _cli(d: Domain, *args: str, ok: bool = True) -> Any:
    got = subprocess.run([*COMMAND, *args], env=d.env, capture_output=True, text=True, timeout=600, check=False)
    assert "Traceback" not in got.stderr, got.stderr
    if ok:
        assert got.returncode == 0, (args, got.stdout[-2000:], got.stderr[-2000:])
    return json.loads(got.stdout) if "--json" in args and got.stdout.strip() else got


@pytest.fixture(scope="module")
def scanned(domain: Domain) -> dict[str, Any]:
    """Scan the domain once (agent method, by its libvirt name) into the module's store; return the scan's JSON."""
    scan = _cli(domain, "scan", domain.name, "-m", "agent", "--json")
    assert scan["vm"] == domain.name and scan["status"] == "ok", scan.get("unverifiable")
    return dict(scan)


def _connects(d: Domain, port: int, count: int, timeout: float) -> int:
    return int(netns.run_in(d.client_ns, "connects", GUEST_IP, port, count, timeout)["connected"])


def _status(d: Domain, what: str, port: int) -> int:
    return int(netns.run_in(d.client_ns, what, GUEST_IP, port, "/", 20.0)["status"])


def test_filters_find_the_domain_s_tap_in_its_xml_and_filter_it(domain: Domain, scanned: dict[str, Any]) -> None:
    d = domain
    # served without a filter: switched by the bridge to the domain's own nginx
    assert _status(d, "http1_get", 80) == 200 and _status(d, "h2_get", 8080) == 200
    assert _connects(d, 80, 10, 2.0) == 10 and _connects(d, 8080, 3, 2.0) == 3
    before = nft.comparable_ruleset()

    assert "nginx" in {p["comm"] for p in scanned["processes"]}
    plan = _cli(d, "filters", "plan", d.name, "--policy", str(d.policy), "--json")
    # the tap came from the domain's live XML (no --tap), the bridge from the kernel, the UUID from libvirt
    assert plan["net"] == {"tap": d.tap, "guest_ip": "", "netns": "", "bridge": d.bridge, "domain": d.uuid}
    assert [f["mitigation"]["id"] for f in plan["filters"] if f["mitigation"]["id"] in MINE] == MINE
    nginx = {f["version"] for f in plan["filters"] if f["mitigation"]["id"] in MINE}
    assert nginx == {libvirt_runner.load(d.name).manifest()["packages"]["nginx"]}  # type: ignore[union-attr]
    why = {s["mitigation"]: s["why"] for s in plan["skipped"]}
    assert "--guest-ip" in why["nginx-h2-rapid-reset"]  # libvirt does not say the VM's address: refused, with why

    only = [a for m in MINE for a in ("--only", m)]
    applied = _cli(d, "filters", "apply", d.name, *only, "--policy", str(d.policy), "--json")
    assert sorted((c["action"], c["mitigation"]) for c in applied) == [("applied", m) for m in MINE]
    filtered = nft.comparable_ruleset()
    tables = [i["table"] for i in filtered if "table" in i and i["table"]["name"] == nft.table_name(d.name)]
    assert [t["family"] for t in tables] == ["bridge"]
    assert _connects(d, 8080, 3, 1.0) == 0        # closed (dropped: this kernel has no bridge reject)
    assert 2 <= _connects(d, 80, 10, 0.3) < 10    # the burst reaches nginx, then new connections are dropped
    assert _cli(d, "filters", "apply", d.name, *only, "--policy", str(d.policy), "--json") == []  # idempotent
    assert nft.comparable_ruleset() == filtered
    listed = _cli(d, "filters", "list", d.name, "--json")
    assert sorted(r["mitigation"] for r in listed) == MINE
    assert all(r["net"]["tap"] == d.tap and r["net"]["domain"] == d.uuid and r["rules"] for r in listed)
    # the table form names the domain the filters follow (wide enough that no cell is folded)
    shown = subprocess.run([*COMMAND, "filters", "list", d.name], env={**d.env, "COLUMNS": "400"},
                           capture_output=True, text=True, timeout=120, check=True).stdout
    assert d.uuid in shown and d.tap in shown

    removed = _cli(d, "filters", "remove", d.name, "--json")
    assert sorted((c["action"], c["mitigation"]) for c in removed) == [("removed", m) for m in MINE]
    assert nft.comparable_ruleset() == before
    assert _connects(d, 8080, 3, 2.0) == 3 and _connects(d, 80, 10, 2.0) == 10  # the original path is back
    assert _cli(d, "filters", "gc", "--json") == []  # the domain runs with its tap: nothing to collect


@pytest.mark.skipif(not shutil.which("haproxy"), reason="needs haproxy (scripts/setup.sh)")
def test_rapid_reset_filter_on_the_domain_given_its_address(domain: Domain, scanned: dict[str, Any]) -> None:
    d = domain
    rapid = "nginx-h2-rapid-reset"
    assert netns.run_in(d.client_ns, "rapid_reset", GUEST_IP, 8080, 500)["cut_off"] is False  # the old nginx
    before = nft.comparable_ruleset()
    plan = _cli(d, "filters", "plan", d.name, "--guest-ip", GUEST_IP, "--json")
    assert plan["net"]["tap"] == d.tap and plan["net"]["domain"] == d.uuid  # the tap still from the XML
    assert rapid in [f["mitigation"]["id"] for f in plan["filters"]], plan["skipped"]
    applied = _cli(d, "filters", "apply", d.name, "--only", rapid, "--guest-ip", GUEST_IP, "--json")
    assert [(c["action"], c["mitigation"]) for c in applied] == [("applied", rapid)]
    cut = netns.run_in(d.client_ns, "rapid_reset", GUEST_IP, 8080, 500)
    assert cut["cut_off"] is True and cut["streams_sent"] < 500
    assert _status(d, "h2_get", 8080) == 200 and _status(d, "http1_get", 8080) == 200  # through haproxy
    assert _status(d, "http1_get", 80) == 200  # another port: switched to the domain as before
    assert [c["action"] for c in _cli(d, "filters", "remove", d.name, "--json")] == ["removed"]
    assert nft.comparable_ruleset() == before
    assert netns.run_in(d.client_ns, "rapid_reset", GUEST_IP, 8080, 500)["cut_off"] is False


def test_the_domain_takes_its_filters_with_it(domain: Domain, scanned: dict[str, Any]) -> None:
    d = domain
    before = nft.comparable_ruleset()
    applied = _cli(d, "filters", "apply", d.name, "--only", "t-nginx-close", "--policy", str(d.policy), "--json")
    assert [c["action"] for c in applied] == ["applied"] and _connects(d, 8080, 3, 1.0) == 0
    assert libvirt_runner.stop(d.name)  # destroyed: a transient domain is then undefined as well
    # libvirt did not create the tap, so it outlives the domain: only libvirt's word says the VM is gone
    assert subprocess.run(["ip", "link", "show", "dev", d.tap], capture_output=True, check=False).returncode == 0
    collected = _cli(d, "filters", "gc", "--json")
    assert [(c["action"], c["mitigation"]) for c in collected] == [("collected", "t-nginx-close")]
    assert "gone" in collected[0]["reason"]
    assert nft.comparable_ruleset() == before and _cli(d, "filters", "list", "--json") == []
    trail = list(reversed(_cli(d, "filters", "list", d.name, "--audit", "--json")))
    assert [(r["action"], r["who"]) for r in trail][-1] == ("collected", "nephoscope gc")
    assert trail[-2]["action"] == "applied" and all(r["reason"] and r["rules"] for r in trail)
