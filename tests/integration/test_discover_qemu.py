"""A bare QEMU started by hand (default RAM, a QMP socket, no agent): found in /proc and named by socket or pid."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nephoscope.hypervisor.discover import discover
from nephoscope.hypervisor.monitor import open_monitor
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest


@pytest.fixture
def bare_qemu(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 missing")
    sock = tmp_path / "bare.qmp"
    # no boot media: the firmware idles; the VM runs (never paused) and has plain anonymous RAM
    proc = subprocess.Popen([qemu, "-name", "virt-bare-test", "-machine", "pc", "-accel", "tcg", "-m", "128",
                             "-display", "none", "-nodefaults", "-qmp", f"unix:{sock},server=on,wait=off",
                             "-gdb", "tcp:127.0.0.1:0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.is_socket():
                break
            time.sleep(0.05)
        yield proc, sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_bare_qemu_is_found_and_named(bare_qemu) -> None:
    proc, sock = bare_qemu
    vm = discover().find(f"pid:{proc.pid}")
    assert vm is not None and vm.kind == "qemu" and vm.name == "virt-bare-test"
    assert vm.target.qmp_socket == sock and vm.target.qemu_pid == proc.pid and vm.target.ram_path is None
    assert vm.methods["agent"] == "no guest agent channel (org.qemu.guest_agent.0)"
    assert vm.details["memory_backends"] == ["memory-backend-ram (default)"]
    for spec in (str(sock), f"pid:{proc.pid}", "virt-bare-test"):
        target = resolve_target(spec)
        assert target.qemu_pid == proc.pid and target.qmp_socket == sock, spec
    with open_monitor(resolve_target(f"pid:{proc.pid}")) as mon:
        assert mon.command("query-status")["status"] == "running"
