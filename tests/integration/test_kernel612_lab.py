"""The kernel model on a second kernel version: a Debian 6.12 clean lab guest, with no per-version setup.

One guest (`--kernel 6.12`: the host's apt if it knows 6.12, else bookworm-backports through the private
apt setup) is booted for the module and checked against its own /proc and the lab manifest.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator

import pytest

from nephoscope.core.errors import KnowledgeError, LabError
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.introspect.kernel import open_kernel
from nephoscope.knowledge.debian import archive
from nephoscope.lab import runner
from nephoscope.lab.build import build_image, choose_kernel
from nephoscope.lab.profile import load_profile
from nephoscope.memory.physical import open_memory
from nephoscope.os.linux.detect import detect
from nephoscope.os.linux.model import LinuxKernel
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest
KERNEL = "6.12"
Maps = list[tuple[int, int, str, int, str]]


@pytest.fixture(scope="module")
def guest612() -> Iterator[runner.Guest]:
    try:
        chosen = choose_kernel(KERNEL, lambda _m: None)
    except (LabError, KnowledgeError) as exc:
        pytest.skip(f"the Debian {KERNEL} kernel cannot be fetched (host apt, then {', '.join(archive.EXTRA_SUITES)} "
                    f"from {archive.EXTRA_MIRROR}): {exc}")
    assert chosen.release.startswith(KERNEL + "."), chosen
    image = build_image(load_profile("clean"), KERNEL)
    name = f"pt-k612-{os.getpid() % 100000}"
    try:
        yield runner.start(name, image)
    finally:
        runner.stop(name, quiet=True)


@pytest.fixture(scope="module")
def kernel612(guest612: runner.Guest) -> Iterator[LinuxKernel]:
    with open_kernel(resolve_target(guest612.name)) as k:
        yield k


def test_detection_and_kallsyms(guest612: runner.Guest) -> None:
    phys = open_memory(guest612.ram_path)
    t0 = time.perf_counter()
    det = detect(phys)
    elapsed = time.perf_counter() - t0
    phys.close()
    assert det.report.ok, det.report.summary()
    assert det.info is not None and det.kallsyms is not None
    assert det.info.release == guest612.manifest()["kernel"]["release"]
    assert det.info.release.startswith(KERNEL + ".") and det.info.kaslr and det.info.levels == 4
    assert elapsed < 60, f"detection must end in bounded time; took {elapsed:.2f}s\n{det.report.summary()}"
    with GuestAgent(guest612.qga_socket) as agent:
        truth = read_core_kallsyms(agent)
    recovered = set(det.kallsyms.entries())
    sample = random.Random(612).sample(sorted(truth), 2000)
    assert [s for s in sample if s not in recovered] == []
    for name in ("_text", "linux_banner", "init_task", "init_pid_ns", "modules"):
        assert det.kallsyms.get(name) in {a for a, _t, n in truth if n == name}, name
    assert recovered == truth, f"{len(recovered ^ truth)} symbols differ from /proc/kallsyms"


def test_processes_equal_manifest(guest612: runner.Guest, kernel612: LinuxKernel) -> None:
    procs = kernel612.processes()
    assert procs.complete, procs.problem
    by_pid = {p.pid: p for p in procs}
    for want in guest612.manifest()["processes"]:
        got = by_pid.get(want["pid"])
        assert got is not None, f"pid {want['pid']} ({want['comm']}) missing from the task list"
        assert (got.ppid, got.comm, got.exe, got.cmdline) == (want["ppid"], want["comm"], want["exe"],
                                                               want["cmdline"]), want
    hidden = kernel612.hidden_processes()
    assert hidden.complete and hidden.items == []


def test_maps_equal_proc(guest612: runner.Guest, kernel612: LinuxKernel) -> None:
    nginx = next(p for p in guest612.manifest()["processes"] if p["tag"] == "nginx")
    task = next(p for p in kernel612.processes() if p.pid == nginx["pid"])
    vmas = kernel612.vmas(task)
    assert vmas.complete, vmas.problem
    with GuestAgent(guest612.qga_socket) as agent:
        truth = parse_maps(agent.read_file(f"/proc/{task.pid}/maps").decode())
    assert [(v.start, v.end, v.perms, v.offset, v.path) for v in vmas] == truth
    assert any(path == "[vdso]" for *_r, path in truth)


def test_modules_equal_proc_modules(guest612: runner.Guest, kernel612: LinuxKernel) -> None:
    with GuestAgent(guest612.qga_socket) as agent:
        truth = {}
        for line in agent.read_file("/proc/modules").decode().splitlines():
            parts = line.split()
            truth[parts[0]] = (int(parts[1]), int(parts[5], 16))
        builtin = agent.read_file(f"/lib/modules/{kernel612.info.release}/modules.builtin").decode()
    mods = kernel612.modules()
    assert mods.complete, mods.problem
    assert {m.name: (m.size, m.base) for m in mods} == truth
    assert "e1000" in truth  # loaded from a .ko.xz decompressed at build time
    assert "virtio_pci.ko" in builtin and "virtio_console.ko" in builtin  # built in on 6.12: no file needed
    for mod in mods:
        syms = kernel612.module_symbols(mod)
        assert syms.complete and syms.items, syms.problem


def read_core_kallsyms(agent: GuestAgent) -> set[tuple[int, str, str]]:
    """Return the core (non-module) lines of /proc/kallsyms as (address, type, name)."""
    out = set()
    for line in agent.read_file("/proc/kallsyms", limit=64 << 20).decode().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.add((int(parts[0], 16), parts[1], parts[2]))
    return out


def parse_maps(text: str) -> Maps:
    """Parse /proc/PID/maps text into (start, end, perms, offset, path)."""
    out = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        out.append((start, end, fields[1], int(fields[2], 16), fields[5].strip() if len(fields) > 5 else ""))
    return out
