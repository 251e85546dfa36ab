"""A sensor sweep over two VMs identifies shared code pages once, and says the same as separate scans.

The VMs are the shared dumps of the clean and the tampered lab guests (same Debian userland, different
programs running): their libc, ld.so, busybox... pages have the same digests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nephoscope.fleet.sensor import Sensor, parse_policy
from nephoscope.hypervisor.discover import Discovery, HostVm
from nephoscope.hypervisor.target import VmTarget
from nephoscope.service.scan import run_scan

DUMPS = Path("/work/dumps")
NAMES = ("clean-6.1.elf", "tampered-6.1.elf")
pytestmark = pytest.mark.skipif(not all((DUMPS / n).exists() for n in NAMES), reason="shared dumps not there")


def _vm(name: str) -> HostVm:
    return HostVm(name, "qemu", VmTarget(name, ram_path=DUMPS / name, live=False), methods={"arch": None})


def _key(scan: dict[str, Any]) -> tuple[Any, ...]:
    procs = sorted((p["pid"], p["comm"], json.dumps(p["binaries"], sort_keys=True)) for p in scan["processes"])
    return (scan["status"], procs, sorted((f["kind"], f["title"]) for f in scan["findings"]))


def test_sweep_identifies_each_digest_once_and_changes_nothing(default_kb: None, tmp_path: Path) -> None:
    policy = parse_policy('[[rule]]\nmethod = "arch"\nevery_s = 0\n')
    sensor = Sensor(None, policy, tmp_path / "s", host="hv", discover=lambda: Discovery([_vm(n) for n in NAMES], {}))
    report = sensor.sweep()
    assert sorted(report.scanned) == sorted(NAMES) and not report.errors
    share = report.kb_sharing
    assert share["digests_asked"] > 1000
    assert 0 < share["digests_looked_up"] < share["digests_asked"]
    assert share["digests_shared"] > share["digests_asked"] // 3  # most code is the same in both guests
    assert share["files_loaded"] < share["files_asked"]
    pushed = {json.loads(p.read_text())["vm"]: json.loads(p.read_text())["document"]["scan"]
              for p in sensor.outbox.pending()}
    for name in NAMES:  # the same as a scan with its own KB
        alone = run_scan(VmTarget(name, ram_path=DUMPS / name, live=False), ["arch"]).to_dict()
        assert _key(pushed[name]) == _key(alone), name
