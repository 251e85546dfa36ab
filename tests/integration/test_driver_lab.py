"""The `driver` method on real guests (issue 18): nphdrv loaded at run time through the guest agent.

Each guest here is this module's own (loading a kernel module into a session guest would change what every
other test on it sees: inspect reports nphdrv's tracepoint hooks). Ground truth: the guest's own /proc read
through the agent, and the lab manifest. Power: a 50 ms process is in the driver's event log, exec and exit,
while a periodic scan (inspect, run once afterwards, as any scan at an instant outside those 50 ms) cannot
list it. Weakness: on the rootkit guest the DKOM-hidden task is missing from the driver's table (it walks the
same task list), and the comparison with inspect turns that into a `driver-view-mismatch` finding; a module
that removes the driver's probes (tests/integration/kmod_unhook) makes its events `unverifiable` (the canary).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nephoscope.core.payloads import Exec, Exit, Process
from nephoscope.core.records import Verdict
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.introspect.agent import AgentMethod
from nephoscope.introspect.driver import DriverMethod
from nephoscope.lab import runner
from nephoscope.lab.build import build_image
from nephoscope.lab.driverload import build_driver, load_driver, manifest_kernel, put_file, unload_driver
from nephoscope.lab.kmodules import build_module
from nephoscope.lab.profile import load_profile
from nephoscope.service.scan import run_scan
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest
UNHOOK_DIR = Path(__file__).parent / "kmod_unhook"


def _guest_with_driver(profile: str, kernel: str | None = None) -> Iterator[runner.Guest]:
    name = f"pt-driver-{profile}{'-' + kernel if kernel else ''}-{os.getpid() % 100000}"
    guest = runner.start(name, build_image(load_profile(profile), kernel), kaslr=True)
    try:
        ko = build_driver(manifest_kernel(guest.manifest()))
        with GuestAgent(guest.qga_socket, timeout=60) as agent:
            load_driver(agent, ko)
        yield guest
    finally:
        runner.stop(name, quiet=True)


@pytest.fixture(scope="module", params=[None, "6.12"], ids=["6.1", "6.12"])
def driver_guest(request: pytest.FixtureRequest) -> Iterator[runner.Guest]:
    """A clean guest (KASLR) with nphdrv loaded, on the default 6.1 kernel and on 6.12; stopped afterwards."""
    yield from _guest_with_driver("clean", request.param)


def _driver(guest: runner.Guest) -> list:
    return list(DriverMethod().collect(resolve_target(guest.name)))


def test_the_process_table_equals_the_guests_own_proc(driver_guest: runner.Guest) -> None:
    target = resolve_target(driver_guest.name)
    agent_obs = list(AgentMethod().collect(target))
    driver_obs = _driver(driver_guest)
    assert not [o for o in driver_obs if o.verdict == Verdict.UNVERIFIABLE], \
        [(o.key, o.reason) for o in driver_obs if o.verdict == Verdict.UNVERIFIABLE]
    assert {o.verdict for o in driver_obs} == {Verdict.REPORTED}
    agent = {o.payload.pid: o.payload for o in agent_obs if isinstance(o.payload, Process)}
    driver = {o.payload.pid: o.payload for o in driver_obs if isinstance(o.payload, Process)}
    qga = {pid for pid, p in agent.items() if p.exe.endswith("/qemu-ga")}
    # the agent's own listing processes (children of qemu-ga) exist only while each method reads
    steady_agent = {pid for pid, p in agent.items() if not p.agent_own}
    steady_driver = {pid for pid, p in driver.items() if p.ppid not in qga}
    assert steady_agent == steady_driver
    for pid in steady_driver:
        a, d = agent[pid], driver[pid]
        assert (d.exe, d.kernel_thread) == (a.exe, a.kernel_thread), pid
        # a kernel thread's /proc/PID/comm is its full name (kthread full_name, 6.1+) and, for a workqueue worker,
        # its current work ("kworker/0:0-rcu_gp"); task->comm, which the driver reads, is its first 15 bytes
        assert a.comm == d.comm or (d.kernel_thread and a.comm.startswith(d.comm)), (pid, a.comm, d.comm)
        assert d.ppid == a.ppid, pid
    # and the lab manifest: every process the guest's init reported at boot, with its executable
    for p in driver_guest.manifest()["processes"]:
        assert p["pid"] in driver and driver[p["pid"]].exe == p["exe"], p


def test_a_50ms_process_is_in_the_event_log_and_missed_by_a_periodic_scan(driver_guest: runner.Guest) -> None:
    with GuestAgent(driver_guest.qga_socket, timeout=60) as agent:
        pid = agent.call("guest-exec", path="/bin/busybox", arg=["sleep", "0.05"])["pid"]
        deadline = time.monotonic() + 60
        while not agent.call("guest-exec-status", pid=pid).get("exited"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    obs = _driver(driver_guest)
    execs = [o.payload for o in obs if isinstance(o.payload, Exec) and o.payload.pid == pid]
    exits = [o.payload for o in obs if isinstance(o.payload, Exit) and o.payload.pid == pid]
    assert [e.path for e in execs] == ["/bin/busybox"] and execs[0].comm == "busybox"
    assert len(exits) == 1 and exits[0].code == 0 and exits[0].comm == "busybox"
    assert exits[0].time is not None and execs[0].time is not None and exits[0].time >= execs[0].time
    # a periodic scan sees only what runs at its instant: the 50 ms process is gone (said so, not timed)
    inspect = run_scan(resolve_target(driver_guest.name), ["inspect"])
    assert pid not in {o.payload.pid for o in inspect.observations if isinstance(o.payload, Process)}


def test_the_driver_costs_are_its_own_kernel_accounting(driver_guest: runner.Guest) -> None:
    stats = next(o.payload.data for o in _driver(driver_guest) if o.kind == "driver-stats")
    assert stats["hooks"] == {"exec": True, "exit": True, "module": True}
    assert stats["cost"]["exec"]["count"] >= 1 and stats["cost"]["exec"]["mean_ns"] > 0
    assert stats["dropped"] == 0


def test_inspect_sees_the_driver_itself(driver_guest: runner.Guest) -> None:
    # the driver's tracepoint probes are the kernel changes it makes: static calls into nphdrv. With the guest's
    # kernel package in the default KB (6.1 here) nphdrv is unknown kernel code and inspect reports them as
    # inline hooks naming it; without it a static call into a listed module is legitimate. Never anything else.
    result = run_scan(resolve_target(driver_guest.name), ["driver", "inspect"])
    hooks = [f for f in result.view.findings if f.kind == "inline-hook"]
    assert all("nphdrv" in f.title and "__SCT__tp_func_sched_process_" in f.title for f in hooks), \
        [f.title for f in hooks]
    assert not [f for f in result.view.findings if f.kind in ("driver-view-mismatch", "hidden-process")]


def test_an_unloaded_driver_is_unverifiable(driver_guest: runner.Guest) -> None:
    with GuestAgent(driver_guest.qga_socket, timeout=60) as agent:  # the agent socket takes one client at a time
        unload_driver(agent)
    try:
        [obs] = _driver(driver_guest)
        assert obs.verdict == Verdict.UNVERIFIABLE and "not loaded" in obs.reason
    finally:
        with GuestAgent(driver_guest.qga_socket, timeout=60) as agent:
            load_driver(agent, build_driver(manifest_kernel(driver_guest.manifest())))


def test_a_driver_whose_hooks_were_removed_is_unverifiable(driver_guest: runner.Guest) -> None:
    # nph_unhook (tests/integration/kmod_unhook) removes nphdrv's tracepoint probes and leaves it loaded: its
    # files still answer and its counters still claim the hooks; the canary exec is what gives it away
    ko = build_module("nph_unhook", manifest_kernel(driver_guest.manifest()), UNHOOK_DIR)
    with GuestAgent(driver_guest.qga_socket, timeout=60) as agent:
        put_file(agent, "/tmp/nph_unhook.ko", ko)
        code, out, err = agent.exec(["/bin/sh", "-c", "insmod /tmp/nph_unhook.ko"], timeout=60)
        assert code == 0, (out, err)
    obs = _driver(driver_guest)
    events = {o.key: o.reason for o in obs if o.verdict == Verdict.UNVERIFIABLE}
    assert "canary" in events.get("events", ""), events
    stats = next(o.payload.data for o in obs if o.kind == "driver-stats")
    assert stats["hooks"]["exec"]  # the driver itself does not know: only the canary tells
    # its process table is still the kernel's: reported, not a finding
    assert [o for o in obs if o.kind == "process"]


@pytest.fixture(scope="module", params=[None, "6.12"], ids=["6.1", "6.12"])
def rootkit_driver_guest(request: pytest.FixtureRequest) -> Iterator[runner.Guest]:
    """The rootkit guest (nphrk loaded at boot) with nphdrv loaded afterwards, on 6.1 and 6.12; stopped afterwards."""
    yield from _guest_with_driver("rootkit", request.param)


def test_a_dkom_hidden_task_is_a_driver_view_mismatch(rootkit_driver_guest: runner.Guest) -> None:
    manifest = rootkit_driver_guest.manifest()
    tech = {t["id"]: t for t in manifest["techniques"]}
    dkom, fhide = tech["dkom-hidden-task"]["pid"], tech["ftrace-hidden-process"]["pid"]
    result = run_scan(resolve_target(rootkit_driver_guest.name), ["driver", "inspect"])
    driver = {o.payload.pid for o in result.observations
              if o.provenance.method == "driver" and isinstance(o.payload, Process)}
    assert dkom not in driver  # the driver walks the same task list the rootkit unlinked it from
    assert fhide in driver  # the ftrace hook hides /proc entries from userland, not tasks from the kernel
    mismatch = [f for f in result.view.findings if f.kind == "driver-view-mismatch"]
    assert [ev["pid"] for f in mismatch for ev in f.evidence] == [dkom], [f.title for f in mismatch]


def test_evaluate_scores_the_driver_and_removes_it(rootkit_driver_guest: runner.Guest) -> None:
    # last on this guest: score_driver loads nphdrv for its measurement and removes it afterwards
    from nephoscope.lab.driverload import driver_loaded
    from nephoscope.service.driver_eval import score_driver

    alone, both = score_driver(rootkit_driver_guest)
    assert (alone.method, both.method) == ("driver", "driver+inspect")
    assert alone.seen == alone.truth_processes and alone.short_lived.startswith("seen (exec+exit")
    assert alone.event_cost_ns.get("exec", 0) > 0
    assert alone.techniques["dkom-hidden-task"] == "missed" and both.techniques["dkom-hidden-task"] == "detected"
    assert "driver-view-mismatch" in both.findings
    with GuestAgent(rootkit_driver_guest.qga_socket, timeout=60) as agent:
        assert not driver_loaded(agent)
