"""Benchmark guest RAM read from the QEMU process against the shared RAM file, in one run.

1. Bulk read: every touched page of a VM without a RAM file (pagemap + process_vm_readv, and pread on
   /proc/PID/mem) against a plain read of the same number of bytes from the data of a lab guest's shared
   RAM file. Goal: >= 0.5x the file read and >= 2 GB/s.
2. Full arch scan of the process-RAM guest against the same scan of the shared-file guest (same profile,
   same size). Goal: <= 1.5x the time.
3. Host memory of each guest before and after the scans (RssAnon+RssShmem of QEMU; `du` of the RAM file):
   it must not grow by more than 1%; and the pages of the process guest's RAM the guest touched (pagemap),
   which excludes QEMU's own heap and translation cache.

4. With --libvirt: the same arch scan of a 512 MiB libvirt TCG domain (plain RAM, monitor through libvirt)
   against the shared-file guest. Goal: <= 1.5x the time.

Usage: .venv/bin/python bench/connector.py [--file-guest NAME --proc-guest NAME] [--mem 512M] [--repeat 3]
       [--libvirt]
Without guest names it boots both (clean profile, TCG) and stops them afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from nephoscope.introspect.arch import scan_target
from nephoscope.introspect.ram import open_ram
from nephoscope.lab import runner
from nephoscope.memory.physical import RawMemory
from nephoscope.memory.process import ProcessMemory
from nephoscope.service.targets import resolve_target


def host_bytes(guest: runner.Guest) -> int:
    """Return the host memory holding the guest's RAM: the RAM file's allocated bytes, else QEMU's RSS."""
    if guest.ram_path is not None:
        return guest.ram_path.stat().st_blocks * 512
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{guest.pid}/status").read_text().splitlines())
    return sum(int(fields[k].split()[0]) << 10 for k in ("RssAnon", "RssShmem"))


def bulk_process(phys: ProcessMemory) -> tuple[int, float]:
    """Return (bytes, seconds) of reading every touched page into one reused 64 MiB buffer (pagemap included),
    the same buffer discipline as the file baseline."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    n = 0
    t = time.perf_counter()
    for gpa, size in phys.iter_touched():
        for off in range(0, size, len(buf)):
            k = min(len(buf), size - off)
            phys.read_into(view[:k], gpa + off)
            n += k
    return n, time.perf_counter() - t


def segments_process(phys: ProcessMemory) -> float:
    """Return bytes/s of iter_segments (what the RAM scans use: fresh 16 MiB views)."""
    t = time.perf_counter()
    n = sum(len(v) for _, v in phys.iter_segments())
    return n / (time.perf_counter() - t)


def bulk_file(path: Path, nbytes: int) -> tuple[int, float]:
    """Return (bytes, seconds) of a plain read of `nbytes` of the file's data extents (64 MiB reads)."""
    with RawMemory(path) as raw:
        extents = [(g, n) for g, n in raw.iter_touched()]
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    done = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        while done < nbytes:
            progressed = False
            for gpa, n in extents:
                off = 0
                while off < n and done < nbytes:
                    k = min(len(buf), n - off, nbytes - done)
                    got = os.preadv(fd, [view[:k]], gpa + off)
                    off += got
                    done += got
                    progressed = progressed or got > 0
                if done >= nbytes:
                    break
            if not progressed:
                break
        return done, time.perf_counter() - t
    finally:
        os.close(fd)


def bulk_chunks(phys: ProcessMemory, method: str, nbytes: int = 256 << 20) -> float:
    """Return bytes/s of 64 MiB reads of touched RAM with `method` (readv or mem), pagemap included."""
    reader = ProcessMemory(phys.pid, phys.regions, method=method, cache=False)
    try:
        runs = [(g, n) for g, n in reader.iter_touched() if n >= 1 << 20]
        buf = bytearray(64 << 20)
        done = 0
        t = time.perf_counter()
        for gpa, n in runs:
            for off in range(0, n, len(buf)):
                k = min(len(buf), n - off)
                reader.read_into(memoryview(buf)[:k], gpa + off)
                done += k
                if done >= nbytes:
                    break
            if done >= nbytes:
                break
        return done / (time.perf_counter() - t)
    finally:
        reader.close()


def timed_scans(name: str, kb: Path | None, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        report = scan_target(resolve_target(name), kb)
        out.append(time.perf_counter() - t)
        assert report.spaces, f"arch found no address space on {name}"
    return out


@contextlib.contextmanager
def guests(args: argparse.Namespace) -> Iterator[tuple[runner.Guest, runner.Guest]]:
    if args.file_guest and args.proc_guest:
        yield runner.get_guest(args.file_guest), runner.get_guest(args.proc_guest)
        return
    from nephoscope.lab.build import build_image
    from nephoscope.lab.profile import load_profile

    image = build_image(load_profile("clean"))
    names = (f"bench-file-{os.getpid()}", f"bench-proc-{os.getpid()}")
    try:
        a = runner.start(names[0], image, mem=args.mem)
        b = runner.start(names[1], image, mem=args.mem, ram="anon", gdb=False)
        yield a, b
    finally:
        for n in names:
            runner.stop(n, quiet=True)


def libvirt_scan(args: argparse.Namespace, file_s: float) -> dict[str, object]:
    """Boot a libvirt TCG domain (clean profile, plain RAM), time its arch scans, destroy it."""
    from nephoscope.lab import libvirt_runner
    from nephoscope.lab.build import build_image
    from nephoscope.lab.profile import load_profile

    name = f"bench-libvirt-{os.getpid()}"
    with libvirt_runner.libvirt_daemons():
        libvirt_runner.start(name, build_image(load_profile("clean")), mem=args.mem)
        try:
            runs = timed_scans(name, args.kb, args.repeat)
        finally:
            libvirt_runner.stop(name, quiet=True)
    t = statistics.median(runs)
    return {"libvirt_s": round(t, 3), "file_s": round(file_s, 3), "ratio": round(t / file_s, 2), "goal": "<= 1.5",
            "runs": [round(x, 3) for x in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file-guest")
    ap.add_argument("--proc-guest")
    ap.add_argument("--mem", default="512M")
    ap.add_argument("--kb", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--libvirt", action="store_true", help="also scan a transient libvirt domain")
    args = ap.parse_args()
    with guests(args) as (file_guest, proc_guest):
        assert file_guest.ram_path is not None and proc_guest.ram_path is None
        before = {g.name: host_bytes(g) for g in (file_guest, proc_guest)}
        phys = open_ram(resolve_target(proc_guest.name), cache=False)
        assert isinstance(phys, ProcessMemory), phys
        touched_before = phys.touched_bytes()
        try:
            n, secs = bulk_process(phys)
            segments = segments_process(phys)
            readv = bulk_chunks(phys, "readv")
            mem = bulk_chunks(phys, "mem")
        finally:
            phys.close()
        fn, fsecs = bulk_file(file_guest.ram_path, n)
        proc_bps, file_bps = n / secs, fn / fsecs
        scans_file = timed_scans(file_guest.name, args.kb, args.repeat)
        scans_proc = timed_scans(proc_guest.name, args.kb, args.repeat)
        after = {g.name: host_bytes(g) for g in (file_guest, proc_guest)}
        with open_ram(resolve_target(proc_guest.name)) as again:
            touched_after = again.touched_bytes()  # type: ignore[attr-defined]
        tf, tp = statistics.median(scans_file), statistics.median(scans_proc)
        result = {
            "bulk": {"touched_bytes": n, "process_GBps": round(proc_bps / 1e9, 2),
                     "file_GBps": round(file_bps / 1e9, 2),
                     "ratio": round(proc_bps / file_bps, 2), "goal": ">= 0.5 and >= 2 GB/s",
                     "iter_segments_GBps": round(segments / 1e9, 2),
                     "process_vm_readv_64MiB_GBps": round(readv / 1e9, 2), "proc_mem_64MiB_GBps": round(mem / 1e9, 2)},
            "arch_scan": {"file_s": round(tf, 3), "process_s": round(tp, 3), "ratio": round(tp / tf, 2),
                          "goal": "<= 1.5", "file_runs": [round(x, 3) for x in scans_file],
                          "process_runs": [round(x, 3) for x in scans_proc]},
            "host_memory": {name: {"before_MiB": before[name] >> 20, "after_MiB": after[name] >> 20,
                                   "growth_pct": round(100 * (after[name] - before[name]) / max(1, before[name]), 2)}
                            for name in before},
            "process_guest_ram_touched": {"before_MiB": touched_before >> 20, "after_MiB": touched_after >> 20},
        }
        if args.libvirt:
            result["libvirt_arch_scan"] = libvirt_scan(args, tf)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
