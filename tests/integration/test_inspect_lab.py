"""The Linux kernel model on real lab guests, checked against the guest's own /proc and the lab manifest.

Guests: clean (KASLR on), tampered (KASLR on) and clean with KASLR off (booted here, once per session).
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from nephoscope.core.errors import ConnectorError
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.introspect.kernel import open_kernel
from nephoscope.lab import runner
from nephoscope.lab.build import build_image
from nephoscope.lab.profile import load_profile
from nephoscope.memory.physical import BufferMemory, open_memory
from nephoscope.os.linux.detect import LINK_TEXT_GPA, LINK_TEXT_GVA, START_KERNEL_MAP, detect
from nephoscope.os.linux.kallsyms import load_symbol_file
from nephoscope.os.linux.model import LinuxKernel
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest
GUESTS = ["clean_guest", "tampered_guest", "clean_guest_nokaslr"]


@pytest.fixture(scope="session")
def clean_guest_nokaslr() -> Iterator[runner.Guest]:
    name = f"pt-clean-nokaslr-{os.getpid() % 100000}"
    guest = runner.start(name, build_image(load_profile("clean")), kaslr=False)
    try:
        yield guest
    finally:
        runner.stop(name, quiet=True)


@pytest.fixture(params=GUESTS)
def guest(request: pytest.FixtureRequest) -> runner.Guest:
    return request.getfixturevalue(request.param)


@pytest.fixture
def kernel(guest: runner.Guest) -> Iterator[LinuxKernel]:
    with open_kernel(resolve_target(guest.name)) as k:
        yield k


def test_detect_and_every_symbol_match_proc_kallsyms(guest: runner.Guest) -> None:
    with GuestAgent(guest.qga_socket) as agent:
        truth, module_syms = read_kallsyms(agent)
    phys = open_memory(guest.ram_path)
    t0 = time.perf_counter()
    det = detect(phys)
    elapsed = time.perf_counter() - t0
    assert det.report.ok, det.report.summary()
    assert det.info is not None and det.kallsyms is not None
    recovered = set(det.kallsyms.entries())
    assert recovered == truth, f"{len(recovered ^ truth)} symbols differ from /proc/kallsyms"
    assert module_syms  # module symbols are not in the core tables; LinuxKernel.module_symbols walks them
    info = det.info
    assert info.release == guest.manifest()["kernel"]["release"]
    assert info.kaslr == guest.kaslr
    if not guest.kaslr:
        assert info.text_gva == LINK_TEXT_GVA and info.text_gpa == LINK_TEXT_GPA and info.phys_base == 0
    assert info.levels == 4  # qemu64 has no LA57
    assert elapsed < 60, f"detection must end in bounded time; took {elapsed:.2f}s (speed: bench/inspect.py)"
    phys.close()


def test_symbol_file_alternative_finds_the_slide(clean_guest: runner.Guest, tmp_path: Path) -> None:
    with GuestAgent(clean_guest.qga_socket) as agent:
        truth, _modules = read_kallsyms(agent)
    phys = open_memory(clean_guest.ram_path)
    ref = detect(phys)
    assert ref.info is not None
    slide = ref.info.virt_slide
    system_map = tmp_path / "System.map"  # what the -dbg package ships: link-time addresses
    system_map.write_text("".join(f"{a - slide if a >= START_KERNEL_MAP else a:016x} {t} {n}\n"
                                  for a, t, n in sorted(truth)))
    det = detect(phys, symbols=load_symbol_file(system_map))
    assert det.report.ok, det.report.summary()
    assert det.info is not None
    assert replace(det.info, num_syms=0) == replace(ref.info, num_syms=0)
    phys.close()


def test_processes_match_manifest(guest: runner.Guest, kernel: LinuxKernel) -> None:
    procs = kernel.processes()
    assert procs.complete, procs.problem
    by_pid = {p.pid: p for p in procs}
    for want in guest.manifest()["processes"]:
        got = by_pid.get(want["pid"])
        assert got is not None, f"pid {want['pid']} ({want['comm']}) missing from the task list"
        assert (got.ppid, got.comm, got.exe, got.cmdline) == (want["ppid"], want["comm"], want["exe"],
                                                               want["cmdline"]), want
    assert by_pid[1].uid == 0 and not by_pid[1].kernel_thread
    assert any(p.kernel_thread for p in procs)
    threads = kernel.threads()
    assert threads.complete and len(threads) >= len(procs)


def test_cmdlines_and_maps_match_proc(guest: runner.Guest, kernel: LinuxKernel) -> None:
    procs = [p for p in kernel.processes() if not p.kernel_thread and p.comm != "qemu-ga"]
    compared = 0
    with GuestAgent(guest.qga_socket) as agent:
        for proc in procs:
            truth = read_proc(agent, proc.pid)
            if truth is None or not truth.maps:
                continue  # exited (or a zombie) since the walk
            vmas = kernel.vmas(proc)
            assert vmas.complete, vmas.problem
            assert proc.cmdline == truth.cmdline, proc.pid
            assert proc.uid == truth.uid, proc.pid
            assert proc.start_boottime_ns // 10_000_000 == truth.start_ticks, proc.pid
            assert [(v.start, v.end, v.perms, v.offset, v.path) for v in vmas] == truth.maps, proc.pid
            compared += 1
    assert compared >= 10


def test_open_files_match_proc(guest: runner.Guest, kernel: LinuxKernel) -> None:
    init = next(p for p in kernel.processes() if p.pid == 1)
    mine = {f.fd: f.path for f in kernel.files(init)}
    script = "for f in /proc/1/fd/*; do echo ${f##*/} $(readlink $f); done"
    with GuestAgent(guest.qga_socket) as agent:
        rc, out, _err = agent.exec(["/bin/busybox", "sh", "-c", script])
    assert rc == 0
    truth = {int(fd): path for fd, path in (line.split(" ", 1) for line in out.decode().splitlines())}
    assert mine == truth


def test_modules_match_proc_modules(guest: runner.Guest, kernel: LinuxKernel) -> None:
    with GuestAgent(guest.qga_socket) as agent:
        truth = read_modules(agent)
        _core, module_syms = read_kallsyms(agent)
    mods = kernel.modules()
    assert mods.complete, mods.problem
    assert {m.name: (m.size, m.base) for m in mods} == truth
    assert {"e1000", "virtio_pci", "virtio_console"} <= set(truth)
    mine = set()
    for mod in mods:
        syms = kernel.module_symbols(mod)
        assert syms.complete, syms.problem
        mine |= {(addr, kind.lower(), name, mod.name) for addr, kind, name in syms}
    assert mine == module_syms


def test_task_list_and_pid_idr_agree(kernel: LinuxKernel) -> None:
    hidden = kernel.hidden_processes()
    assert hidden.complete, hidden.problem
    assert hidden.items == []  # the lab hides with LD_PRELOAD, not DKOM: both kernel views agree


def test_tampered_techniques_visible(tampered_guest: runner.Guest) -> None:
    phys = open_memory(tampered_guest.ram_path)
    kernel = LinuxKernel.open(phys)
    by_pid = {p.pid: p for p in kernel.processes()}
    techniques = {t["id"]: t for t in tampered_guest.manifest()["techniques"]}
    hidden = by_pid[techniques["preload-hidden"]["pid"]]
    assert hidden.exe == "/usr/bin/python3.11"  # hidden from /proc readers, not from the kernel
    assert by_pid[techniques["fileless-memfd"]["pid"]].exe.startswith("/memfd:")
    assert by_pid[techniques["deleted-binary"]["pid"]].exe.endswith(" (deleted)")
    victim = by_pid[techniques["code-injection"]["pid"]]
    assert any(v.perms == "rwxp" and not v.path for v in kernel.vmas(victim))
    phys.close()


# --- ground truth: the guest's own /proc through the guest agent ----------------------------------


@dataclass(frozen=True, slots=True)
class ProcTruth:
    """What the guest's /proc says about one pid."""

    pid: int
    cmdline: list[str]
    maps: list[tuple[int, int, str, int, str]]  # start, end, perms, offset, path
    uid: int
    start_ticks: int  # /proc/PID/stat field 22, in USER_HZ (100) ticks since boot


def read_kallsyms(agent: GuestAgent) -> tuple[set[tuple[int, str, str]], set[tuple[int, str, str, str]]]:
    """Return /proc/kallsyms as core (address, type, name) and module (address, type, name, module) sets."""
    core, modules = set(), set()
    for line in agent.read_file("/proc/kallsyms", limit=64 << 20).decode().splitlines():
        parts = line.split()
        if len(parts) > 3:  # the type's case says "exported"; compare it case-insensitively
            modules.add((int(parts[0], 16), parts[1].lower(), parts[2], parts[3].strip("[]")))
        elif len(parts) == 3:
            core.add((int(parts[0], 16), parts[1], parts[2]))
    return core, modules


def read_modules(agent: GuestAgent) -> dict[str, tuple[int, int]]:
    """Return name -> (size, core base address) from /proc/modules."""
    out = {}
    for line in agent.read_file("/proc/modules").decode().splitlines():
        parts = line.split()
        out[parts[0]] = (int(parts[1]), int(parts[5], 16))
    return out


def parse_maps(text: str) -> list[tuple[int, int, str, int, str]]:
    """Parse /proc/PID/maps text."""
    out = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        path = fields[5].strip() if len(fields) > 5 else ""
        out.append((start, end, fields[1], int(fields[2], 16), path))
    return out


def read_proc(agent: GuestAgent, pid: int) -> ProcTruth | None:
    """Return /proc/PID truth, or None if the process is gone."""
    with contextlib.suppress(ConnectorError):
        raw = agent.read_file(f"/proc/{pid}/cmdline")
        parts = raw.split(b"\0")
        while parts and not parts[-1]:
            parts.pop()
        maps = parse_maps(agent.read_file(f"/proc/{pid}/maps").decode())
        status = agent.read_file(f"/proc/{pid}/status").decode()
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        stat = agent.read_file(f"/proc/{pid}/stat").decode().rsplit(")", 1)[1].split()
        return ProcTruth(pid, [p.decode(errors="backslashreplace") for p in parts], maps, uid, int(stat[19]))
    return None


def test_dkom_unlinked_task_is_reported_hidden(tampered_guest: runner.Guest) -> None:
    ram = bytearray(tampered_guest.ram_path.read_bytes())  # a private copy we can tamper with
    kernel = LinuxKernel.open(BufferMemory(ram))
    victim = next(p for p in kernel.processes() if p.comm == "backdoor")
    link = victim.gva + kernel.off["task_struct.tasks"]
    nxt, prv = struct.unpack("<QQ", kernel.read(link, 16))
    # what a rootkit's list_del() does: prev->next = next, next->prev = prev
    struct.pack_into("<Q", ram, kernel.kernel.translate(prv), nxt)
    struct.pack_into("<Q", ram, kernel.kernel.translate(nxt + 8), prv)
    kernel.kernel.flush()
    procs = kernel.processes()
    assert procs.complete and victim.pid not in {p.pid for p in procs}
    hidden = kernel.hidden_processes()
    assert hidden.complete, hidden.problem
    assert [(h.pid, h.in_task_list, h.in_pid_idr, h.comm) for h in hidden] == [(victim.pid, False, True, "backdoor")]


def test_truncated_and_garbled_images_fail_cleanly(tampered_guest: runner.Guest) -> None:
    ram = bytearray(tampered_guest.ram_path.read_bytes())
    det = detect(BufferMemory(ram))
    assert det.kallsyms is not None and det.kallsyms.layout is not None and det.info is not None
    lay = det.kallsyms.layout
    cut = detect(BufferMemory(bytes(ram[:lay.names_gpa + lay.names_size // 2])))  # a dump cut mid-table
    assert cut.info is None and not cut.report.ok
    ram[lay.markers_gpa + 8: lay.markers_gpa + 64] = b"\xff" * 56  # garbled markers in the live copy
    struct.pack_into("<Q", ram, det.info.kernel_gpa(det.kallsyms.get("phys_base")), 0)
    t0 = time.perf_counter()
    garbled = detect(BufferMemory(ram))
    assert time.perf_counter() - t0 < 30
    assert garbled.info is None
    assert any(s.name in ("kallsyms", "phys/virt base") and not s.ok for s in garbled.report.stages)
