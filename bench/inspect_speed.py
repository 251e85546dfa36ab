"""Benchmark inspect: cold start (detect + kallsyms + BTF), warm process list on a running guest, and
Volatility 3 `linux.pslist` (with our exported ISF) on a dump of the same guest, in one invocation.

Targets (issue): cold start < 1 s; warm process list < 20 ms live (no pause); ≥ 20× faster than
Volatility 3 cold. Usage: bench/inspect_speed.py [GUEST]   (boots a clean lab guest when none is given; the file is not
called inspect.py because a script's folder comes first on sys.path and would shadow the stdlib)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nephoscope.hypervisor.qmp import Qmp
from nephoscope.lab import runner
from nephoscope.memory.physical import open_memory
from nephoscope.os.linux.isf import export_isf
from nephoscope.os.linux.model import LinuxKernel

VOL = Path(sys.executable).parent / "vol"


def _cold(ram: Path) -> tuple[float, LinuxKernel]:
    start = time.perf_counter()
    kernel = LinuxKernel.open(open_memory(ram))
    return time.perf_counter() - start, kernel


def _vol_pslist(dump: Path, symbols: Path, cache: Path) -> float:
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run = subprocess.run([str(VOL), "-q", "--offline", "--cache-path", str(cache), "-s", str(symbols),
                          "-f", str(dump), "linux.pslist"], capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"vol failed: {run.stderr[-800:]}")
    return elapsed


def main() -> int:
    with runner.guest_for(sys.argv[1] if len(sys.argv) > 1 else None) as guest:
        name = guest.name
        colds = []
        for _ in range(3):
            seconds, kernel = _cold(guest.ram_path)
            colds.append(seconds)
        warm = []
        for _ in range(20):
            start = time.perf_counter()
            procs = kernel.processes()
            warm.append(time.perf_counter() - start)
        result: dict[str, object] = {
            "guest": name, "processes": len(procs.items),
            "cold_start_s": round(statistics.median(colds), 3),
            "detect_stages_ms": {s.name: round(s.seconds * 1000, 1) for s in kernel.report.stages},
            "warm_ps_ms": round(statistics.median(warm) * 1000, 2),
            "targets": {"cold_start_s": 1.0, "warm_ps_ms": 20.0, "vs_volatility": 20.0},
        }
        if VOL.exists():
            with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
                dump, symbols = Path(tmp) / "guest.elf", Path(tmp) / "symbols"
                with Qmp(guest.qmp_socket) as qmp:
                    qmp.command("dump-guest-memory", paging=False, protocol=f"file:{dump}")
                export_isf(kernel.btf, kernel.symbols.symbols, kernel.info.banner,
                           symbols / "linux" / "guest.json.xz", kaslr_shift=kernel.info.virt_slide)
                ours_on_dump, _ = _cold(dump)
                vol = _vol_pslist(dump, symbols, Path(tmp) / "cache")
                result.update({"ours_cold_on_dump_s": round(ours_on_dump, 3), "volatility_pslist_s": round(vol, 2),
                               "ratio_volatility_vs_ours": round(vol / (ours_on_dump + statistics.median(warm)), 1)})
        else:
            result["volatility"] = "not installed (pip install volatility3) - no baseline"
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
