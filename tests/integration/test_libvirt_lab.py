"""A real libvirt TCG domain (plain RAM, agent and monitor held by libvirtd): found, named, asked, never left paused."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nephoscope.core.records import Verdict
from nephoscope.hypervisor.libvirt import LibvirtMonitor, domain_pid
from nephoscope.hypervisor.monitor import open_monitor
from nephoscope.hypervisor.qga import open_agent
from nephoscope.introspect.agent import AgentMethod
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest
SRC = Path(__file__).resolve().parents[2] / "src"
SCRIPT = Path(sys.executable).with_name("nephoscope")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "nephoscope.cli.main"]
HAS_PROCESS_RAM = importlib.util.find_spec("nephoscope.hypervisor.qemu") is not None


def nephoscope(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "NEPHOSCOPE_DB": str(tmp_path / "s.sqlite")}
    return subprocess.run([*COMMAND, *args], env=env, capture_output=True, text=True, timeout=600, check=False)


def _long_lived(manifest: dict) -> list[dict]:
    return [p for p in manifest["processes"] if not (p["comm"] == "sleep" and p["cmdline"][-1:] == ["3600"])]


def _status(name: str) -> str:
    with LibvirtMonitor(name) as mon:
        return str(mon.command("query-status")["status"])


def test_vms_lists_the_domain_with_name_uuid_and_pid(libvirt_guest, tmp_path: Path) -> None:
    got = nephoscope("vms", "--json", tmp_path=tmp_path)
    assert got.returncode == 0, got.stderr
    listed = {v["name"]: v for v in json.loads(got.stdout)["vms"]}
    vm = listed[libvirt_guest.name]
    assert vm["kind"] == "libvirt" and vm["uuid"] == libvirt_guest.uuid and vm["state"] == "running"
    assert vm["pid"] == libvirt_guest.pid == domain_pid(libvirt_guest.name)
    assert Path(f"/proc/{vm['pid']}/cmdline").read_bytes().startswith(b"/usr/bin/qemu-system")
    assert "agent" in vm["supported"]
    # the QEMU libvirt runs is that domain, not a second VM
    assert [v for v in listed.values() if v["pid"] == vm["pid"]] == [vm]
    if not HAS_PROCESS_RAM:
        assert "needs the conn connector" in vm["unsupported"]["arch"]


def test_the_monitor_through_libvirt(libvirt_guest) -> None:
    with open_monitor(resolve_target(libvirt_guest.name)) as mon:
        assert mon.command("query-status")["status"] == "running"
        mtree = mon.hmp("info mtree -f")
        assert "pc.ram" in mtree
        assert mon.command("query-name").get("name") == libvirt_guest.name
        with pytest.raises(Exception, match="failed"):
            mon.command("no-such-command")


def test_the_agent_method_through_libvirt_equals_the_ground_truth(libvirt_guest) -> None:
    manifest = libvirt_guest.manifest()
    obs = list(AgentMethod().collect(resolve_target(libvirt_guest.name)))
    assert not [o for o in obs if o.verdict == Verdict.UNVERIFIABLE], [o.data for o in obs][:3]
    procs = {o.data["pid"]: o.data for o in obs if o.kind == "process"}
    for p in _long_lived(manifest):
        assert procs[p["pid"]]["comm"] == p["comm"], p
        assert procs[p["pid"]]["exe"] == p["exe"], p
    packages = {o.data["name"]: o.data["version"] for o in obs if o.kind == "package"}
    assert packages == manifest["packages"]
    with open_agent(resolve_target(libvirt_guest.uuid), timeout=30) as agent:
        code, out, _ = agent.exec(["/bin/busybox", "cat", "/proc/sys/kernel/osrelease"])
        assert code == 0 and out.decode().strip() == manifest["kernel"]["release"]


def test_names_uuid_and_pid_resolve_to_the_same_domain(libvirt_guest) -> None:
    by_name = resolve_target(libvirt_guest.name)
    assert by_name.domain == libvirt_guest.uuid and by_name.qemu_pid == libvirt_guest.pid and by_name.live
    assert resolve_target(libvirt_guest.uuid) == by_name
    assert resolve_target(f"pid:{libvirt_guest.pid}") == by_name


def test_ps_and_scan_by_domain_name(libvirt_guest, tmp_path: Path) -> None:
    manifest = libvirt_guest.manifest()
    ps = nephoscope("ps", libvirt_guest.name, "--json", tmp_path=tmp_path)
    scan = nephoscope("scan", libvirt_guest.name, "-m", "agent,inspect,arch", "--json", tmp_path=tmp_path)
    assert "Traceback" not in ps.stderr + scan.stderr
    result = json.loads(scan.stdout)
    assert scan.returncode == 0 and result["vm"] == libvirt_guest.name
    assert {p["pid"] for p in _long_lived(manifest)} <= {p["pid"] for p in result["processes"]}
    reasons = {u["method"]: u["reason"] for u in result["unverifiable"]}
    if HAS_PROCESS_RAM:
        assert ps.returncode == 0, ps.stderr
        seen = {p["pid"]: p["comm"] for p in json.loads(ps.stdout)["processes"]}
        assert all(seen.get(p["pid"]) == p["comm"] for p in _long_lived(manifest))
    else:
        # no process RAM reader on this branch: said, with the reason, never a crash or an empty all-clear
        assert ps.returncode != 0 and "no guest RAM" in ps.stderr
        assert "arch" in reasons and "inspect" in reasons
    history = json.loads(nephoscope("history", libvirt_guest.name, "--json", tmp_path=tmp_path).stdout)
    assert [s["vm"] for s in history] == [libvirt_guest.name]


def test_scan_all_includes_the_domain(libvirt_guest, tmp_path: Path) -> None:
    got = nephoscope("scan", "--all", "-m", "inspect", "--no-store", "--json", tmp_path=tmp_path)
    out = json.loads(got.stdout)
    mine = [v for v in out["vms"] if v["vm"] == libvirt_guest.name]
    assert len(mine) == 1 and mine[0]["kind"] == "libvirt"
    assert got.returncode in (0, 1, 3, 4) and got.returncode == out["exit"]


def test_nothing_is_left_paused(libvirt_guest) -> None:
    assert _status(libvirt_guest.name) == "running"
