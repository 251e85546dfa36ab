"""Benchmark vulnerable-code matching of a full clean-guest scan against the vulnerability DB.

Usage: .venv/bin/python bench/vulns.py [--db PATH] [--repeat 20]
The scan is what a perfect `arch` method sees on the clean lab image: every service's executable and
its shared-library closure, identified at the image's package versions, plus dpkg's package list.
The baseline, measured in the same run, compares every record of the DB with python-debian's Version.
"""

from __future__ import annotations

import argparse
import io
import shlex
import time
from pathlib import Path

from debian.debian_support import Version
from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from nephoscope.analysis.merge import BinaryView, ProcessView, ScanView
from nephoscope.analysis.vulnerable import Installed, vulnerable_findings
from nephoscope.core.paths import cache_root
from nephoscope.knowledge.debian import archive
from nephoscope.knowledge.feeds import source_of
from nephoscope.knowledge.vulns import VulnDB, VulnRecord
from nephoscope.lab.build import Image, build_image
from nephoscope.lab.profile import load_profile

LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib", "/usr/lib64")


def _unpacked(image: Image, package: str) -> Path:
    version = image.meta["packages"][package]
    deb = archive.download(package, version, cache_root() / "debs")
    return archive.unpack(deb, cache_root() / "unpacked")


def _file(image: Image, guest_path: str) -> bytes | None:
    owner = image.owner_of(guest_path)
    if owner is None:
        return None
    root = _unpacked(image, owner[0]) / "root"
    rel = guest_path.lstrip("/")
    for cand in (rel, rel.removeprefix("usr/")):
        p = root / cand
        if p.exists():
            return p.read_bytes()
    return None


def _needed(data: bytes) -> list[str]:
    try:
        dyn = next((s for s in ELFFile(io.BytesIO(data)).iter_sections() if isinstance(s, DynamicSection)), None)
    except (ELFError, ValueError):
        return []
    return [t.needed for t in dyn.iter_tags() if t.entry.d_tag == "DT_NEEDED"] if dyn is not None else []


def closure(image: Image, exe: str) -> list[str]:
    """Return `exe` and the guest paths of every shared library it loads (DT_NEEDED, transitively)."""
    out, queue = [], [exe]
    while queue:
        path = queue.pop(0)
        if path in out:
            continue
        data = _file(image, path)
        if data is None:
            continue
        out.append(path)
        for lib in _needed(data):
            hit = next((f"{d}/{lib}" for d in LIB_DIRS if image.owner_of(f"{d}/{lib}")), None)
            if hit:
                queue.append(hit)
    return out


def lab_processes(image: Image) -> list[tuple[int, str, str]]:
    """Return (pid, comm, exe) of the processes the image's services start (nginx: master + 2 workers)."""
    out: list[tuple[int, str, str]] = []
    for svc in image.meta["services"]:
        exe = svc.get("binary") or shlex.split(svc["command"])[0]
        exe = "/usr" + exe if exe.startswith(("/bin/", "/sbin/")) else exe
        count = 3 if exe.endswith("/nginx") else 1
        out += [(100 + len(out) + i, Path(exe).name[:15], exe) for i in range(count)]
    return out


def lab_view(image: Image, processes: list[tuple[int, str, str]] | None = None) -> ScanView:
    """Return the ScanView a perfect `arch` method would produce for the image's processes."""
    procs: dict[int, ProcessView] = {}
    bins: dict[str, BinaryView] = {}
    for pid, comm, exe in processes or lab_processes(image):
        view = procs[pid] = ProcessView(pid, comm, exe, seen_by={"arch": "verified"}, verdict="verified")
        for path in closure(image, exe):
            pkg, ver = image.owner_of(path) or ("", "")
            bv = bins.setdefault(path, BinaryView(path, pkg, [ver], {"arch"}))
            bv.pids.add(pid)
            view.binaries.append({"path": path, "package": pkg, "versions": [ver], "status": "identified"})
    return ScanView(procs, bins, [], [], ["arch"])


def lab_installed(image: Image) -> dict[str, Installed]:
    """Return the image's packages as the agent reports them from dpkg status (with source packages)."""
    out = {}
    for name, version in image.meta["packages"].items():
        control = (_unpacked(image, name) / "control" / "control").read_text("utf-8", "replace")
        out[name] = Installed(name, version, source_of(control)[1])
    return out


def naive(records: list[VulnRecord], installed: dict[str, Installed]) -> int:
    """Count (package, CVE) pairs by comparing every record with every package (python-debian order)."""
    hits = set()
    for pkg in installed.values():
        have = Version(pkg.version)
        for r in records:
            if r.source == pkg.source and (r.fixed is None or have < Version(r.fixed)):
                hits.add((pkg.name, r.cve))
    return len(hits)


def main() -> None:
    """Run the benchmark and print timings and the speed-up."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    image = build_image(load_profile("clean"))
    view, installed = lab_view(image), lab_installed(image)
    db = VulnDB.open(args.db)
    records, sources = db.records(), db.binaries()

    def fast() -> int:
        findings = vulnerable_findings(view, installed, db.index(), "clean", sources=sources)
        return sum(len(f.evidence[0]["cves"]) for f in findings)

    best = {}
    for name, run in (("nephoscope (index + bisect, incl. DB load)", fast),
                      ("naive (every record, python-debian Version)", lambda: naive(records, installed))):
        times = []
        for _ in range(args.repeat if name.startswith("nephoscope") else max(1, args.repeat // 5)):
            t = time.perf_counter()
            result = run()
            times.append(time.perf_counter() - t)
        best[name] = min(times)
        print(f"{name:48s} {min(times) * 1000:8.2f} ms  ({result} package-CVE pairs)")
    fast_s, naive_s = best.values()
    print(f"records {len(records)}, running binaries {len(view.binaries)}, installed {len(installed)}, "
          f"processes {len(view.processes)}; speed-up x{naive_s / fast_s:.1f}")


if __name__ == "__main__":
    main()
