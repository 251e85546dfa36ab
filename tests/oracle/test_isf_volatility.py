"""Oracle: Volatility 3's linux.pslist, driven by our ISF (guest BTF + kallsyms), lists the lab's processes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nephoscope.hypervisor.qmp import Qmp
from nephoscope.memory.physical import open_memory
from nephoscope.os.linux.isf import export_isf

VOL = Path(sys.executable).parent / "vol"

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(importlib.util.find_spec("volatility3") is None or not VOL.exists(),
                       reason="volatility3 is not installed in this venv (pip install -e '.[dev]')"),
]


def _detect():  # type: ignore[no-untyped-def]
    """Return nephoscope's zero-config detection, or skip naming what is missing."""
    for module in ("nephoscope.os.linux.kallsyms", "nephoscope.os.linux.detect"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} does not exist yet: the ISF needs symbols recovered from guest RAM")
    from nephoscope.os.linux.detect import detect

    return detect


def _dump(guest, path: Path) -> Path:  # type: ignore[no-untyped-def]
    """Write a QEMU ELF dump (with VMCOREINFO, which Volatility's Linux stacker uses) of `guest`'s RAM."""
    with Qmp(guest.qmp_socket, timeout=300) as qmp:
        qmp.command("dump-guest-memory", paging=False, protocol=f"file:{path}")
    return path


def test_volatility_pslist_with_our_isf(clean_guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    detect = _detect()
    dump = _dump(clean_guest, tmp_path / "guest.elf")
    with open_memory(dump) as memory:
        found = detect(memory)
    if found.info is None or found.kallsyms is None or found.btf is None:
        pytest.fail(f"detection failed, so there is nothing to export: {found.report.summary()}")
    symbol_dir = tmp_path / "symbols"
    (symbol_dir / "linux").mkdir(parents=True)
    export_isf(found.btf, found.kallsyms.symbols, found.info.banner, symbol_dir / "linux" / "guest.json.xz",
               kaslr_shift=found.info.virt_slide)
    cache = tmp_path / "volcache"
    cache.mkdir()
    run = subprocess.run([str(VOL), "-q", "--offline", "--cache-path", str(cache), "-s", str(symbol_dir),
                          "-f", str(dump), "-r", "json", "linux.pslist"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"vol failed ({run.returncode}): {run.stderr[-2000:]}"
    rows = json.loads(run.stdout)
    assert rows, f"vol listed no processes; stderr: {run.stderr[-2000:]}"
    listed = {row["PID"]: (row["COMM"], row["PPID"]) for row in rows}
    expected = {p["pid"]: (p["comm"], p["ppid"]) for p in clean_guest.manifest()["processes"]}
    missing = {pid: want for pid, want in expected.items() if listed.get(pid) != want}
    assert not missing, f"vol (with our ISF) disagrees with the lab manifest on pid → (comm, ppid): " \
                        f"{ {pid: (want, listed.get(pid)) for pid, want in missing.items()} }"
    assert {2} <= set(listed), "kthreadd (pid 2) missing: the task list walk stopped early"
