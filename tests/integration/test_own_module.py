"""Acceptance (issue 14): a module of the provider's own making that the KB's kernel package does not ship,
loaded into a clean guest, is unknown kernel code — not verified, not a crash — and inspect lists it.

The module: tests/integration/kmod_own (nph_own.c, built with lab/kmodules.py against the lab kernel's
Debian headers). The guest: a clean lab guest of this test module's own (loading a module into the session's
clean guest would spoil every clean-guest test), stopped at the end. The KB: a temporary one holding the
guest's kernel package (vmlinux, modules and the package's module list).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_kb import kernel_kb

from nephoscope.analysis.merge import merge
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.introspect.arch import scan_target
from nephoscope.introspect.kernel import open_kernel
from nephoscope.introspect.kernelcode import verify_kernel
from nephoscope.knowledge.binaries import CodePageDB
from nephoscope.lab import runner
from nephoscope.lab.build import build_image, choose_kernel
from nephoscope.lab.kmodules import build_module
from nephoscope.lab.profile import load_profile
from nephoscope.service.scan import run_scan
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest
MODULE_DIR = Path(__file__).parent / "kmod_own"


def _put(agent: GuestAgent, path: str, data: bytes, chunk: int = 48 << 10) -> None:
    """Write `data` to `path` in the guest through the agent's file calls."""
    handle = agent.call("guest-file-open", path=path, mode="w")
    try:
        for at in range(0, len(data), chunk):
            agent.call("guest-file-write", handle=handle, **{"buf-b64": base64.b64encode(data[at:at + chunk]).decode()})
    finally:
        agent.call("guest-file-close", handle=handle)


@pytest.fixture(scope="module")
def own_guest() -> Iterator[runner.Guest]:
    """A clean guest with nph_own loaded (insmod through the guest agent); stopped afterwards."""
    ko = build_module("nph_own", choose_kernel(None, lambda _m: None), MODULE_DIR)
    name = f"pt-ownmod-{os.getpid() % 100000}"
    guest = runner.start(name, build_image(load_profile("clean")), kaslr=True)
    try:
        with GuestAgent(guest.qga_socket, timeout=60) as agent:
            _put(agent, "/tmp/nph_own.ko", ko)
            code, out, err = agent.exec(["/bin/sh", "-c", "insmod /tmp/nph_own.ko && grep -w nph_own /proc/modules"],
                                        timeout=60)
            assert code == 0, (out, err)
        yield guest
    finally:
        runner.stop(name, quiet=True)


@pytest.fixture(scope="module")
def kb_path(own_guest: runner.Guest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kernel_kb(own_guest.manifest(), tmp_path_factory.mktemp("ownkb") / "kb.sqlite")


def test_inspect_lists_the_module(own_guest: runner.Guest) -> None:
    result = run_scan(resolve_target(own_guest.name), ["inspect"])
    assert "module:nph_own" in {o.key for o in result.observations if o.kind == "module"}
    assert not [f for f in result.view.findings if f.kind in ("hidden-module", "syscall-hook", "inline-hook")]


def test_the_verifier_reports_its_text_as_unknown_kernel_code(own_guest: runner.Guest, kb_path: Path) -> None:
    db = CodePageDB.open(kb_path)
    try:
        with open_kernel(resolve_target(own_guest.name)) as k:
            mod = next(m for m in k.modules() if m.name == "nph_own")
            report = verify_kernel(k, db.kernel_store())
            touch = next((gva for gva, t, n in k.module_symbols(mod) if n == "nph_own_touch"), None)
    finally:
        db.close()
    assert report.image("nph_own") is None  # no image explains it: not verified, not unverifiable
    assert touch is not None and mod.base <= touch < mod.base + mod.size
    loc = report.classify(touch)
    assert loc is not None and loc.status == "unknown" and not loc.page_verified and "nph_own" in loc.function
    assert not report.verified
    # the rest of the kernel still verifies: only the foreign module is unknown
    assert all(i.status == "verified" for i in report.images if i.kind != "bpf"), \
        [(i.name, i.status, i.reason) for i in report.images if i.status != "verified"]


def test_arch_finds_unknown_kernel_code_naming_the_module(own_guest: runner.Guest, kb_path: Path) -> None:
    report = scan_target(resolve_target(own_guest.name), kb_path, pause=True)
    obs = report.to_observations()
    unknown = [o for o in obs if o.kind == "unknown-kernel-code"]
    assert unknown and all("module nph_own" in o.reason for o in unknown), [o.reason for o in unknown]
    kernel_code = next(o for o in obs if o.kind == "kernel-code")
    assert str(kernel_code.verdict) != "verified"
    view = merge(obs, ["arch"], own_guest.name)
    assert [f for f in view.findings if f.kind == "unknown-kernel-code"]
    assert not [f for f in view.findings if f.kind == "modified-kernel-code"]
