"""Issue 13's acceptance where its halves meet: the real `server` guest, an empty KB, `kb sync`, ground truth.

The guest is the session's `server_guest` (one libvirt TCG domain, plain RAM; no other boot). The KB is the
test's own temporary file and starts empty: every package, version, vmlinux and vDSO it holds afterwards
was found and fetched by `kb sync` from what the methods saw. Nothing is mocked; the ground truth is the
manifest (the image's dpkg database, the guest's /proc read through its agent).
"""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from debian.changelog import Changelog
from debian.debian_support import Version
from typer.testing import CliRunner

from nephoscope.analysis.vulnerable import RUNNING, installed_from, vulnerable_findings
from nephoscope.cli.main import app
from nephoscope.core.paths import cache_root
from nephoscope.knowledge.binaries import CodePageDB
from nephoscope.knowledge.debian import archive
from nephoscope.knowledge.debian.contents import merged_path
from nephoscope.knowledge.feeds import CVE_RE, harvest
from nephoscope.knowledge.vulns import VulnIndex
from nephoscope.service.scan import ScanResult, run_scan
from nephoscope.service.targets import resolve_target
from nephoscope.store.sqlite import Store

pytestmark = pytest.mark.guest
METHODS = ["inspect", "agent", "arch"]


@pytest.fixture(scope="module")
def synced(server_guest: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`nephoscope kb sync` of the server guest into an empty KB (the CLI, as an operator runs it)."""
    kb = tmp_path_factory.mktemp("server-sync") / "kb.sqlite"
    started = time.monotonic()
    result = CliRunner().invoke(app, ["kb", "sync", server_guest.name, "--methods", ",".join(METHODS), "--json"],
                                env={"NEPHOSCOPE_KB": str(kb)}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    (kb.parent / "kb-sync.json").write_text(result.stdout)  # kept in pytest's tmp directory
    sync = data["sync"]
    stats = CodePageDB.open(kb).stats()
    print(f"\nkb sync {server_guest.name}: {sync['paths']} paths, {len(sync['packages'])} packages, "
          f"{sum(map(len, sync['packages'].values()))} versions, {sync['ingest']['files_added']} files, "
          f"{sync['ingest']['pages_added']} pages, kernels {sync['kernels']}, {data['seconds']} s "
          f"({time.monotonic() - started:.1f} s with the CLI); KB: {stats.packages} packages, {stats.pages} pages; "
          f"unknown-code {data['before']['findings']} findings before -> {data['unknown_code']} after")
    return data | {"kb": kb}


@pytest.fixture(scope="module")
def scanned(server_guest: Any, synced: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
            monkeypatch_module: pytest.MonkeyPatch) -> ScanResult:
    """A scan with the synced KB (inspect, agent and arch together)."""
    monkeypatch_module.setenv("NEPHOSCOPE_KB", str(synced["kb"]))
    store = Store(tmp_path_factory.mktemp("server-sync-store") / "s.sqlite")
    return run_scan(resolve_target(server_guest.name), METHODS, store=store)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_sync_fills_the_empty_kb_with_the_running_packages_and_kernel(server_guest: Any, synced: dict[str, Any]
                                                                       ) -> None:
    manifest = server_guest.manifest()
    sync = synced["sync"]
    assert synced["before"]["binaries"] == 0  # the KB was empty: nothing identified before the sync
    assert sync["errors"] == [], sync["errors"]
    assert synced["unknown_code"] == 0, synced["unknown"]
    mapped = {m["package"] for p in manifest["processes"] for m in p["maps"] if m["package"]}
    assert mapped <= set(sync["packages"]), mapped - set(sync["packages"])
    for name in mapped:  # every version apt offers, the installed one among them
        assert manifest["packages"][name] in sync["packages"][name], name
        assert list(sync["packages"][name]) == list(archive.available_versions(name)), name
    kernel = manifest["kernel"]
    assert sync["kernels"] == {kernel["release"]: kernel["package"]}
    assert sync["packages"][kernel["package"]] == list(archive.available_versions(kernel["package"]))
    assert sync["not_downloadable"] == {}  # the image was built from the host's own package lists


def test_every_running_binary_and_mapped_elf_has_the_ground_truth_version(server_guest: Any,
                                                                          synced: dict[str, Any],
                                                                          scanned: ScanResult) -> None:
    manifest = server_guest.manifest()
    mains = synced["main_binaries"]
    db = CodePageDB.open(synced["kb"])
    exact, same_pages = 0, set()
    for truth in manifest["processes"]:  # kb sync's own rescan: each main binary at the ground truth's version
        main = mains.get(str(truth["pid"]))
        assert main is not None, f"pid {truth['pid']} {truth['exe']}: no main binary identified after the sync"
        assert main["package"] == truth["package"] and truth["version"] in main["versions"], (truth, main)
        if main["versions"] == [truth["version"]]:
            exact += 1
            continue
        # several versions only where page hashes cannot tell them apart: the file's executable pages are
        # the same in each of those versions of the package (e.g. /lib/systemd/systemd in two systemd updates)
        assert _pages_by_version(db, main["path"], main["package"], main["versions"]), main
        same_pages.add((main["path"], tuple(main["versions"])))
    print(f"\nmain binaries: {exact}/{len(manifest['processes'])} at exactly the ground truth's version; the rest "
          f"in files whose pages are identical in several versions: {sorted(same_pages)}")
    # every mapped ELF file of the ground truth: the KB holds its package version, and each image arch saw
    # in that process's address space carries that version; none is unknown or modified
    views = scanned.view.processes
    seen = present = 0
    for truth in manifest["processes"]:
        view = views.get(truth["pid"])
        assert view is not None and view.binaries, truth["pid"]
        assert all(b.get("status") == "identified" for b in view.binaries), (truth["pid"], view.binaries)
        images = {merged_path(b["path"]): b for b in view.binaries}
        for m in truth["maps"]:
            seen += 1
            assert m["version"] in db.package_versions(m["package"]), m
            image = images.get(merged_path(m["path"]))
            if image is None:  # mapped, but no executable page of it is present in this process right now
                continue
            present += 1
            assert image["package"] == m["package"] and m["version"] in image["versions"], (truth["pid"], m, image)
    assert present >= len(manifest["processes"])  # at least each main binary
    print(f"\n{seen} mapped ELF files in {len(manifest['processes'])} processes, {present} with present code pages, "
          f"all at the ground truth's version")
    kinds = Counter(f.kind for f in scanned.view.findings)
    assert kinds["unknown-code"] == 0 and kinds["modified-binary"] == 0, kinds


def _pages_by_version(db: CodePageDB, path: str, package: str, versions: list[str]) -> bool:
    """Return whether the KB holds `path` of `package` at every one of `versions` with the same page digests."""
    digests = {}
    for file_id, stored, _name, version in db.find_files(path.rsplit("/", 1)[-1], package):
        if merged_path(stored) == merged_path(path) and version in versions:
            digests[version] = sorted(p.digest for p in db.file_pages(file_id))
    return set(digests) == set(versions) and len({tuple(d) for d in digests.values()}) == 1


def test_the_synced_kernel_package_is_what_arch_compares_and_the_vdso_verifies(server_guest: Any,
                                                                                scanned: ScanResult) -> None:
    kernel = server_guest.manifest()["kernel"]
    images = {o.payload.name: o for o in scanned.observations if o.kind in ("kernel-image", "modified-kernel-image")}
    vmlinux = images["vmlinux"].payload
    assert (vmlinux.package, vmlinux.version) == (kernel["package"], kernel["version"]), images["vmlinux"].reason
    modules = [o.payload for o in images.values() if o.payload.kind == "module"]
    assert modules and all((m.package, m.version) == (kernel["package"], kernel["version"]) for m in modules)
    modified = [m.name for m in modules if m.status == "modified"]
    print(f"\nkernel: vmlinux {vmlinux.status} {vmlinux.pages_verified}/{vmlinux.pages} pages; modules "
          f"{dict(Counter(m.status for m in modules))}, modified: {modified}")
    vdsos = [o for o in scanned.observations if o.kind == "vdso"]
    print(f"vdso: {dict(Counter((o.verdict.value, o.reason[:80]) for o in vdsos))}")
    # the vDSO: the package's image inside vmlinux .rodata, with the boot-time alternatives accepted
    assert vdsos and all(o.verdict.value == "verified" for o in vdsos), {o.reason for o in vdsos}
    assert {o.payload.kernel for o in vdsos} == {((kernel["package"], kernel["version"]),)}


def test_no_kernel_code_finding_on_the_clean_server(scanned: ScanResult) -> None:
    kinds = Counter(f.kind for f in scanned.view.findings)
    assert kinds["modified-kernel-code"] == 0 and kinds["unknown-kernel-code"] == 0, kinds


def _root(package: str, version: str) -> Path:
    return archive.unpack(archive.download(package, version, cache_root() / "debs"), cache_root() / "unpacked") / "root"


def _expected_cves(package: str, running: str) -> set[str]:
    """Return CVEs the newest changelog of `package` lists as fixed after `running` (python-debian directly)."""
    newest = archive.available_versions(package)[0]
    docs = _root(package, newest) / "usr/share/doc" / package
    path = docs / "changelog.Debian.gz"
    if not path.is_file():
        return set()
    text = gzip.decompress(path.read_bytes()).decode(errors="replace")
    return {c for b in Changelog(text) if Version(running) < b.version <= Version(newest)
            for c in CVE_RE.findall("\n".join(b.changes()))}


def test_vulnerable_running_packages_are_reported_as_for_the_initramfs_guest(server_guest: Any,
                                                                            scanned: ScanResult) -> None:
    manifest = server_guest.manifest()
    running = {m["package"]: m["version"] for p in manifest["processes"] for m in p["maps"] if m["package"]}
    older = {n: v for n, v in running.items() if v != archive.available_versions(n)[0]}
    assert "nginx" in older  # the profile runs the older of the two nginx versions apt offers
    knowledge = harvest(sorted(older))
    findings = vulnerable_findings(scanned.view, installed_from(scanned.observations), VulnIndex(knowledge.records),
                                   server_guest.name, sources=knowledge.binaries, observations=scanned.observations)
    by_package = {f.evidence[0]["package"]: f.evidence[0] for f in findings
                  if f.kind == RUNNING and "arch" in f.evidence[0]["methods"]}
    checked = []
    for name, version in sorted(older.items()):
        want = _expected_cves(name, version)
        if not want:
            continue
        assert name in by_package, (name, version, sorted(by_package))
        assert {c["cve"] for c in by_package[name]["cves"]} == want, name
        pids = {p["pid"] for p in manifest["processes"] if any(m["package"] == name for m in p["maps"])}
        assert {p["pid"] for p in by_package[name]["processes"]} <= pids
        checked.append(f"{name} {version}: {len(want)} CVEs")
    print(f"\nrunning vulnerable: {checked}")
    assert any(c.startswith("nginx ") for c in checked)
