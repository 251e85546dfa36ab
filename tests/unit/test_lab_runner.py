"""Runner housekeeping without a VM: stale guests of crashed QEMUs are cleaned up."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nephoscope.lab import runner


def test_stale_sockets_state_and_shared_ram_are_removed(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NEPHOSCOPE_RUN", str(tmp_path))
    name = f"stale-{os.getpid()}"
    d = tmp_path / name
    d.mkdir()
    state = {"name": name, "profile": "clean", "pid": 2**22 + 12345, "mem_mib": 256, "smp": 1, "kaslr": True,
             "accel": "tcg", "cpu": "qemu64", "gdb_port": 1, "http_port": 2, "ssh_port": 3, "image": "x",
             "started": 0.0}
    (d / "state.json").write_text(json.dumps(state))
    (d / "qmp.sock").write_text("")
    ram = Path("/dev/shm") / f"nephoscope-{name}.ram"
    ram.write_bytes(b"\0" * 4096)
    orphan = Path("/dev/shm") / f"nephoscope-orphan-{os.getpid()}.ram"
    orphan.write_bytes(b"\0")
    try:
        assert runner.load_guest(name) is not None and not runner.load_guest(name).alive()
        cleaned = runner.cleanup_stale()
        assert name in cleaned and f"orphan-{os.getpid()}" in cleaned
        assert not d.exists() and not ram.exists() and not orphan.exists()
        assert runner.list_guests() == []
    finally:
        ram.unlink(missing_ok=True)
        orphan.unlink(missing_ok=True)


def test_a_live_guest_is_never_cleaned_up_whatever_its_state_says(tmp_path, monkeypatch) -> None:
    """State written by another nephoscope version (unknown fields) or unreadable state must not make the
    run directory of a guest whose QEMU still runs look stale (it was removed once, under a test session)."""
    import subprocess
    import time

    monkeypatch.setenv("NEPHOSCOPE_RUN", str(tmp_path))
    newer, broken = f"newer-{os.getpid()}", f"broken-{os.getpid()}"
    procs = []
    try:
        for name in (newer, broken):
            d = tmp_path / name
            d.mkdir()
            # a stand-in QEMU: argv[0] qemu-system-x86_64, the guest's RAM file name in its command line
            argv0 = f"qemu-system-x86_64 mem-path=/dev/shm/nephoscope-{name}.ram,{d}"
            proc = subprocess.Popen(["bash", "-c", 'exec -a "$0" sleep 60', argv0])
            procs.append(proc)
            (d / "qemu.pid").write_text(f"{proc.pid}\n")
        state = {"name": newer, "profile": "clean", "pid": procs[0].pid, "mem_mib": 256, "smp": 1, "kaslr": True,
                 "accel": "tcg", "cpu": "qemu64", "gdb_port": 1, "http_port": 2, "ssh_port": 3, "image": "x",
                 "started": 0.0, "a_field_from_a_newer_version": True}
        (tmp_path / newer / "state.json").write_text(json.dumps(state))
        (tmp_path / broken / "state.json").write_text("{half-written")
        for name in (newer, broken):  # old enough not to be a start in progress
            os.utime(tmp_path / name, (time.time() - 3600, time.time() - 3600))
        time.sleep(0.2)  # let exec -a take effect
        guest = runner.load_guest(newer)
        assert guest is not None and guest.alive()  # unknown fields are ignored, not fatal
        assert runner.load_guest(broken) is None
        assert runner.cleanup_stale() == []
        assert (tmp_path / newer).is_dir() and (tmp_path / broken).is_dir()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert sorted(runner.cleanup_stale()) == sorted([newer, broken])  # once QEMU is gone they are stale
