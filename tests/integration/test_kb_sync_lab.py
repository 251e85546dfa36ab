"""`kb sync` and `scan --sync-kb` on real lab guests, from an empty KB, against the lab manifest.

Nothing is mocked: the archive's Contents index and packages come from the real registry, the guests are
real QEMU guests. The guest that gets a package installed by its owner is this module's own."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nephoscope.cli.main import app
from nephoscope.core.paths import cache_root
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.knowledge.debian import archive
from nephoscope.lab import runner
from nephoscope.lab.build import build_image
from nephoscope.lab.profile import load_profile

pytestmark = pytest.mark.guest
METHODS = "inspect,agent,arch"
OWNER_PACKAGE = "pv"  # in no lab profile; Depends: libc6 only (apt-cache show pv)


def _run(args: list[str], kb: Path) -> dict:
    result = CliRunner().invoke(app, args, env={"NEPHOSCOPE_KB": str(kb)}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (kb.parent / f"{args[0]}-{Path(args[1]).name}.json").write_text(result.stdout)  # kept in the test's tmp_path
    return json.loads(result.stdout)


def _check_against_manifest(scan: dict, manifest: dict) -> None:
    """Every running main binary and every mapped image: the manifest's package at its exact version."""
    packages = manifest["packages"]
    by_pid = {p["pid"]: p for p in scan["processes"]}
    checked = 0
    for truth in manifest["processes"]:
        if not truth.get("package") or truth["pid"] not in by_pid:
            continue
        main = by_pid[truth["pid"]]["code"]["main"]
        assert main is not None, f"pid {truth['pid']} {truth['binary']}: no main binary identified"
        assert (main["package"], main["versions"]) == (truth["package"], [truth["version"]]), (truth, main)
        checked += 1
    assert checked >= 10
    for proc in scan["processes"]:
        for image in proc["binaries"]:
            assert image["status"] == "identified", (proc["pid"], image)
            if image["package"] in packages:
                assert packages[image["package"]] in image["versions"], (proc["pid"], image)
    assert not [f for f in scan["findings"] if f["kind"] in ("unknown-code", "modified-binary")]


def test_kb_sync_from_an_empty_kb_identifies_every_running_binary(clean_guest: runner.Guest,
                                                                   tmp_path: Path) -> None:
    kb = tmp_path / "kb.sqlite"
    synced = _run(["kb", "sync", clean_guest.name, "--methods", METHODS, "--json"], kb)
    assert synced["before"]["binaries"] == 0 and synced["before"]["findings"] > 0  # empty KB: all unknown
    assert synced["unknown_code"] == 0, synced["unknown"]
    assert synced["sync"]["errors"] == []
    manifest = clean_guest.manifest()
    for truth in manifest["processes"]:
        if truth.get("package"):
            main = synced["main_binaries"][str(truth["pid"])]
            assert (main["package"], main["versions"]) == (truth["package"], [truth["version"]])
    # every version apt offers was ingested, not only the installed one
    assert len(synced["sync"]["packages"]["nginx"]) >= 2
    # a second sync downloads nothing: every version is already in the KB
    again = _run(["kb", "sync", clean_guest.name, "--methods", METHODS, "--json"], kb)
    assert again["sync"]["ingest"]["pages_added"] == 0 and again["sync"]["skipped"] > 0
    scan = _run(["scan", clean_guest.name, "--methods", METHODS, "--sync-kb", "--no-store", "--json"], kb)
    _check_against_manifest(scan, manifest)


@pytest.fixture(scope="module")
def owner_guest() -> Iterator[runner.Guest]:
    name = f"kbsync-owner-{os.getpid() % 100000}"
    guest = runner.start(name, build_image(load_profile("clean")))
    try:
        yield guest
    finally:
        runner.stop(name, quiet=True)


def _install_by_owner(guest: runner.Guest, binary: bytes, path: str) -> None:
    """Copy a binary into the guest through its agent (guest-file-write) and start it in the background."""
    with GuestAgent(guest.qga_socket, timeout=30) as agent:
        handle = agent.call("guest-file-open", path=path, mode="w")
        try:
            for off in range(0, len(binary), 48 * 1024):
                agent.call("guest-file-write", handle=handle,
                           **{"buf-b64": base64.b64encode(binary[off:off + 48 * 1024]).decode()})
        finally:
            agent.call("guest-file-close", handle=handle)
        code, _out, err = agent.exec(["/bin/busybox", "chmod", "755", path])
        assert code == 0, err
        agent.call("guest-exec", path="/bin/busybox",
                   arg=["sh", "-c", f"sleep 100000 </dev/null 2>/dev/null | {path} -q >/dev/null 2>&1 &"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            code, out, _err = agent.exec(["/bin/busybox", "pidof", path.rsplit("/", 1)[-1]])
            if code == 0 and out.strip():
                return
            time.sleep(0.5)
    raise AssertionError(f"{path} did not start in {guest.name}")


def test_a_package_the_owner_installs_is_identified_after_kb_sync(owner_guest: runner.Guest, tmp_path: Path) -> None:
    version = archive.find_candidate(OWNER_PACKAGE)
    assert version
    deb = archive.download(OWNER_PACKAGE, version, cache_root() / "debs")
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    _install_by_owner(owner_guest, (root / "usr/bin/pv").read_bytes(), "/usr/bin/pv")
    kb = tmp_path / "kb.sqlite"
    synced = _run(["kb", "sync", owner_guest.name, "--methods", METHODS, "--json"], kb)
    assert OWNER_PACKAGE in synced["sync"]["packages"]
    assert synced["unknown_code"] == 0, synced["unknown"]
    pv = [m for m in synced["main_binaries"].values() if m["path"].endswith("/pv")]
    assert pv and all((m["package"], m["versions"]) == (OWNER_PACKAGE, [version]) for m in pv), synced["main_binaries"]


def test_scan_sync_kb_on_dumps_identifies_clean_code_and_keeps_every_tampered_finding(
        clean_dump: Path, tmp_path: Path) -> None:
    kb = tmp_path / "kb.sqlite"
    scan = _run(["scan", str(clean_dump), "--methods", "inspect,arch", "--sync-kb", "--no-store", "--json"], kb)
    truth = clean_dump.with_name(clean_dump.name.replace(".elf", ".manifest.json"))
    manifest = json.loads(truth.read_text()) if truth.is_file() else None
    assert not [f for f in scan["findings"] if f["kind"] in ("unknown-code", "modified-binary")]
    if manifest is not None:  # the shared dump comes with the manifest of the guest it was taken from
        _check_against_manifest(scan, manifest)
    tampered = clean_dump.with_name("tampered-6.1.elf")
    if not tampered.is_file():
        pytest.skip("no shared tampered dump beside the clean one")
    scan = _run(["scan", str(tampered), "--methods", "inspect,arch", "--sync-kb", "--no-store", "--json"], kb)
    kinds = {f["kind"] for f in scan["findings"]}
    # a trojaned copy and a local binary are in no package: the sync fetches nothing for them and their
    # code stays a finding; nothing is turned into "not downloadable"
    assert {"unknown-code", "modified-binary", "fileless", "deleted-binary", "masquerading"} <= kinds, kinds
    assert not [u for u in scan["unverifiable"] if str(u.get("reason", "")).startswith("unverifiable:")]
