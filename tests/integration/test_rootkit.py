"""The rootkit lab guest (issue 14): every kernel technique found by inspect, with the check and evidence named.

Ground truth is the guest's manifest: which techniques nphrk applied (`techniques`) and the addresses it
logged (`kernel_log`: the sys_call_table slot, the patched function, the hook target). Clean guests
(6.1 and 6.12, live and the shared dumps) must give no kernel finding.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.lab import runner
from nephoscope.service.scan import ScanResult, run_scan
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest
KERNEL_KINDS = {"hidden-module", "syscall-hook", "idt-hook", "inline-hook", "ftrace-hook", "kprobe-hook", "ops-hook"}
SHARED = Path("/work/dumps")


def _scan(guest: runner.Guest, methods: list[str]) -> ScanResult:
    return run_scan(resolve_target(guest.name), methods)


def _log(manifest: dict, pattern: str) -> re.Match[str]:
    hit = next((m for line in manifest["kernel_log"] if (m := re.search(pattern, line))), None)
    assert hit is not None, f"nphrk did not log {pattern!r}: {manifest['kernel_log']}"
    return hit


@pytest.fixture(scope="module")
def rootkit_scan(rootkit_guest: runner.Guest) -> ScanResult:
    return _scan(rootkit_guest, ["inspect"])


def test_manifest_names_every_kernel_technique(rootkit_guest: runner.Guest) -> None:
    manifest = rootkit_guest.manifest()
    ids = {t["id"] for t in manifest["techniques"]}
    assert {"dkom-hidden-task", "ftrace-hidden-process", "hidden-module", "syscall-hook", "inline-patch"} <= ids
    for what in ("sys_call_table", "now jumps to", "ftrace hook on filldir64", "unlinked", "removed from"):
        _log(manifest, what)


def test_dkom_task_found_by_its_address_space(rootkit_guest: runner.Guest, rootkit_scan: ScanResult) -> None:
    pid = next(t["pid"] for t in rootkit_guest.manifest()["techniques"] if t["id"] == "dkom-hidden-task")
    hidden = [f for f in rootkit_scan.view.findings if f.kind == "hidden-process" and f.evidence[0].get("pid") == pid]
    assert hidden, [f.title for f in rootkit_scan.view.findings]
    assert "address-space" in hidden[0].evidence[0]["check"] and "task-list and pid-table" in \
        hidden[0].evidence[0]["evidence"]
    assert pid not in {p["pid"] for p in rootkit_guest.manifest()["processes"]}  # the guest's /proc lost it


def test_hidden_module_found_in_module_memory(rootkit_scan: ScanResult) -> None:
    hidden = [f for f in rootkit_scan.view.findings if f.kind == "hidden-module"]
    assert [f.evidence[0]["module"] for f in hidden] == ["nphrk"], [f.title for f in hidden]
    assert hidden[0].evidence[0]["check"] == "module-memory"


def test_syscall_hook_names_the_slot_nphrk_wrote(rootkit_guest: runner.Guest, rootkit_scan: ScanResult) -> None:
    hit = _log(rootkit_guest.manifest(), r"sys_call_table\[(\d+)\] at \w+ -> (\w+)")
    hooks = [f.evidence[0] for f in rootkit_scan.view.findings if f.kind == "syscall-hook"]
    assert [(h["where"], h["target"], h["owner"]) for h in hooks] == \
        [(f"sys_call_table[{hit.group(1)}]", int(hit.group(2), 16), "elsewhere")]


def test_inline_patch_names_the_function_and_target(rootkit_guest: runner.Guest, rootkit_scan: ScanResult) -> None:
    hit = _log(rootkit_guest.manifest(), r"(\S+) at \w+ now jumps to (\w+)")
    hooks = [f.evidence[0] for f in rootkit_scan.view.findings if f.kind == "inline-hook"]
    assert [(h["where"], h["target"]) for h in hooks] == [(f"{hit.group(1)}+0x0", int(hit.group(2), 16))]


def test_ftrace_hook_and_ftrace_hidden_process(rootkit_guest: runner.Guest, rootkit_scan: ScanResult) -> None:
    hooks = [f for f in rootkit_scan.view.findings if f.kind == "ftrace-hook"]
    assert len(hooks) == 1 and hooks[0].evidence[0]["owner"] == "elsewhere", [f.title for f in hooks]
    pid = next(t["pid"] for t in rootkit_guest.manifest()["techniques"] if t["id"] == "ftrace-hidden-process")
    with GuestAgent(rootkit_guest.qga_socket, timeout=60) as agent:
        _code, out, _err = agent.exec(["/bin/sh", "-c", "ls /proc; ls /opt/lab"], timeout=60)
    listing = out.decode(errors="replace").split()
    assert str(pid) not in listing and "nph-secret.txt" not in listing  # the hook works in the guest
    inspect_pids = set(rootkit_scan.view.processes)
    assert pid in inspect_pids  # the task list still has it: inspect sees it, the guest's ls does not


def test_lstar_is_unverifiable_with_the_reason(rootkit_scan: ScanResult) -> None:
    lstar = [u for u in rootkit_scan.view.unverifiable if u["what"] == "kernel-hooks:lstar"]
    assert lstar and "LSTAR" in lstar[0]["reason"]


def test_idt_read_at_the_vcpu_idtr_has_no_hook(rootkit_scan: ScanResult) -> None:
    assert not [f for f in rootkit_scan.view.findings if f.kind == "idt-hook"]
    assert not [u for u in rootkit_scan.view.unverifiable if u["what"] == "kernel-hooks:idt"]


@pytest.mark.parametrize("guest_fixture", ["clean_guest", "clean_guest_612"])
def test_clean_live_guest_has_no_kernel_finding(guest_fixture: str, request: pytest.FixtureRequest) -> None:
    guest: runner.Guest = request.getfixturevalue(guest_fixture)
    result = _scan(guest, ["inspect"])
    kernel = [f"{f.kind}: {f.title}" for f in result.view.findings if f.kind in KERNEL_KINDS | {"hidden-process"}]
    assert not kernel
    doubts = {u["what"] for u in result.view.unverifiable if u["what"].startswith(("task-views", "module-views",
                                                                                  "kernel-hooks"))}
    assert doubts <= {"kernel-hooks:lstar"}, doubts


@pytest.mark.parametrize("dump", ["clean-6.1.elf", "clean-6.12.elf", "tampered-6.1.elf"])
def test_shared_dumps_have_no_kernel_finding(dump: str) -> None:
    path = SHARED / dump
    if not path.is_file():
        pytest.skip(f"no shared dump {path}")
    from nephoscope.hypervisor.target import VmTarget

    result = run_scan(VmTarget(dump, ram_path=path, live=False), ["inspect"])
    assert not [f"{f.kind}: {f.title}" for f in result.view.findings if f.kind in KERNEL_KINDS]
    assert not [f for f in result.view.findings if f.kind == "hidden-process"]
    doubts = {u["what"] for u in result.view.unverifiable if u["what"].startswith(("task-views", "module-views",
                                                                                  "kernel-hooks"))}
    assert doubts <= {"kernel-hooks:lstar"}, doubts


def test_rootkit_on_612_every_technique_found(rootkit_guest_612: runner.Guest) -> None:
    """6.12: module.mem[] (the struct module in its own allocation), pcpu_hot, ptdesc, x64_sys_call dispatch."""
    manifest = rootkit_guest_612.manifest()
    result = _scan(rootkit_guest_612, ["inspect"])
    kinds = {f.kind for f in result.view.findings}
    assert {"hidden-module", "syscall-hook", "inline-hook", "ftrace-hook"} <= kinds, kinds
    pid = next(t["pid"] for t in manifest["techniques"] if t["id"] == "dkom-hidden-task")
    assert pid in {f.evidence[0].get("pid") for f in result.view.findings if f.kind == "hidden-process"}
    assert [f.evidence[0]["module"] for f in result.view.findings if f.kind == "hidden-module"] == ["nphrk"]


def test_evaluate_scores_the_kernel_techniques(rootkit_guest: runner.Guest, tmp_path: Path) -> None:
    from nephoscope.service.evaluate import DETECTED, MISSED, ensure_kernel_code, score_guest
    from nephoscope.store.sqlite import Store

    assert ensure_kernel_code(rootkit_guest.manifest()) == ""  # the default KB holds the guest's kernel package
    scores = {s.method: s for s in score_guest(rootkit_guest, ["agent", "inspect", "arch"],
                                               store=Store(tmp_path / "s.sqlite"))}
    kernel = ("dkom-hidden-task", "ftrace-hidden-process", "hidden-module", "syscall-hook", "inline-patch")
    assert {t: scores["inspect"].techniques.get(t) for t in kernel} == dict.fromkeys(kernel, DETECTED)
    assert {t: scores["agent"].techniques.get(t) for t in kernel} == dict.fromkeys(kernel, MISSED)
    # arch, from kernel code identity alone: the patched function and filldir64's fentry site are modified
    # kernel code, the hidden module's memory unknown kernel code; the table slot and the unlinked task are
    # kernel data it does not read
    assert {t: scores["arch"].techniques.get(t) for t in kernel} == {
        "dkom-hidden-task": MISSED, "syscall-hook": MISSED, "ftrace-hidden-process": DETECTED,
        "hidden-module": DETECTED, "inline-patch": DETECTED}
