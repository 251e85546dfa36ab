"""`scan --all` and VM naming without a VM: every host VM gets one result, the exit status is the worst."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nephoscope.cli.main import app
from nephoscope.core.errors import NephoscopeError
from nephoscope.hypervisor import discover as d
from nephoscope.hypervisor.target import VmTarget
from nephoscope.service import scan as scan_service
from nephoscope.service.targets import resolve_target


def fake_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[d.HostVm]:
    zeros = tmp_path / "zeros.raw"
    zeros.write_bytes(bytes(1 << 20))
    vms = [d.HostVm("dumpvm", "qemu", VmTarget("dumpvm", ram_path=zeros, live=False), pid=11),
           d.HostVm("broken", "libvirt", VmTarget("broken", domain="u-2", qemu_pid=12), uuid="u-2", pid=12),
           d.HostVm("off", "libvirt", VmTarget("off", domain="u-3", live=False), uuid="u-3", state="shutoff")]
    monkeypatch.setattr(d, "discover", lambda uri=None, proc_root=None: d.Discovery(vms, {"libvirt": "test"}))
    return vms


def test_scan_all_one_result_per_vm_and_the_worst_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_host(tmp_path, monkeypatch)
    real = scan_service.run_scan

    def run_scan(vm: VmTarget, *args: object, **kwargs: object) -> scan_service.ScanResult:
        if vm.name == "broken":
            raise NephoscopeError("libvirt went away")
        return real(vm, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(scan_service, "run_scan", run_scan)
    got = CliRunner().invoke(app, ["scan", "--all", "-m", "arch", "--no-store", "--json"])
    assert got.exit_code == 4, got.output  # an error (4) is worse than nothing verifiable (3)
    out = json.loads(got.stdout)
    by_vm = {v["vm"]: v for v in out["vms"]}
    assert set(by_vm) == {"dumpvm", "broken", "off"}
    assert by_vm["dumpvm"]["status"] == "unverifiable"
    assert by_vm["broken"]["status"] == "error" and "libvirt went away" in by_vm["broken"]["error"]
    assert "not running" in by_vm["off"]["error"] and out["skipped"] == {"libvirt": "test"}


def test_scan_all_without_errors_exits_3_when_nothing_verifiable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    vms = fake_host(tmp_path, monkeypatch)
    del vms[1]
    got = CliRunner().invoke(app, ["scan", "--all", "-m", "arch", "--no-store"])
    assert got.exit_code == 3, got.output


def test_scan_needs_a_vm_or_all() -> None:
    assert CliRunner().invoke(app, ["scan"]).exit_code == 2
    assert CliRunner().invoke(app, ["scan", "x", "--all"]).exit_code == 2


def test_names_resolve_through_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEPHOSCOPE_RUN", str(tmp_path / "run"))
    fake_host(tmp_path, monkeypatch)
    assert resolve_target("u-2").domain == "u-2" and resolve_target("pid:12").name == "broken"
    with pytest.raises(NephoscopeError, match="is shutoff"):
        resolve_target("off")
    with pytest.raises(NephoscopeError, match=r"neither a running lab guest.*dumpvm, broken, off.*libvirt not asked"):
        resolve_target("nothing-like-this")


def test_a_missing_path_is_named_as_a_path_not_as_a_guest_to_boot(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEPHOSCOPE_RUN", str(tmp_path / "run"))
    fake_host(tmp_path, monkeypatch)
    with pytest.raises(NephoscopeError, match="does not exist or is neither a QMP socket") as err:
        resolve_target(str(tmp_path / "no-such.elf"))
    assert "lab up" not in str(err.value)
