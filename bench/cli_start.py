"""Benchmark the whole CLI process: `nephoscope --help`, and `nephoscope ps` on a 512 MiB dump against
Volatility 3 `linux.pslist` on the same dump, in the same run (every figure is the median wall time of
separate processes, as a user would see it).

ps is measured three ways: cold (an empty kernel-model cache: full recovery from RAM, then the model is
recorded), cached (a second run on the same kernel: the record is validated against the image) and
with the cache disabled (--no-cache: full recovery, nothing written). Volatility runs with our ISF
(`nephoscope isf`), cold (an empty --cache-path each run) and warm (its cache filled by an earlier run).
Both tools print their process table; both lists of PIDs must agree.

Targets (issue 10): --help < 0.15 s; ps >= 20x faster than Volatility (goal 35x).
Usage: bench/cli_start.py [DUMP] [--guest NAME] [--runs 5] [--vol-runs 3]
  DUMP defaults to /work/dumps/clean-6.1.elf; without it, a lab guest (NAME, or a throw-away clean one)
  is dumped with QMP dump-guest-memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

SHARED_DUMP = Path("/work/dumps/clean-6.1.elf")
BIN = Path(sys.executable).parent
VOL = BIN / "vol"
TARGETS = {"help_s": 0.15, "vs_volatility": 20.0, "vs_volatility_goal": 35.0}


def nephoscope() -> list[str]:
    """Return the command line users run: the installed console script, else `python -m`."""
    script = BIN / "nephoscope"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nephoscope.cli.main"]


def timed(cmd: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Return (wall seconds, stdout) of one process; raise SystemExit if it fails."""
    start = time.perf_counter()
    run = subprocess.run(list(cmd), capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({run.returncode}): {run.stderr[-800:]}")
    return elapsed, run.stdout


def median(cmd: Sequence[str], runs: int, env: dict[str, str] | None = None,
           before: object = None) -> tuple[float, str]:
    """Return (median wall seconds over `runs`, last stdout); `before()` runs untimed before each."""
    times, out = [], ""
    for _ in range(runs):
        if callable(before):
            before()
        seconds, out = timed(cmd, env)
        times.append(seconds)
    return statistics.median(times), out


@contextlib.contextmanager
def dump_of(path: str | None, guest: str | None) -> Iterator[Path]:
    """Yield the dump to measure: `path`, the shared dump, or a fresh dump of a lab guest."""
    if path:
        yield Path(path)
        return
    if guest is None and SHARED_DUMP.exists():
        yield SHARED_DUMP
        return
    from nephoscope.hypervisor.qmp import Qmp
    from nephoscope.lab import runner

    with runner.guest_for(guest) as g, tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        dump = Path(tmp) / "guest.elf"
        with Qmp(g.qmp_socket) as qmp:
            qmp.command("dump-guest-memory", paging=False, protocol=f"file:{dump}")
        yield dump


def vol_pids(out: str) -> list[int]:
    """Return the PIDs of Volatility's pslist table (its second column; the first is the task offset)."""
    pids = []
    for line in out.splitlines():
        cols = line.split("\t")
        if len(cols) > 2 and cols[1].isdigit():
            pids.append(int(cols[1]))
    return sorted(pids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dump", nargs="?", help="memory dump (default: /work/dumps/clean-6.1.elf or a lab guest's)")
    ap.add_argument("--guest", help="dump this running lab guest instead")
    ap.add_argument("--runs", type=int, default=5, help="runs per nephoscope figure (median)")
    ap.add_argument("--vol-runs", type=int, default=3, help="runs per Volatility figure (median)")
    args = ap.parse_args()
    neph = nephoscope()
    with dump_of(args.dump, args.guest) as dump, tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base_env = {k: v for k, v in os.environ.items() if k != "NEPHOSCOPE_NO_CACHE"}
        cold_env = {**base_env, "NEPHOSCOPE_CACHE": str(tmp / "cold")}
        warm_env = {**base_env, "NEPHOSCOPE_CACHE": str(tmp / "warm")}
        ps = [*neph, "ps", str(dump)]
        timed([*neph, "ps", str(dump), "--no-cache"], warm_env)  # page cache: both tools read a hot file

        result: dict[str, object] = {"dump": str(dump), "dump_bytes": dump.stat().st_size}
        result["import_s"] = round(median([sys.executable, "-c", "import nephoscope.cli.main"], args.runs)[0], 3)
        result["help_s"] = round(median([*neph, "--help"], args.runs)[0], 3)
        cold, _ = median(ps, args.runs, cold_env, before=lambda: shutil.rmtree(tmp / "cold", ignore_errors=True))
        timed(ps, warm_env)  # records the model
        cached, table = median(ps, args.runs, warm_env)
        no_cache, _ = median([*ps, "--no-cache"], args.runs, warm_env)
        _t, listing = timed([*ps, "--json"], warm_env)
        our_pids = sorted(p["pid"] for p in json.loads(listing)["processes"])
        result.update({"ps_cold_s": round(cold, 3), "ps_cached_s": round(cached, 3),
                       "ps_no_cache_s": round(no_cache, 3), "processes": len(our_pids),
                       "ps_table_lines": len(table.splitlines())})
        if VOL.exists():
            symbols = tmp / "symbols"
            timed([*neph, "isf", str(dump), "-o", str(symbols / "linux" / "guest.json.xz")], warm_env)
            vol = [str(VOL), "-q", "--offline", "-s", str(symbols), "-f", str(dump), "linux.pslist"]
            vol_cache = tmp / "volcache"

            def fresh_vol_cache() -> None:
                shutil.rmtree(vol_cache, ignore_errors=True)
                vol_cache.mkdir()

            vol_cmd = [*vol[:3], "--cache-path", str(vol_cache), *vol[3:]]
            vol_cold, _ = median(vol_cmd, args.vol_runs, before=fresh_vol_cache)
            vol_warm, vol_out = median(vol_cmd, args.vol_runs)
            result.update({
                "volatility_pslist_cold_s": round(vol_cold, 2), "volatility_pslist_warm_s": round(vol_warm, 2),
                "same_pids_as_volatility": vol_pids(vol_out) == our_pids,
                "ratio_cold_vs_volatility_cold": round(vol_cold / cold, 1),
                "ratio_cached_vs_volatility_warm": round(vol_warm / cached, 1),
                "ratio_cold_vs_volatility_warm": round(vol_warm / cold, 1),
                "ratio_no_cache_vs_volatility_warm": round(vol_warm / no_cache, 1),
            })
        else:
            result["volatility"] = "not installed (pip install volatility3): no baseline"
        result["targets"] = TARGETS
        result["load_average"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
