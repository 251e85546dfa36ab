"""Turn an arch report (nephoscope.introspect.codepages.ArchReport) into Observations of method "arch".

Verdicts: what the page tables and page contents show is `verified`; kernel code and an unverified vdso
are `unverifiable` with the reason. When the image itself is in doubt (`ArchReport.doubt`), nothing is
claimed per region: one "image-inconsistent" observation says why and counts what was seen (unknown and
modified code, page-matched binaries); only the address spaces and the kernel-code note remain.
"""

from __future__ import annotations

from collections.abc import Iterator

from nephoscope.core import payloads
from nephoscope.core.payloads import AddressSpace, Details
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.introspect.codepages import ArchReport, Candidate, Image, main_image
from nephoscope.introspect.kernelcode import KernelCodeReport

METHOD = "arch"
VDSO_REASON = ("named by its ELF header (linux-vdso.so.1) and position above the stack; its pages do not match "
               "the KB (the kernel patches vdso alternatives at boot, or the KB lacks this kernel's package)")


def observations(report: ArchReport) -> Iterator[Observation]:
    """Yield the observations of one arch report (addresses as in the report: cr3/gpa physical, gva virtual)."""
    prov = Provenance(METHOD, report.vm)
    if report.problem:
        yield Observation("scan", report.vm, Details({"spaces": len(report.spaces), "caps": report.caps}), prov,
                          Verdict.UNVERIFIABLE, report.problem)
    doubt = bool(report.doubt)
    if doubt:
        yield _inconsistent(report, prov)
    elif report.memory_problems:
        yield Observation("memory-image", report.vm, Details({"problems": report.memory_problems}), prov,
                          Verdict.UNVERIFIABLE, "parts of the memory image were skipped or cut: "
                          + "; ".join(report.memory_problems))
    for sp in report.spaces:
        space = f"cr3:0x{sp.cr3:x}"
        main = main_image(sp.images, sp.unknown)
        yield Observation("address-space", space, AddressSpace(
            sp.cr3, sp.user_cr3, sp.exec_pages, tuple(sp.vcpus),
            (main.path if isinstance(main, Image) else "unknown") if main else None, dict(sp.anomalies)),
            prov, Verdict.VERIFIED)
        if doubt:  # page matches in a misread image say nothing about what runs: summarised above
            continue
        for im in sp.images:
            modified = tuple(payloads.ModifiedPage(m.gva, m.gpa, m.vaddr, m.file_offset) for m in im.modified)
            data = payloads.Image(cr3=sp.cr3, gva_start=im.gva_start, gva_end=im.gva_end, base=im.base,
                                  pages=im.pages, path=im.path, versions=tuple(sorted(im.versions)),
                                  candidates=tuple(_candidate(c) for c in im.candidates),
                                  modified_pages=modified or None)
            kind = "modified-binary" if modified else "binary"
            yield Observation(kind, f"{space}:0x{im.gva_start:x}", data, prov, Verdict.VERIFIED)
        for u in sp.unknown:
            yield Observation("unknown-code", f"{space}:0x{u.gva_start:x}", payloads.UnknownCode(
                sp.cr3, u.gva_start, u.gva_end, u.pages, u.writable, tuple(u.gpas[:64]), u.head.hex()),
                prov, Verdict.VERIFIED)
        if sp.vdso:
            v = sp.vdso
            yield Observation("vdso", f"{space}:0x{v.gva_start:x}", payloads.Vdso(
                sp.cr3, v.gva_start, v.gva_end, v.name, tuple((p, ver) for p, ver in v.kernel)),
                prov, Verdict.VERIFIED if v.verified else Verdict.UNVERIFIABLE,
                "" if v.verified else (v.reason or VDSO_REASON))
    if report.kernel:
        k = report.kernel
        verified = k.verification is not None and k.verification.verified
        yield Observation("kernel-code", "kernel", payloads.KernelCode(k.pages, k.bytes,
                                                                   tuple((a, b) for a, b in k.ranges[:256])),
                          prov, Verdict.VERIFIED if verified else Verdict.UNVERIFIABLE, "" if verified else k.reason)
        if k.verification is not None:
            yield from kernel_observations(k.verification, prov)
    if not doubt:
        for cr3 in report.missing_vcpu_roots:
            yield Observation("unfound-root", f"cr3:0x{cr3:x}", payloads.UnfoundRoot(cr3), prov, Verdict.VERIFIED,
                              "a vCPU runs on this table but the scan did not accept it as a root")


def kernel_observations(kc: KernelCodeReport, prov: Provenance) -> Iterator[Observation]:
    """Yield one observation per kernel image (verified, modified, unverifiable) and per unknown kernel code range."""
    for im in kc.images:
        changes = tuple(payloads.KernelChange(c.gva, c.function, c.old.hex(), c.new.hex(), c.site)
                        for c in im.changes)
        data = payloads.KernelImage(im.name, im.kind, im.status, im.package, im.version, im.pages, im.pages_verified,
                                    tuple(im.ranges[:64]), tuple(im.modified_pages[:256]), changes,
                                    dict(im.normalised))
        kind = "modified-kernel-image" if im.status == "modified" else "kernel-image"
        verdict = Verdict.UNVERIFIABLE if im.status == "unverifiable" else Verdict.VERIFIED
        yield Observation(kind, f"kernel:{im.name}", data, prov, verdict, im.reason)
    for a, b in kc.unknown[:256]:
        yield Observation("unknown-kernel-code", f"kernel:0x{a:x}", payloads.UnknownKernelCode(a, b, (b - a) // 4096),
                          prov, Verdict.VERIFIED, kc.describe_unknown(a, b))


def _inconsistent(report: ArchReport, prov: Provenance) -> Observation:
    """Return the one observation that replaces per-region findings on an image in doubt."""
    unknown = [u for sp in report.spaces for u in sp.unknown]
    binaries = sorted({(im.path, p, v) for sp in report.spaces for im in sp.images for p, v in im.versions})
    data = {"spaces": len(report.spaces), "exec_pages": sum(sp.exec_pages for sp in report.spaces),
            "identified_pages": sum(sp.identified_pages for sp in report.spaces),
            "unknown_regions": len(unknown), "unknown_pages": sum(u.pages for u in unknown),
            "modified_images": sum(len(sp.modified) for sp in report.spaces),
            "missing_vcpu_roots": report.missing_vcpu_roots, "memory_problems": report.memory_problems,
            "page_matches": [{"path": path, "package": p, "version": v} for path, p, v in binaries[:64]]}
    reason = (f"image inconsistent: {report.doubt}; so {data['unknown_regions']} unknown region(s), "
              f"{data['modified_images']} modified image(s) and {len(binaries)} page-matched binaries are not "
              "reported one by one")
    return Observation("image-inconsistent", report.vm, Details(data), prov, Verdict.UNVERIFIABLE, reason)


def _candidate(c: Candidate) -> payloads.Candidate:
    return payloads.Candidate(c.path, c.package, c.version, c.arch, c.source_package, c.build_id, c.sha256, c.file_id)
