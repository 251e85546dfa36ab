"""The demo use case behind `make demo`: a lab guest, the knowledge it needs, every method, one report."""

from __future__ import annotations

from collections.abc import Callable

from nephoscope.lab import runner
from nephoscope.lab.build import build_image
from nephoscope.lab.profile import load_profile
from nephoscope.service.methods import default_methods
from nephoscope.service.scan import ScanResult, run_scan
from nephoscope.service.targets import resolve_target
from nephoscope.store.sqlite import Store

Progress = Callable[[str], None]


def ensure_knowledge(profile: str, progress: Progress) -> list[str]:
    """Make sure the code-page DB holds the lab's packages (all offered versions); return problems."""
    problems: list[str] = []
    try:
        from nephoscope.knowledge.binaries import CodePageDB
        from nephoscope.knowledge.ingest import ingest_specs
        from nephoscope.lab.packages import lab_package_specs
    except ImportError:
        return ["code-page knowledge base not available in this build"]
    db = CodePageDB.open()
    try:
        specs = lab_package_specs(profile, progress)
        has = getattr(db, "has_package", None)
        todo = [s for s in specs if not (has and has(*s.split("=", 1)))]
        report = ingest_specs(db, todo, lambda m: progress(f"knowledge base: {m}"))
        problems += [f"{spec}: {error}" for spec, error in report.errors]
    finally:
        db.close()
    return problems


def ensure_vulns(profile: str, progress: Progress) -> list[str]:
    """Harvest CVE knowledge from the lab packages' newest changelogs when the DB is empty; return problems."""
    from nephoscope.knowledge.feeds import harvest
    from nephoscope.knowledge.vulns import VulnDB
    from nephoscope.lab.packages import profile_packages

    db = VulnDB.open()
    if db.stats().records:
        return []
    progress("vulnerability knowledge: reading the newest Debian changelogs")
    report = harvest(profile_packages(profile, progress), progress)
    db.replace("changelog", report.records, report.binaries)
    return [f"{where}: {why}" for where, why in report.errors]


def run_demo(name: str = "demo", profile: str = "tampered", progress: Progress = lambda _m: None) -> ScanResult:
    """Boot (or reuse) lab guest `name`, prepare knowledge, run every available method, store the scan."""
    problems = ensure_knowledge(profile, progress) + ensure_vulns(profile, progress)
    for p in problems:
        progress(f"warning: {p}")
    guest = runner.load_guest(name)
    if guest is None or not guest.alive():
        progress(f"booting lab guest {name} ({profile})")
        image = build_image(load_profile(profile), None, progress)
        runner.start(name, image, progress=progress)
    return run_scan(resolve_target(name), default_methods(), store=Store(), progress=progress)
