"""Benchmark: time from `lab up` to ready and host memory of a lab guest, against a bare kernel boot.

The baseline is the same kernel booting to its first console line with an empty initramfs in the
same invocation, so the ratio shows what the lab's userland adds. Target: ready in under 15 s (TCG).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nephoscope.lab import runner
from nephoscope.lab.build import build_image
from nephoscope.lab.profile import load_profile


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _bare_kernel_boot(kernel: Path) -> float:
    """Boot the kernel with no initramfs until it panics (no root); return seconds."""
    start = time.monotonic()
    subprocess.run(["qemu-system-x86_64", "-accel", "tcg", "-m", "512M", "-kernel", str(kernel),
                    "-append", "console=ttyS0 panic=-1 loglevel=4", "-display", "none", "-no-reboot",
                    "-serial", "null", "-monitor", "none", "-nodefaults"], timeout=120, check=False)
    return time.monotonic() - start


def main() -> int:
    profile = sys.argv[1] if len(sys.argv) > 1 else "clean"
    image = build_image(load_profile(profile))
    baseline = _bare_kernel_boot(image.kernel)
    name = f"bench-boot-{os.getpid()}"
    start = time.monotonic()
    guest = runner.start(name, image)
    ready = time.monotonic() - start
    try:
        rss = _rss_mib(guest.pid)
    finally:
        runner.stop(name, quiet=True)
    result = {"profile": profile, "ready_s": round(ready, 2), "bare_kernel_to_panic_s": round(baseline, 2),
              "ratio_ready_vs_bare_kernel": round(ready / baseline, 2), "qemu_rss_mib": round(rss, 1),
              "target_ready_s": 15, "meets_target": ready < 15}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
