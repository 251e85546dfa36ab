"""Pointer checks joined with kernel code identity, without a VM: a hook target is trusted only in a verified
page; a modified page or unknown kernel code is named; without the kernel package the ranges decide and
the evidence says why the code was not verified. Also: the KB's module list tells a module its package ships
from a foreign one."""

from __future__ import annotations

import sqlite3

from nephoscope.introspect.kernelcode import (
    MODIFIED,
    UNVERIFIABLE,
    VERIFIED,
    ByteChange,
    ImageVerdict,
    KernelCodeReport,
)
from nephoscope.introspect.kernelhooks import CORE, ELSEWHERE, UNKNOWN, CodeMap
from nephoscope.knowledge.kernelpkg import KernelStore
from nephoscope.os.linux.crossviews import ModuleText

TEXT = 0xFFFFFFFF81000000
CORE_TEXT = (TEXT, TEXT + 0x10000)
PATCHED = TEXT + 0x3000  # the page nphrk's inline patch changed
E1000 = ModuleText("e1000", 0xFFFFFFFFC0010000, 0xFFFFFFFFC0000000, 0xFFFFFFFFC0008000,
                   (0xFFFFFFFFC0000000, 0xFFFFFFFFC0020000))
FOREIGN = (0xFFFFFFFFC0100000, 0xFFFFFFFFC0104000)  # a module its kernel package does not ship


def _report(e1000_status: str = VERIFIED) -> KernelCodeReport:
    vmlinux = ImageVerdict("vmlinux", "vmlinux", MODIFIED, "1 page(s) differ", "linux-image-6.1.0-57-amd64",
                           "6.1.192-3", [CORE_TEXT], 16, 15, [PATCHED],
                           [ByteChange(PATCHED + 0x10, "__x64_sys_acct+0x0", b"\x0f\x1f\x44\x00\x00",
                                       b"\xe9\x00\x00\x00\x00")])
    e1000 = ImageVerdict("e1000", "module", e1000_status, "" if e1000_status == VERIFIED else "not in KB",
                         ranges=[(E1000.start, E1000.end)], pages=8)
    return KernelCodeReport("6.1.0-57-amd64", [vmlinux, e1000], [FOREIGN], 30,
                            kernel_symbol=lambda gva: f"sym+0x{gva - TEXT:x}", unshipped={"nph_own": FOREIGN})


def test_a_verified_page_is_trusted_a_modified_page_is_named() -> None:
    cmap = CodeMap(CORE_TEXT, (E1000,), _report())
    assert cmap.classify(TEXT + 0x1000) == CORE
    assert "a page verified against linux-image-6.1.0-57-amd64" in cmap.note(TEXT + 0x1000)
    assert cmap.classify(PATCHED + 0x10) == "modified:vmlinux"
    note = cmap.note(PATCHED + 0x10)
    assert "differs from linux-image-6.1.0-57-amd64 6.1.192-3" in note and "__x64_sys_acct+0x0" in note
    assert cmap.classify(E1000.start + 0x100) == "module:e1000"


def test_unknown_kernel_code_is_never_trusted_and_names_the_module() -> None:
    cmap = CodeMap(CORE_TEXT, (E1000, ModuleText("nph_own", 0, FOREIGN[0], FOREIGN[1], FOREIGN)), _report())
    assert CodeMap(CORE_TEXT, cmap.modules).classify(FOREIGN[0] + 8) == "module:nph_own"  # ranges alone trust it
    assert cmap.classify(FOREIGN[0] + 8) == UNKNOWN
    assert "module nph_own, which the KB's package linux-image-6.1.0-57-amd64 does not ship" in \
        cmap.note(FOREIGN[0] + 8)
    assert cmap.classify(0xFFFFFFFFC0400000) == ELSEWHERE


def test_an_unverifiable_image_keeps_the_range_and_says_why() -> None:
    cmap = CodeMap(CORE_TEXT, (E1000,), _report(UNVERIFIABLE))
    assert cmap.classify(E1000.start) == "module:e1000"
    assert "not verified (not in KB)" in cmap.note(E1000.start)


def test_without_the_kernel_package_the_ranges_decide_and_the_evidence_says_why() -> None:
    why = "the KB holds no kernel package of kernel 6.1.0-57-amd64"
    cmap = CodeMap(CORE_TEXT, (E1000,), None, why)
    assert cmap.classify(PATCHED + 0x10) == CORE
    assert cmap.note(PATCHED) == f"its code was not verified ({why})"


def test_the_kb_keeps_the_module_list_of_a_kernel_package() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE packages(id INTEGER PRIMARY KEY, name TEXT, version TEXT)")
    store = KernelStore(conn)
    assert store.module_names("6.1.0-57-amd64") is None  # an older KB: no list, cannot tell
    store.add_module_list(1, "6.1.0-57-amd64", {"e1000", "virtio_net"})
    assert store.module_names("6.1.0-57-amd64") == {"e1000", "virtio_net"}
    store.add_module_list(1, "6.1.0-57-amd64", {"e1000"})  # re-ingest replaces it
    assert store.module_names("6.1.0-57-amd64") == {"e1000"}
    assert store.module_names("6.12.0-1-amd64") is None


def test_a_pointer_into_modified_code_is_a_modified_kernel_code_finding() -> None:
    from nephoscope.analysis.merge import merge
    from nephoscope.core.payloads import KernelTamper
    from nephoscope.core.records import Observation, Provenance, Verdict

    evidence = "sys_call_table[163] at 0x1 points into modified kernel code: 0x2 (__x64_sys_acct+0x0; ...)"
    obs = Observation("kernel-tamper", "modified-code:sys_call_table[163]",
                      KernelTamper("modified-code", "sys_call_table", "sys_call_table[163]", PATCHED + 0x10,
                                   "modified:vmlinux", None, "", evidence),
                      Provenance("inspect", "t", 0.0), Verdict.VERIFIED)
    findings = merge([obs], ["inspect"], "t").findings
    assert [(f.kind, f.severity) for f in findings] == [("modified-kernel-code", "critical")]
    assert "points into modified kernel code" in findings[0].title and "__x64_sys_acct" in findings[0].title
