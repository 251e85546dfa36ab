"""Benchmark: build time of a disk profile (cold and cached) and boot-to-ready time, bare QEMU and libvirt.

Cold = `build_image(force=True)` (mmdebstrap from the host's package lists, setup, dpkg ground truth,
mke2fs -d); cached = the same call again (cache key check only). Ready = the agent answers, systemd's
`is-system-running --wait` is done, every profile unit is active and the manifest is read through the
agent. The baseline is the clean initramfs guest booted in the same run, so the ratio shows what a full
Debian system costs over the lab's busybox guests.

    python bench/lab_server.py [PROFILE] [--cold] [--libvirt]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from nephoscope.lab import libvirt_runner, runner
from nephoscope.lab.build import build_image
from nephoscope.lab.profile import load_profile


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _timed_boot(name: str, image: object, libvirt: bool) -> tuple[float, int, float]:
    """Boot, return (seconds to ready, processes in the manifest, QEMU RSS MiB); always stop the guest."""
    start = time.monotonic()
    try:
        guest = (libvirt_runner.start(name, image) if libvirt else runner.start(name, image))  # type: ignore[arg-type]
        ready = time.monotonic() - start
        return ready, len(guest.manifest()["processes"]), _rss_mib(guest.pid)
    finally:
        (libvirt_runner.stop if libvirt else runner.stop)(name, quiet=True)


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    profile = load_profile(args[0] if args else "server")
    result: dict[str, object] = {"profile": profile.name}
    if "--cold" in sys.argv:
        start = time.monotonic()
        image = build_image(profile, force=True)
        result["build_cold_s"] = round(time.monotonic() - start, 1)
        result["bootstrap_s"] = image.meta.get("bootstrap_s")
    start = time.monotonic()
    image = build_image(profile)
    result["build_cached_s"] = round(time.monotonic() - start, 2)
    result["recorded_build_s"] = image.meta.get("build_s")
    result["packages"] = len(image.meta["packages"])
    result["disk_used_mib"] = image.meta.get("disk_used_bytes", 0) >> 20
    ready, procs, rss = _timed_boot(f"bench-srv-{os.getpid()}", image, False)
    result |= {"ready_s": round(ready, 1), "processes": procs, "qemu_rss_mib": round(rss, 1)}
    if "--libvirt" in sys.argv:
        daemons = libvirt_runner.start_daemons()
        try:
            ready_lv, _p, _r = _timed_boot(f"bench-srvlv-{os.getpid()}", image, True)
            result["ready_libvirt_s"] = round(ready_lv, 1)
        finally:
            libvirt_runner.stop_daemons(daemons)
    base, _p, _r = _timed_boot(f"bench-srvbase-{os.getpid()}", build_image(load_profile("clean")), False)
    result |= {"clean_initramfs_ready_s": round(base, 1), "ratio_ready_vs_clean": round(ready / base, 2)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
