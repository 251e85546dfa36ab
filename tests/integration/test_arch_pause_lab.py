"""arch and checkpoint on a real guest: the operator's run state is kept, and a QMP socket is a target (issue 10).

A guest its operator paused must still be paused after `arch --pause` and after a checkpoint; a running
guest must be running again. `arch` accepts the VM's QMP socket like the other commands.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nephoscope.cli.main import app
from nephoscope.hypervisor.control import is_running
from nephoscope.hypervisor.qmp import Qmp
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.checkpoint import CheckpointMethod
from nephoscope.lab.runner import Guest

pytestmark = pytest.mark.guest
runner = CliRunner()


def _running(guest: Guest) -> bool:
    with Qmp(guest.qmp_socket) as qmp:  # QEMU serves one QMP client at a time: never hold it across a call
        return is_running(qmp)


@pytest.fixture()
def operator_paused(clean_guest: Guest) -> Iterator[Guest]:
    """Pause the guest as its operator would; resume it after the test whatever happened."""
    with Qmp(clean_guest.qmp_socket) as qmp:
        qmp.command("stop")
    try:
        yield clean_guest
    finally:
        with Qmp(clean_guest.qmp_socket) as qmp:
            qmp.command("cont")


def _target(guest: Guest) -> VmTarget:
    return VmTarget(guest.name, ram_path=guest.ram_path, qmp_socket=guest.qmp_socket, live=True)


def test_arch_pause_leaves_an_operator_paused_guest_paused(operator_paused: Guest, default_kb: None) -> None:
    clean_guest = operator_paused
    result = runner.invoke(app, ["arch", clean_guest.name, "--pause", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["observations"]
    assert not _running(clean_guest)  # used to be resumed by arch --pause


def test_checkpoint_leaves_an_operator_paused_guest_paused(operator_paused: Guest, tmp_path: Path) -> None:
    clean_guest = operator_paused
    _pause, vcpus = CheckpointMethod().snapshot(_target(clean_guest), tmp_path / "copy.ram")
    assert vcpus and all(v.cr3 and v.cr4 for v in vcpus)  # full vCPU state, not bare CR3s
    assert {v.levels for v in vcpus} == {4}  # qemu64 has no LA57
    assert not _running(clean_guest)


def test_arch_pause_resumes_a_running_guest(clean_guest: Guest, default_kb: None) -> None:
    result = runner.invoke(app, ["arch", clean_guest.name, "--pause", "--json"])
    assert result.exit_code == 0, result.output
    assert _running(clean_guest)


def test_arch_takes_the_qmp_socket(clean_guest: Guest, default_kb: None) -> None:
    by_name = runner.invoke(app, ["arch", clean_guest.name, "--json", "--pause"])
    by_socket = runner.invoke(app, ["arch", str(clean_guest.qmp_socket), "--json", "--pause"])
    assert by_socket.exit_code == 0, by_socket.output
    spaces = lambda r: {o["key"] for o in json.loads(r.stdout)["observations"]  # noqa: E731
                        if o["kind"] == "address-space"}
    assert spaces(by_socket) and spaces(by_socket) == spaces(by_name)
