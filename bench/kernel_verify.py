"""Benchmark kernel-code verification against plain page hashing of the same pages, in the same run.

Verification: the whole kernel text and every module's text, KASLR relocations and every patch-site table
applied and checked (introspect.kernelcode.verify_kernel, kernel model already open). Baseline: read every
page those images cover through the kernel page tables and SHA-256 it (what identifying user code costs),
with no normalisation. The ratio says what normalisation costs on top of hashing.

Usage: .venv/bin/python bench/kernel_verify.py [--ram /work/dumps/clean-6.1.elf] [--kb PATH] [--repeat 3]
(the KB must hold the guest's linux-image package: `nephoscope kb add linux-image-RELEASE`).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

from nephoscope.introspect.kernelcode import KernelCodeReport, verify_kernel
from nephoscope.knowledge.binaries import CodePageDB
from nephoscope.memory.physical import open_memory
from nephoscope.os.linux.model import LinuxKernel

PAGE = 4096


def _hash_pages(k: LinuxKernel, report: KernelCodeReport) -> tuple[float, int]:
    """Return (seconds, pages) to read and SHA-256 every page of the verified images (no normalisation)."""
    pages = [p for im in report.images if im.kind != "bpf" for a, b in im.ranges for p in range(a, b, PAGE)]
    space, read = k.kernel, k.kernel.phys.read
    t = time.perf_counter()
    for gva in pages:
        hashlib.sha256(read(space.translate(gva), PAGE)).digest()
    return time.perf_counter() - t, len(pages)


def main() -> None:
    """Run the benchmark and print times and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram", type=Path, default=Path("/work/dumps/clean-6.1.elf"))
    ap.add_argument("--kb", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    phys = open_memory(args.ram)
    db = CodePageDB.open(args.kb)
    try:
        t = time.perf_counter()
        k = LinuxKernel.open(phys)
        model = time.perf_counter() - t
        verify, hashing = [], []
        report = None
        for _ in range(args.repeat):
            k.kernel.flush()
            t = time.perf_counter()
            report = verify_kernel(k, db.kernel_store())
            verify.append(time.perf_counter() - t)
            k.kernel.flush()
            seconds, pages = _hash_pages(k, report)
            hashing.append(seconds)
        assert report is not None
    finally:
        db.close()
    v, h = statistics.median(verify), statistics.median(hashing)
    print(f"kernel {report.release}: model open {model:.2f} s (once, shared with every kernel walk)")
    for im in report.images:
        print(f"  {im.name:24} {im.status:13} {im.pages_verified}/{im.pages} pages  {im.reason[:80]}")
    print(f"verify (normalised, {pages} pages of {len(report.images)} images): {v:.3f} s median of {args.repeat}")
    print(f"hash the same pages (no normalisation):                  {h:.3f} s median of {args.repeat}")
    print(f"ratio verify / hash: {v / h:.1f}x  ({pages / v:.0f} pages/s verified, {pages / h:.0f} pages/s hashed)")


if __name__ == "__main__":
    main()
