"""The `server` lab guests (a Debian 12 system booted from its disk) against their ground truth.

server: one libvirt TCG domain (plain RAM) per session; server-tampered: one bare QEMU guest. The ground
truth is the manifest (the image's dpkg database, the guest's own /proc read through its agent); nothing
here is a hard-coded expectation of what runs.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from nephoscope.core.paths import cache_root
from nephoscope.hypervisor.control import paused
from nephoscope.hypervisor.monitor import open_monitor
from nephoscope.hypervisor.qga import GuestAgent, open_agent
from nephoscope.introspect.arch import Image, SpaceReport, UnknownRegion, scan_target
from nephoscope.introspect.kernel import open_kernel
from nephoscope.knowledge.binaries import CodePageDB
from nephoscope.knowledge.debian import archive
from nephoscope.knowledge.ingest import IngestReport, ingest_deb
from nephoscope.lab import server
from nephoscope.lab.build import Image as LabImage
from nephoscope.lab.profile import load_profile
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest


def _mapped_now(guest: Any, installed: dict[str, str]) -> set[tuple[str, str]]:
    """Return (package, installed version) of every file some process of the guest maps right now (its dpkg).

    Processes born after the manifest (a cron job's child loading PAM modules on demand) map packages the
    manifest never saw; the arch test's KB must hold what runs when it scans, no more."""
    script = ("cat /proc/[0-9]*/maps 2>/dev/null | awk '$6 ~ /^\\// {print $6}' | sort -u | "
              "xargs -r dpkg-query -S 2>/dev/null; true")
    with open_agent(resolve_target(guest.name), timeout=120) as agent:
        code, out, _err = agent.exec(["/bin/sh", "-c", script], timeout=120)
    assert code == 0
    owners = {name.split(":")[0].strip() for line in out.decode().splitlines() if ": " in line
              for name in line.split(": ", 1)[0].split(",")}
    return {(p, installed[p]) for p in owners if p in installed}


def _kb_for(manifest: dict[str, Any], path: Path, extra: set[tuple[str, str]] | None = None) -> Path:
    """Ingest exactly the packages (and versions) the manifest names for the files the guest maps (+ `extra`)."""
    wanted = {(m["package"], m["version"]) for p in manifest["processes"] for m in p["maps"] if m["package"]}
    wanted |= extra or set()
    kernel = manifest["kernel"]
    wanted.add((kernel["package"], kernel["version"]))
    db = CodePageDB.open(path)
    report = IngestReport()
    started = time.monotonic()
    for name, version in sorted(wanted):
        report.merge(ingest_deb(db, archive.download(name, version, cache_root() / "debs")))
    db.close()
    print(f"ingested {len(wanted)} packages in {time.monotonic() - started:.1f}s")
    assert report.errors == []
    return path


def _main_package(sp: SpaceReport) -> str:
    main = sp.main
    if isinstance(main, Image):
        return sorted(main.versions)[0][0]
    return "unknown" if isinstance(main, UnknownRegion) else "-"


# ---------------------------------------------------------------------------------------------- server


def test_image_ground_truth_is_the_images_dpkg_database(server_image: LabImage) -> None:
    meta = server_image.meta
    profile = load_profile("server")
    assert meta["boot"] == "disk" and server_image.disk.stat().st_size > 0
    for spec in profile.packages:  # every profile package is installed, pinned ones at the pinned version
        assert spec.name in meta["packages"], spec.name
        if spec.version == "oldest":
            assert meta["packages"][spec.name] == archive.available_versions(spec.name)[-1]
    assert meta["kernel"]["package"] in meta["packages"]
    owners = {tuple(v) for v in meta["files"].values()}
    assert owners <= set(meta["packages"].items())
    assert server_image.owner_of("/bin/bash") == ("bash", meta["packages"]["bash"])  # merged /usr


def test_guest_is_up_and_its_dpkg_agrees(server_guest: Any) -> None:
    manifest = server_guest.manifest()
    assert manifest["system"]["state"] == "running", manifest["system"]
    assert all(u["state"] == "active" and u["pid"] for u in manifest["system"]["units"].values())
    with open_agent(resolve_target(server_guest.name), timeout=120) as agent:
        code, out, _err = agent.exec(["/usr/bin/dpkg-query", "-W", "-f", "${Package} ${Version}\\n"], timeout=120)
    assert code == 0
    listed = dict(line.split(" ", 1) for line in out.decode().splitlines() if line)
    assert listed == manifest["packages"]
    # every process's executable and mapped ELF file has a package and version
    for p in manifest["processes"]:
        assert p["package"] and p["version"] == manifest["packages"][p["package"]], p
        for m in p["maps"]:
            assert m["package"] and manifest["packages"][m["package"]] == m["version"], (p["pid"], m)


def test_ps_equals_the_agents_process_list(server_guest: Any) -> None:
    manifest = server_guest.manifest()
    units = [s.unit for s in load_profile("server").services]
    with open_agent(resolve_target(server_guest.name), timeout=120) as agent:
        before = server.collect(agent, units)
        vm = resolve_target(server_guest.name)
        monitor = open_monitor(vm)  # the walk runs paused: cron and the agent fork under a live walk
        try:
            with paused(monitor), open_kernel(vm) as kernel:
                procs = kernel.processes()
                assert procs.complete, procs.problem
                tasks = {p.pid: p for p in procs if not p.kernel_thread}
                vmas = {pid: kernel.vmas(t) for pid, t in tasks.items()}
        finally:
            monitor.close()
        after = server.collect(agent, units)
    stable, _transient = server._stable(before["processes"], after["processes"])
    assert len(stable) >= len(manifest["processes"]) - 2
    for want in [*manifest["processes"], *stable]:
        got = tasks.get(want["pid"])
        assert got is not None, f"pid {want['pid']} ({want['comm']}) missing from inspect's task list"
        assert (got.ppid, got.comm, got.exe, got.cmdline) == (want["ppid"], want["comm"], want["exe"],
                                                               want["cmdline"]), want
    stable_pids = {p["pid"] for p in stable}
    assert stable_pids <= set(tasks)
    # mapped files: inspect's VMA paths equal the guest's /proc/PID/maps (ELF and other files)
    for want in stable:
        listing = vmas[want["pid"]]
        assert listing.complete, listing.problem
        paths = {v.path for v in listing if v.path and v.path.startswith("/")}
        assert paths == set(want["maps"]) | set(want["other_maps"]), want["pid"]
    by_pid = {p["pid"]: p for p in manifest["processes"]}
    for pid, p in by_pid.items():  # and the manifest's ELF files with their packages are among them
        paths = {v.path for v in vmas[pid] if v.path}
        assert {m["path"] for m in p["maps"]} <= paths, pid


def test_arch_identifies_every_running_binary_with_its_version(server_guest: Any,
                                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    manifest = server_guest.manifest()
    installed = manifest["packages"]
    kb = _kb_for(manifest, tmp_path_factory.mktemp("server-kb") / "kb.sqlite", _mapped_now(server_guest, installed))
    started = time.monotonic()
    report = scan_target(resolve_target(server_guest.name), kb, pause=True)
    print(f"arch scan of {server_guest.name}: {time.monotonic() - started:.1f}s, {len(report.spaces)} spaces")
    assert report.problem == "" and report.missing_vcpu_roots == []
    spaces = [sp for sp in report.spaces if sp.exec_pages]
    for sp in spaces:
        assert sp.unknown == [], (hex(sp.cr3), _main_package(sp), [(hex(u.gva_start), u.head[:16]) for u in sp.unknown])
        assert sp.modified == [], (hex(sp.cr3), [m.path for m in sp.modified])
        for im in sp.images:
            assert any(installed.get(p) == v for p, v in im.versions), (im.path, im.versions)
    expected = Counter(p["package"] for p in manifest["processes"])
    found = Counter(_main_package(sp) for sp in spaces)
    for package, count in expected.items():
        assert found[package] >= count, (package, found, expected)
    kinds = Counter(o.kind for o in report.to_observations())
    assert kinds["unknown-code"] == 0 and kinds["modified-binary"] == 0, kinds


# ---------------------------------------------------------------------------------------------- server-tampered


def test_tampered_manifest_carries_every_technique(server_tampered_guest: Any) -> None:
    manifest = server_tampered_guest.manifest()
    profile = load_profile("server-tampered")
    wanted = {s.technique for s in profile.services if s.technique}
    techniques = {t["id"]: t for t in manifest["techniques"]}
    assert set(techniques) == wanted
    assert all(t["alive"] and t["pid"] for t in techniques.values()), techniques
    procs = {p["pid"]: p for p in manifest["processes"]}
    hidden = procs[techniques["preload-hidden"]["pid"]]
    assert not hidden["listed_in_proc"] and hidden["comm"] == "kdevtmpfsi"  # the hider works in the guest
    assert procs[techniques["deleted-binary"]["pid"]]["exe"].endswith(" (deleted)")
    assert procs[techniques["fileless-memfd"]["pid"]]["exe"].startswith("/memfd:")
    assert procs[techniques["unpackaged-binary"]["pid"]]["package"] is None


def test_each_technique_is_found_by_at_least_one_method(server_tampered_guest: Any,
                                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    from nephoscope.service.evaluate import DETECTED, score_guest

    manifest = server_tampered_guest.manifest()
    kb = _kb_for(manifest, tmp_path_factory.mktemp("server-tampered-kb") / "kb.sqlite")
    old = os.environ.get("NEPHOSCOPE_KB")
    os.environ["NEPHOSCOPE_KB"] = str(kb)
    try:
        scores = score_guest(server_tampered_guest, ["agent", "inspect", "arch"])
    finally:
        if old is None:
            os.environ.pop("NEPHOSCOPE_KB", None)
        else:
            os.environ["NEPHOSCOPE_KB"] = old
    by_technique: dict[str, dict[str, str]] = {}
    for s in scores:
        for tech, verdict in s.techniques.items():
            by_technique.setdefault(tech, {})[s.method] = verdict
    print(by_technique)
    assert set(by_technique) == {t["id"] for t in manifest["techniques"]}
    for tech, verdicts in by_technique.items():
        assert DETECTED in verdicts.values(), (tech, verdicts)


def test_guest_agent_is_fooled_by_the_hider(server_tampered_guest: Any) -> None:
    manifest = server_tampered_guest.manifest()
    hidden = next(t for t in manifest["techniques"] if t["id"] == "preload-hidden")
    with GuestAgent(server_tampered_guest.qga_socket, timeout=60) as agent:
        code, out, _err = agent.exec(["/bin/ls", "/proc"], timeout=60)
    assert code == 0
    assert str(hidden["pid"]) not in out.decode().split()
