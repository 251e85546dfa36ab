"""Guest RAM from the QEMU process on real guests started as a provider starts them: plain `-m` (anonymous
RAM, no RAM file, no gdbstub), more than 4 GiB (RAM split around the PCI hole) and memfd.

On each: `ps` equals the lab manifest, arch identifies the same binaries and versions as on the shared-file
guest, the host's memory for the guest does not grow by more than 1% during a full scan, nothing is left
paused; checkpoint copies touched RAM out of the process; watch starts a gdbstub on demand and removes it,
also when the watcher is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nephoscope.hypervisor.qemu import parse_xp
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.hypervisor.qmp import Qmp
from nephoscope.introspect.arch import Image, main_image, scan_target
from nephoscope.introspect.checkpoint import CheckpointMethod
from nephoscope.introspect.kernel import open_kernel
from nephoscope.introspect.ram import open_ram
from nephoscope.lab import runner
from nephoscope.memory.physical import RawMemory
from nephoscope.memory.process import ProcessMemory
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest
PROCESS_GUESTS = ["bare_guest", "big_guest", "memfd_guest", "hugetlb_guest"]


@pytest.fixture(params=PROCESS_GUESTS)
def guest(request: pytest.FixtureRequest) -> runner.Guest:
    return request.getfixturevalue(request.param)


def _running(guest: runner.Guest) -> bool:
    with Qmp(guest.qmp_socket) as qmp:
        return bool(qmp.command("query-status")["running"])


def host_bytes(guest: runner.Guest) -> int:
    """Return the host memory that holds the guest's RAM: the RAM file's (or memfd's) blocks, else QEMU's
    anon+shmem RSS."""
    if guest.ram_path is not None:
        return guest.ram_path.stat().st_blocks * 512
    if guest.ram == "memfd":  # our own mapping of the memfd would not show in QEMU's RSS: count its blocks
        with open_ram(resolve_target(guest.name)) as phys:
            return os.stat(phys.source).st_blocks * 512  # type: ignore[attr-defined]
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{guest.pid}/status").read_text().splitlines())
    if guest.ram == "hugetlb":  # huge pages are not in RSS
        return int(fields["HugetlbPages"].split()[0]) << 10
    return sum(int(fields[k].split()[0]) << 10 for k in ("RssAnon", "RssShmem"))


Identity = tuple[str, tuple[tuple[str, str], ...]]


def _identified(guest: runner.Guest) -> tuple[set[Identity], set[Identity]]:
    """Return (main programs, every image) arch identified, each as (path, sorted (package, version))."""
    report = scan_target(resolve_target(guest.name))
    assert report.problem == "", report.problem
    mains = {(m.path, tuple(sorted(m.versions))) for sp in report.spaces
             if isinstance(m := main_image(sp.images, sp.unknown), Image)}
    return mains, {(im.path, tuple(sorted(im.versions))) for sp in report.spaces for im in sp.images}


def test_the_target_has_no_ram_file_and_reads_from_the_process(guest: runner.Guest) -> None:
    vm = resolve_target(guest.name)
    assert vm.ram_path is None and vm.qemu_pid == guest.pid and vm.gdb_port is None
    with open_ram(vm) as phys:
        if guest.ram == "memfd":  # the proven mapping's own file: zero-copy reads, holes skipped
            assert isinstance(phys, RawMemory) and phys.source.startswith(f"/proc/{guest.pid}/map_files/")
            assert phys.holes
        else:
            assert isinstance(phys, ProcessMemory)
        assert sum(e - s for s, e in phys.ranges) == guest.mem_mib << 20
        # spot checks against the monitor at every range, where the guest wrote something
        with Qmp(guest.qmp_socket) as qmp:
            for start, end in phys.ranges:
                checked = 0
                for gpa, size in phys.iter_touched():
                    if not start <= gpa < end or checked >= 3:
                        continue
                    data = phys.read(gpa, min(size, 1 << 16))
                    nz = next((o for o in range(0, len(data), 16) if any(data[o: o + 16])), None)
                    if nz is None:
                        continue
                    theirs = parse_xp(qmp.hmp(f"xp /2gx {gpa + nz:#x}"))
                    assert theirs in (data[nz: nz + 16], phys.read(gpa + nz, 16)), hex(gpa + nz)
                    checked += 1
                assert checked or start >= 1 << 32, f"no touched page checked in {start:#x}-{end:#x}"
    assert _running(guest)


def test_big_guest_ram_is_split_around_the_pci_hole(big_guest: runner.Guest) -> None:
    with open_ram(resolve_target(big_guest.name)) as phys:
        assert isinstance(phys, ProcessMemory)
        assert phys.ranges == [(0, 0xC0000000), (0x100000000, 0x160000000)]
        assert [r.block_offset for r in phys.regions] == [0, 0xC0000000]
        assert phys.regions[1].hva == phys.regions[0].hva + 0xC0000000  # one block, one mapping


def test_ps_matches_manifest(guest: runner.Guest) -> None:
    with open_kernel(resolve_target(guest.name)) as kernel:
        procs = kernel.processes()
    assert procs.complete, procs.problem
    by_pid = {p.pid: p for p in procs}
    for want in guest.manifest()["processes"]:
        got = by_pid.get(want["pid"])
        assert got is not None, f"pid {want['pid']} ({want['comm']}) missing from the task list"
        assert (got.ppid, got.comm, got.exe, got.cmdline) == (want["ppid"], want["comm"], want["exe"],
                                                               want["cmdline"]), want
    assert _running(guest)


def test_arch_identifies_what_it_identifies_on_the_shared_file_guest(guest: runner.Guest, clean_guest: runner.Guest,
                                                                     default_kb: None) -> None:
    assert clean_guest.ram_path is not None
    for attempt in range(3):  # guests booted side by side under load may still fault library pages in
        mains_file, on_file = _identified(clean_guest)
        mains_process, on_process = _identified(guest)
        print(f"{guest.name}: only here {sorted(on_process - on_file)}; only on the file guest "
              f"{sorted(on_file - on_process)}")
        if mains_process == mains_file and len(on_process ^ on_file) <= 2:
            break
        time.sleep(5 * (attempt + 1))
    assert mains_file, "the shared-file guest identified nothing"
    assert mains_process == mains_file, (sorted(mains_process - mains_file), sorted(mains_file - mains_process))
    # a library page the guest has not (yet) faulted in on one of the two guests is not there to identify
    assert len(on_process ^ on_file) <= 2, (sorted(on_process - on_file), sorted(on_file - on_process))
    installed = guest.manifest()["packages"]
    for _path, versions in on_process:
        assert any(installed.get(p) == v for p, v in versions), versions
    assert _running(guest) and _running(clean_guest)


@pytest.mark.parametrize("which", ["big_guest", "memfd_guest", "hugetlb_guest", "fresh_file_guest"])
def test_a_full_scan_does_not_inflate_the_guest_on_the_host(which: str, request: pytest.FixtureRequest,
                                                            default_kb: None) -> None:
    guest: runner.Guest = request.getfixturevalue(which)
    vm = resolve_target(guest.name)
    with open_ram(vm) as phys:
        touched = sum(n for _, n in phys.iter_touched())  # type: ignore[attr-defined]
        assert isinstance(phys, ProcessMemory if guest.ram in ("anon", "hugetlb") else RawMemory)
    assert touched < (guest.mem_mib << 20) // 2, "the guest should have touched little of its RAM"
    # A freshly booted guest still faults its own pages in: the operator pauses it, so that only the scan
    # could make the host's memory grow; the scan must leave it paused (the run state the operator had).
    with Qmp(guest.qmp_socket) as qmp:
        qmp.command("stop")
    try:
        with open_ram(vm) as phys:
            touched = sum(n for _, n in phys.iter_touched())  # type: ignore[attr-defined]
        before = host_bytes(guest)
        scan_target(vm, pause=True)
        with open_kernel(vm) as kernel:
            assert kernel.processes().complete
        after = host_bytes(guest)
        with open_ram(vm) as phys:
            touched_after = sum(n for _, n in phys.iter_touched())  # type: ignore[attr-defined]
        assert not _running(guest), "the scan resumed a guest its operator had paused"
    finally:
        with Qmp(guest.qmp_socket) as qmp:
            qmp.command("cont")
    print(f"{guest.name}: host memory {before >> 20} MiB -> {after >> 20} MiB, guest RAM touched "
          f"{touched >> 20} -> {touched_after >> 20} MiB, configured {guest.mem_mib} MiB")
    assert after <= before * 1.01, (before, after)
    assert touched_after <= touched * 1.01, (touched, touched_after)  # the RAM itself, without QEMU's own heap


def test_checkpoint_copies_ram_out_of_the_process(bare_guest: runner.Guest, tmp_path: Path) -> None:
    vm = resolve_target(bare_guest.name)
    before = host_bytes(bare_guest)
    method = CheckpointMethod(rollback=True, keep_copy=tmp_path / "copy.ram")
    obs = list(method.collect(vm))
    snap = next(o for o in obs if o.kind == "checkpoint")
    assert snap.data["ram_from"] == "QEMU process" and 0 < snap.data["pause_s"] < 30
    assert 0 < snap.data["bytes_copied"] < snap.data["bytes"]
    clone = next(o for o in obs if o.key == "agent-in-clone")
    assert clone.verdict.value == "unverifiable" and "QEMU process" in clone.reason
    procs = {o.data["pid"]: o.data for o in obs if o.kind == "process" and o.data.get("analysis") == "inspect"}
    for want in bare_guest.manifest()["processes"]:
        assert procs[want["pid"]]["exe"] == want["exe"], want
    assert any(o.kind == "image" or o.data.get("analysis") == "arch" for o in obs)
    assert _running(bare_guest)
    assert host_bytes(bare_guest) <= before * 1.01


def _gdb_chardev(guest: runner.Guest) -> str:
    with Qmp(guest.qmp_socket) as qmp:
        return "\n".join(line for line in qmp.hmp("info chardev").splitlines() if line.startswith("gdb:"))


def _start_watch(guest: runner.Guest) -> tuple[subprocess.Popen, dict[str, Any]]:
    proc = subprocess.Popen([sys.executable, "-m", "nephoscope.cli.main", "watch", guest.name, "--json", "--no-store",
                             "--events", "exec"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"watcher exited: {proc.stderr.read() if proc.stderr else ''}")
    return proc, json.loads(line)["ready"]


def _exec_true(guest: runner.Guest) -> None:
    with GuestAgent(guest.qga_socket, timeout=120) as agent:
        rc, _out, err = agent.exec(["/bin/sh", "-c", "/bin/true"], timeout=120)
    assert rc == 0, err


def test_watch_starts_a_gdbstub_on_demand_and_removes_it(bare_guest: runner.Guest) -> None:
    assert bare_guest.gdb_port == 0 and _gdb_chardev(bare_guest) == ""
    proc, ready = _start_watch(bare_guest)
    try:
        assert ready["gdbstub"].startswith("on demand at 127.0.0.1:")
        assert _gdb_chardev(bare_guest), "the on-demand gdbstub is listening"
        _exec_true(bare_guest)
        time.sleep(1)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    paths = [e["event"]["detail"].get("path") for e in events if "event" in e and e["event"]["kind"] == "exec"]
    assert "/bin/true" in paths, (paths, err[-500:])
    assert _gdb_chardev(bare_guest) == "", "the gdbstub was removed"
    assert _running(bare_guest)


def test_a_killed_watcher_leaves_no_gdbstub_and_a_running_guest(bare_guest: runner.Guest) -> None:
    proc, _ = _start_watch(bare_guest)
    _exec_true(bare_guest)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (_gdb_chardev(bare_guest) or not _running(bare_guest)):
        time.sleep(0.5)  # the guard detaches and removes the stub once it sees its parent gone
    assert _gdb_chardev(bare_guest) == ""
    assert _running(bare_guest)
    _exec_true(bare_guest)  # no breakpoint left behind: the guest still runs programs
