"""The agent and checkpoint methods on real lab guests, against the lab's ground truth."""

from __future__ import annotations

import pytest

from nephoscope.core.records import Verdict
from nephoscope.hypervisor.qmp import Qmp
from nephoscope.introspect.agent import AgentMethod
from nephoscope.introspect.checkpoint import CheckpointMethod
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest


def _long_lived(manifest: dict) -> list[dict]:
    return [p for p in manifest["processes"] if not (p["comm"] == "sleep" and p["cmdline"][-1:] == ["3600"])]


def test_agent_reports_what_the_guest_claims_and_is_fooled_by_preload(tampered_guest) -> None:
    manifest = tampered_guest.manifest()
    obs = list(AgentMethod().collect(resolve_target(tampered_guest.name)))
    procs = {o.data["pid"]: o for o in obs if o.kind == "process"}
    assert all(o.verdict == Verdict.REPORTED for o in procs.values())
    hidden = next(t["pid"] for t in manifest["techniques"] if t["id"] == "preload-hidden")
    assert hidden not in procs  # the ld.so.preload rootkit hides it from the guest's own tools
    for p in _long_lived(manifest):
        if p["pid"] != hidden:
            assert procs[p["pid"]].data["comm"] == p["comm"], p
            assert procs[p["pid"]].data["exe"] == p["exe"]
    packages = {o.data["name"]: o.data["version"] for o in obs if o.kind == "package"}
    assert packages == manifest["packages"]
    modules = {o.data["name"] for o in obs if o.kind == "module"}
    assert {"e1000", "virtio_console"} <= modules


def test_agent_that_is_unreachable_is_unverifiable_not_all_clear(clean_guest) -> None:
    target = resolve_target(clean_guest.name)
    with Qmp(clean_guest.qmp_socket) as qmp:
        qmp.command("stop")
        try:
            obs = list(AgentMethod(timeout=3).collect(target))
        finally:
            qmp.command("cont")
    assert not [o for o in obs if o.kind == "process"]
    assert [o for o in obs if o.verdict == Verdict.UNVERIFIABLE and o.key == "processes"]


def test_checkpoint_pauses_briefly_and_resumes(clean_guest) -> None:
    method = CheckpointMethod()
    obs = list(method.collect(resolve_target(clean_guest.name)))
    snap = next(o for o in obs if o.kind == "checkpoint")
    assert snap.data["bytes"] == clean_guest.mem_mib * 2**20
    assert snap.data["vcpu_cr3"] and all(0 < c < 2**52 for c in snap.data["vcpu_cr3"])
    assert 0 < method.last_stats["pause_s"] == pytest.approx(snap.data["pause_s"], abs=1e-3)
    with Qmp(clean_guest.qmp_socket) as qmp:
        assert qmp.command("query-status")["running"] is True
    assert not list(clean_guest.ram_path.parent.glob(f"nephoscope-ckpt-{clean_guest.name}-*"))


def test_rollback_runs_the_agent_in_a_throwaway_clone(clean_guest) -> None:
    manifest = clean_guest.manifest()
    method = CheckpointMethod(rollback=True)
    obs = list(method.collect(resolve_target(clean_guest.name)))
    in_clone = {o.data["pid"]: o for o in obs if o.kind == "process" and o.data.get("analysis") == "agent-in-clone"}
    assert all(o.provenance.method == "checkpoint" for o in in_clone.values())
    for p in _long_lived(manifest):
        assert in_clone[p["pid"]].data["comm"] == p["comm"]
    assert method.last_stats["pause_s"] > 0 and method.last_stats["clone_start_s"] > 0
    with Qmp(clean_guest.qmp_socket) as qmp:
        assert qmp.command("query-status")["running"] is True
    assert not list(clean_guest.ram_path.parent.glob(f"nephoscope-clone-{clean_guest.name}-*"))


def test_clone_is_isolated_from_the_original(clean_guest) -> None:
    from nephoscope.hypervisor.clone import Clone, clone_argv, new_workdir, qemu_argv, save_device_state
    from nephoscope.hypervisor.qga import GuestAgent
    from nephoscope.introspect.checkpoint import PreparedCopy

    work = new_workdir(clean_guest.name)
    prepared = PreparedCopy(clean_guest.ram_path, work / "ram")
    with Qmp(clean_guest.qmp_socket) as qmp:
        qmp.command("stop")
        try:
            prepared.copy()
            save_device_state(qmp, work / "state")
        finally:
            qmp.command("cont")
    prepared.close()
    argv = clone_argv(qemu_argv(clean_guest.pid), work, work / "ram")
    assert "-gdb" not in argv and not any("hostfwd" in a for a in argv)
    with Clone(argv, work, work / "state") as clone:
        clone.wait_agent()
        with GuestAgent(clone.qga_socket, timeout=30) as agent:
            assert agent.exec(["/bin/sh", "-c", "echo clone > /tmp/clone-marker"])[0] == 0
            assert agent.read_file("/tmp/clone-marker") == b"clone\n"
    with GuestAgent(clean_guest.qga_socket, timeout=30) as agent:
        code, _, _ = agent.exec(["/bin/sh", "-c", "test -e /tmp/clone-marker"])
    assert code == 1
    assert not work.exists()
