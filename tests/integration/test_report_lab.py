"""The customer report of the tampered lab guest against its manifest: each technique once, every method seen.

Every default method runs on the live guest: arch on live RAM and checkpoint's arch and inspect on a
frozen copy of the same RAM, so each planted trick is seen twice and must be reported once. The scan
CLI's exit codes are checked on a dump of the same guest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nephoscope.knowledge.vulns import VulnDB
from nephoscope.lab.runner import Guest
from nephoscope.service.methods import default_methods
from nephoscope.service.report import CodeItem, Report, build_report
from nephoscope.service.scan import ScanResult, run_scan
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest
SRC = Path(__file__).resolve().parents[2] / "src"
# technique -> the report kinds that name it (code facts are the most telling kind of their range)
KINDS = {"masquerade": {"masquerading"}, "deleted-binary": {"deleted-binary"}, "fileless-memfd": {"fileless"},
         "code-injection": {"malicious-code"}, "trojaned-binary": {"malicious-code", "modified-binary"},
         "preload-hidden": {"hidden-process"}, "unpackaged-binary": {"unknown-code"}}
LOCATED = {"malicious-code", "modified-binary", "unknown-code", "anonymous-exec"}


def _pids(item: CodeItem) -> set[int]:
    out: set[int] = set()
    for d in item.details:
        out |= {int(p) for p in d.get("pids", [])} | ({int(d["pid"])} if isinstance(d.get("pid"), int) else set())
    return out


def _range(item: CodeItem) -> tuple[int, int] | None:
    spans = [(int(d["gva_start"], 16), int(d["gva_end"], 16)) for d in item.details if "gva_start" in d]
    spans += [(int(d["start"], 16), int(d["end"], 16)) for d in item.details if "start" in d and "end" in d]
    return (min(s for s, _ in spans), max(e for _, e in spans)) if spans else None


@pytest.fixture(scope="module")
def scanned(tampered_guest: Guest, default_kb: None) -> ScanResult:
    methods = default_methods()
    if not {"arch", "checkpoint", "inspect", "agent"} <= set(methods):
        pytest.skip(f"needs arch, checkpoint, inspect and agent; this tree has {methods}")
    return run_scan(resolve_target(tampered_guest.name), methods)


@pytest.fixture(scope="module")
def report(scanned: ScanResult, tampered_guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> Report:
    vulns = VulnDB.open(tmp_path_factory.mktemp("vulns") / "v.db")
    return build_report(tampered_guest.name, scanned.view, scanned.observations, vulns=vulns,
                        ram_path=tampered_guest.ram_path, host_strings=(str(tampered_guest.ram_path),))


def _backdoor_text(scanned: ScanResult, pid: int, binary: str) -> list[tuple[int, int]]:
    """Return the executable ranges inspect saw mapped from the unpackaged binary's own file."""
    return [(int(o.data["start"]), int(o.data["end"])) for o in scanned.observations
            if o.kind == "mapping" and o.provenance.method == "inspect" and o.data.get("pid") == pid
            and o.data.get("path") == binary]


def test_each_technique_reported_once_with_both_methods(report: Report, scanned: ScanResult,
                                                        tampered_guest: Guest) -> None:
    techniques: list[dict[str, Any]] = tampered_guest.manifest()["techniques"]
    for line in (f"{c.severity} {c.kind} {sorted(_pids(c))} {c.methods}: {c.title}" for c in report.code):
        print(line)
    for t in techniques:
        items = [c for c in report.code if c.kind in KINDS[t["id"]] and t["pid"] in _pids(c)]
        if t["id"] == "unpackaged-binary":  # the backdoor also maps libhide.so (preloaded): another fact
            text = _backdoor_text(scanned, t["pid"], t["binary"])
            assert text, "inspect saw no executable mapping of the backdoor's file"
            items = [c for c in items if (r := _range(c)) and any(s < r[1] and r[0] < e for s, e in text)]
        assert len(items) == 1, (t["id"], [c.title for c in items])
        assert {"arch", "checkpoint"} <= set(items[0].methods), (t["id"], items[0].methods)
    injected = next(c for c in report.code if c.kind == "malicious-code" and
                    next(t["pid"] for t in techniques if t["id"] == "code-injection") in _pids(c))
    rules = {d.get("rule") for d in injected.details}
    assert {"nephoscope_injected_stub", "nephoscope_injected_marker"} <= rules
    assert any(d.get("sha256") for d in injected.details)  # the known-bad page is evidence of the same fact
    assert all(set(d.get("methods", [])) >= {"arch", "checkpoint"} for d in injected.details if d.get("rule"))


def test_no_fact_twice_and_nothing_outside_the_tampering(report: Report, tampered_guest: Guest) -> None:
    techniques = tampered_guest.manifest()["techniques"]
    tampered_pids = {t["pid"] for t in techniques}
    seen: list[tuple[str, frozenset[int], tuple[int, int] | None]] = []
    for c in report.code:
        pids, span = frozenset(_pids(c)), _range(c) if c.kind in LOCATED else None
        assert pids & tampered_pids, f"a finding about no tampered process: {c.title}"
        for kind, other_pids, other_span in seen:
            same_space = bool(pids & other_pids)
            if span is None or other_span is None:
                assert not (same_space and kind == c.kind and span is other_span is None), c.title
            else:
                assert not (same_space and span[0] < other_span[1] and other_span[0] < span[1]), c.title
        seen.append((c.kind, pids, span))
    assert report.summary["suspicious_code"] == len(report.code) <= len(techniques) + 3


def test_scan_view_findings_are_one_per_fact(scanned: ScanResult) -> None:
    keys = [(f.kind, f.title) for f in scanned.view.findings]
    assert len(keys) == len(set(keys))
    code = [f for f in scanned.view.findings if f.kind in ("unknown-code", "modified-binary")]
    for f in code:
        methods = {ev.get("provenance", {}).get("method") for ev in f.evidence}
        assert {"arch", "checkpoint"} <= methods, f.title


def _cli(*args: str, db: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("nephoscope")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "nephoscope.cli.main"]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "NEPHOSCOPE_DB": str(db)}
    return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=900, check=False)


def test_scan_exit_codes_on_a_tampered_dump(tampered_dump: Path, tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    plain = _cli("scan", str(tampered_dump), "--methods", "inspect,arch", "--json", db=db)
    assert plain.returncode == 0, plain.stderr  # findings alone do not fail a scan
    high = _cli("scan", str(tampered_dump), "--methods", "inspect,arch", "--fail-on", "high", db=db)
    assert high.returncode == 1, high.stderr
    assert "at or above high" in high.stderr
    # the scan's own findings are high or medium; --fail-on also weighs what the report adds: the injected stub's
    # YARA rule is critical (tests/integration/test_scan_gate_dump.py checks that finding in detail)
    critical = _cli("scan", str(tampered_dump), "--methods", "inspect,arch", "--fail-on", "critical", db=db)
    assert critical.returncode == 1, critical.stderr
    assert "at or above critical" in critical.stderr and "nephoscope_injected_stub" in critical.stderr
