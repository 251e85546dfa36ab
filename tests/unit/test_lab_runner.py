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
