"""Kernel code identity on real lab guests (6.1 and 6.12): clean kernels verify page by page; changed bytes,
a jump label pointing elsewhere, a module the KB lacks, an unlinked module and garbage tables are named.

The guests: the shared dumps /work/dumps/clean-6.1.elf and clean-6.12.elf when present (their manifests name
the kernel package), else a clean lab guest of the session (clean_guest / clean_guest_612) dumped over QMP.
The KB: a temporary one holding only the two kernel packages (kernelpkg.ingest_kernel_tree).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from nephoscope.analysis.merge import merge
from nephoscope.introspect import codepages
from nephoscope.introspect.kernelcode import KernelVerifier, verify_kernel
from nephoscope.knowledge.binaries import CodePageDB, PackageMeta
from nephoscope.knowledge.kernelpkg import KernelImageFile, KernelStore, ingest_kernel_tree
from nephoscope.lab.runner import Guest
from nephoscope.memory.physical import BufferMemory, SegmentedMemory, open_memory
from nephoscope.os.linux.model import LinuxKernel

pytestmark = pytest.mark.guest
DUMPS = Path("/work/dumps")
KERNEL_FINDINGS = ("modified-kernel-code", "unknown-kernel-code")


def _dump(request: pytest.FixtureRequest, tmp: Path, name: str, fixture: str) -> tuple[Path, dict]:
    shared = DUMPS / f"{name}.elf"
    if shared.exists():
        return shared, json.loads((DUMPS / f"{name}.manifest.json").read_text())
    from nephoscope.hypervisor.qmp import Qmp

    guest = request.getfixturevalue(fixture)
    path = tmp / f"{name}.elf"
    with Qmp(guest.qmp_socket) as qmp:
        qmp.command("dump-guest-memory", paging=False, protocol=f"file:{path}")
    return path, guest.manifest()


@pytest.fixture(scope="session")
def guests(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    tmp = tmp_path_factory.mktemp("kdumps")
    return {"6.1": _dump(request, tmp, "clean-6.1", "clean_guest"),
            "6.12": _dump(request, tmp, "clean-6.12", "clean_guest_612")}


@pytest.fixture(scope="session")
def kb(guests: dict[str, tuple[Path, dict]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[CodePageDB]:
    db = CodePageDB.open(tmp_path_factory.mktemp("kkb") / "kb.sqlite")
    for _dump_path, manifest in guests.values():
        kernel = manifest["kernel"]
        root = Path(kernel["source"]).parent.parent  # .../unpacked/<deb>/root/boot/vmlinuz-*
        package_id = db.package_id(PackageMeta(kernel["package"], kernel["version"], "amd64"))
        _added, errors = ingest_kernel_tree(db.kernel_store(), package_id, root)
        assert not errors, errors[:3]
    db.commit()
    yield db
    db.close()


def _kernel(guests: dict[str, tuple[Path, dict]], series: str) -> LinuxKernel:
    return LinuxKernel.open(open_memory(guests[series][0]))


@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_a_clean_kernel_verifies_every_text_and_module_page(guests: dict, kb: CodePageDB, series: str) -> None:
    k = _kernel(guests, series)
    report = verify_kernel(k, kb.kernel_store())
    assert report.verified, [(i.name, i.status, i.reason) for i in report.images if i.status != "verified"]
    assert report.unknown == []
    vmlinux = report.image("vmlinux")
    assert vmlinux is not None and vmlinux.pages == vmlinux.pages_verified > 3000
    assert vmlinux.package == guests[series][1]["kernel"]["package"]
    # every kernel patch mechanism of this build was met and normalised, not skipped
    for kind in ("alternative", "return", "mcount", "static_call", "jump_label", "lock"):
        assert vmlinux.normalised.get(kind, 0) > 0, (kind, vmlinux.normalised)
    listed = {m.name for m in k.modules()}
    assert listed and listed <= {i.name for i in report.images if i.kind == "module" and i.status == "verified"}
    text = k.symbols.get("_text")
    loc = report.classify(k.symbols.get("do_sys_openat2") + 4)
    assert loc is not None and loc.image == "vmlinux" and loc.page_verified
    assert loc.function.startswith("do_sys_openat2")
    assert report.classify(text - 0x1000_0000) is None


@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_the_arch_scan_reports_verified_kernel_code_and_no_kernel_finding(guests: dict, kb: CodePageDB,
                                                                         series: str) -> None:
    phys = open_memory(guests[series][0])
    report = codepages.scan(phys, kb, vm=f"clean-{series}")
    assert report.kernel is not None and report.kernel.verification is not None
    obs = report.to_observations()
    kernel_code = next(o for o in obs if o.kind == "kernel-code")
    assert str(kernel_code.verdict) == "verified", kernel_code.reason
    images = [o for o in obs if o.kind in ("kernel-image", "modified-kernel-image")]
    assert {o.payload.name for o in images} >= {"vmlinux"}  # type: ignore[attr-defined]
    view = merge(obs, ["arch"], f"clean-{series}")
    assert not [f for f in view.findings if f.kind in KERNEL_FINDINGS]


def _low_ram(phys: SegmentedMemory) -> bytearray:
    """Return a copy of the RAM segment at gpa 0 (the dump's BIOS ROM at 4 GiB is left out)."""
    start, view = next(phys.iter_segments())
    assert start == 0
    return bytearray(view)


@pytest.fixture(scope="module")
def ram61(guests: dict) -> tuple[bytearray, LinuxKernel]:
    phys = open_memory(guests["6.1"][0])
    return _low_ram(phys), LinuxKernel.open(phys)


@contextlib.contextmanager
def _patched(ram: bytearray, k: LinuxKernel, writes: list[tuple[int, bytes]]) -> Iterator[BufferMemory]:
    """Write bytes at kernel gvas into the shared RAM copy for one test, and put the old bytes back after."""
    old = []
    for gva, data in writes:
        for i, b in enumerate(data):
            gpa = k.kernel.translate(gva + i)
            old.append((gpa, ram[gpa]))
            ram[gpa] = b
    try:
        yield BufferMemory(ram)
    finally:
        for gpa, b in reversed(old):
            ram[gpa] = b


def _site_free(k: LinuxKernel, kb: CodePageDB, function: str) -> int:
    """Return a gva 16 bytes into `function` with no patch site within 8 bytes."""
    v = KernelVerifier(k, kb.kernel_store())
    image = kb.kernel_store().find_vmlinux(k.info.release)
    assert image is not None
    text = image.sections[".text"]
    slide = v.text_range[0] - text.addr
    sites, problems = v._vmlinux_sites(image, text.addr, slide, text)
    assert not problems
    spans = [(s.start + slide, s.start + slide + s.length) for s in sites]  # sites are in link addresses
    gva = k.symbols.get(function) + 16
    while any(a < gva + 8 and gva - 8 < b for a, b in spans):
        gva += 1
    return gva


def test_changed_bytes_in_a_kernel_function_are_modified_code_naming_function_and_bytes(
        ram61: tuple[bytearray, LinuxKernel], kb: CodePageDB) -> None:
    base, k = ram61
    gva = _site_free(k, kb, "cap_capable")
    old = k.read(gva, 3)
    with _patched(base, k, [(gva, b"\xcc\x90\xcc")]) as phys:
        report = verify_kernel(LinuxKernel.open(phys), kb.kernel_store())
    vmlinux = report.image("vmlinux")
    assert vmlinux is not None and vmlinux.status == "modified"
    assert vmlinux.modified_pages == [gva & ~0xFFF] and vmlinux.pages_verified == vmlinux.pages - 1
    (change,) = vmlinux.changes
    assert change.function.startswith("cap_capable+0x") and change.site == ""
    assert change.gva <= gva and change.new.endswith(b"\xcc\x90\xcc"[-len(change.new):])
    assert old[:len(change.old)] == change.old[:3] or change.old.endswith(old[-1:])
    loc = report.classify(gva)
    assert loc is not None and not loc.page_verified and loc.status == "modified"
    view = merge(list(_kernel_obs(report)), ["arch"], "t")
    (finding,) = [f for f in view.findings if f.kind == "modified-kernel-code"]
    assert "cap_capable" in finding.title


def _kernel_obs(report):
    from nephoscope.core.records import Provenance
    from nephoscope.introspect.arch_observations import kernel_observations

    return kernel_observations(report, Provenance("arch", "t"))


def test_a_jump_label_pointing_elsewhere_is_modified(ram61: tuple[bytearray, LinuxKernel], kb: CodePageDB) -> None:
    base, k = ram61
    v = KernelVerifier(k, kb.kernel_store())
    image = kb.kernel_store().find_vmlinux(k.info.release)
    text = image.sections[".text"]
    slide = v.text_range[0] - text.addr
    sites, _ = v._vmlinux_sites(image, text.addr, slide, text)
    site = next(s for s in sites if s.kind == "jump_label" and s.length == 5)
    at, target = site.start + slide, site.target + slide  # sites are in link addresses
    hook = b"\xe9" + struct.pack("<i", target + 0x40 - (at + 5))
    with _patched(base, k, [(at, hook)]) as phys:
        vmlinux = verify_kernel(LinuxKernel.open(phys), kb.kernel_store()).image("vmlinux")
    assert vmlinux is not None and vmlinux.status == "modified"
    assert any("jump_label" in c.site and c.gva <= at < c.gva + len(c.new) for c in vmlinux.changes)


class _Without:
    """A kernel store without some modules (as a KB that lacks the provider's own module)."""

    def __init__(self, store: KernelStore, hidden: set[str], vmlinux: KernelImageFile | None = None) -> None:
        self.store, self.hidden, self.vmlinux = store, hidden, vmlinux

    def find_vmlinux(self, release: str) -> KernelImageFile | None:
        return self.vmlinux or self.store.find_vmlinux(release)

    def find_module(self, release: str, name: str) -> KernelImageFile | None:
        return None if name in self.hidden else self.store.find_module(release, name)


def test_a_module_the_kb_lacks_is_unverifiable_never_verified(ram61: tuple[bytearray, LinuxKernel],
                                                              kb: CodePageDB) -> None:
    _base, k = ram61
    report = verify_kernel(k, _Without(kb.kernel_store(), {"e1000"}))  # type: ignore[arg-type]
    e1000 = report.image("e1000")
    assert e1000 is not None and e1000.status == "unverifiable" and "not in KB" in e1000.reason
    assert e1000.pages > 0 and not report.verified and report.unknown == []
    loc = report.classify(e1000.ranges[0][0])
    assert loc is not None and loc.image == "e1000" and not loc.page_verified


def test_a_module_unlinked_from_the_module_list_is_unknown_kernel_code(ram61: tuple[bytearray, LinuxKernel],
                                                                       kb: CodePageDB) -> None:
    base, k = ram61
    mod = next(m for m in k.modules() if m.name == "e1000")
    report = verify_kernel(k, kb.kernel_store())
    text = report.image("e1000").ranges  # type: ignore[union-attr]
    # DKOM: unlink e1000 from `modules` (prev->next = next, next->prev = prev), as a hiding rootkit does
    link = mod.gva + k.off["module.list"]
    nxt, prev = k.u64(link + k.off["list_head.next"]), k.u64(link + k.off["list_head.prev"])
    writes = [(prev + k.off["list_head.next"], struct.pack("<Q", nxt)),
              (nxt + k.off["list_head.prev"], struct.pack("<Q", prev))]
    with _patched(base, k, writes) as phys:
        hidden = verify_kernel(LinuxKernel.open(phys), kb.kernel_store())
    assert hidden.image("e1000") is None
    assert all(any(a <= lo and hi <= b for a, b in hidden.unknown) for lo, hi in text)
    loc = hidden.classify(text[0][0])
    assert loc is not None and loc.status == "unknown" and not loc.page_verified
    view = merge(list(_kernel_obs(hidden)), ["arch"], "t")
    assert [f for f in view.findings if f.kind == "unknown-kernel-code"]


def test_garbage_tables_make_the_kernel_unverifiable_naming_the_table(ram61: tuple[bytearray, LinuxKernel],
                                                                      kb: CodePageDB) -> None:
    _base, k = ram61
    real = kb.kernel_store().find_vmlinux(k.info.release)
    assert real is not None
    alt = real.sections[".altinstructions"]
    bad = dataclasses.replace(real, sections={**real.sections, ".altinstructions": dataclasses.replace(
        alt, data=b"\xff" * len(alt.data))})
    report = verify_kernel(k, _Without(kb.kernel_store(), set(), bad))  # type: ignore[arg-type]
    vmlinux = report.image("vmlinux")
    assert vmlinux is not None and vmlinux.status == "unverifiable"
    assert "could not read .altinstructions" in vmlinux.reason
    relocs = real.sections["relocs"]
    garbage = dataclasses.replace(relocs, data=b"\x01" * 64)
    bad = dataclasses.replace(real, sections={**real.sections, "relocs": garbage})
    vmlinux = verify_kernel(k, _Without(kb.kernel_store(), set(), bad)).image("vmlinux")  # type: ignore[arg-type]
    assert vmlinux is not None and vmlinux.status == "unverifiable" and "KASLR relocations" in vmlinux.reason


def test_a_kernel_the_kb_lacks_is_unverifiable_with_the_package_named(ram61: tuple[bytearray, LinuxKernel],
                                                                      tmp_path: Path) -> None:
    _base, k = ram61
    empty = CodePageDB.open(tmp_path / "empty.sqlite")
    try:
        report = verify_kernel(k, empty.kernel_store())
    finally:
        empty.close()
    vmlinux = report.image("vmlinux")
    assert vmlinux is not None and vmlinux.status == "unverifiable"
    assert f"package linux-image-{k.info.release} not in KB" in vmlinux.reason
    assert not report.verified and report.unknown == []  # known images, just not verifiable


def test_a_running_clean_guest_verifies_its_kernel_code_and_stays_running(clean_guest: Guest, kb: CodePageDB) -> None:
    """The live guest (RAM file, paused for the scan by the arch method), not a dump: the same verdict."""
    from nephoscope.hypervisor.qmp import Qmp
    from nephoscope.introspect.arch import scan_target
    from nephoscope.service.targets import resolve_target

    if clean_guest.manifest()["kernel"]["package"] not in {m[1] for m in kb.kernel_store().releases()}:
        pytest.skip("the session's clean guest runs another kernel than the dumps the KB was built for")
    report = scan_target(resolve_target(clean_guest.name), kb.path, pause=True)
    assert report.kernel is not None and report.kernel.verification is not None
    kc = report.kernel.verification
    assert kc.verified, [(i.name, i.status, i.reason, i.changes[:2]) for i in kc.images if i.status != "verified"]
    with Qmp(clean_guest.qmp_socket) as qmp:
        assert qmp.command("query-status")["running"] is True
