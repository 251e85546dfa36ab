"""Kernel code identity on the rootkit lab guest (issue 14): arch names the inline patch and the ftrace hook as
modified kernel code and the hidden module's memory as unknown kernel code; inspect's pointer checks trust
only verified pages.

Ground truth is the guest's manifest (`kernel_log`: the patched function, the hook target, the ftrace
hook's function). The KB: a temporary one holding only the guest's kernel package (as
test_kernel_code_dump.py builds it); the default KB is left alone.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from kernel_kb import kernel_kb

from nephoscope.analysis.merge import merge
from nephoscope.core.records import Finding
from nephoscope.introspect import kernel_integrity
from nephoscope.introspect.arch import scan_target
from nephoscope.introspect.kernel import open_kernel
from nephoscope.knowledge.binaries import CodePageDB
from nephoscope.lab import runner
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest


def _log(manifest: dict, pattern: str) -> re.Match[str]:
    hit = next((m for line in manifest["kernel_log"] if (m := re.search(pattern, line))), None)
    assert hit is not None, f"nphrk did not log {pattern!r}: {manifest['kernel_log']}"
    return hit


@pytest.fixture(scope="module")
def kb_path(rootkit_guest: runner.Guest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kernel_kb(rootkit_guest.manifest(), tmp_path_factory.mktemp("rkkb") / "kb.sqlite")


@pytest.fixture(scope="module")
def arch_findings(rootkit_guest: runner.Guest, kb_path: Path) -> list[Finding]:
    report = scan_target(resolve_target(rootkit_guest.name), kb_path, pause=True)
    return merge(report.to_observations(), ["arch"], rootkit_guest.name).findings


def _changed_functions(findings: list[Finding]) -> dict[str, str]:
    """Return {function+offset: site kind} of every change the modified-kernel-code findings list."""
    out = {}
    for f in findings:
        if f.kind == "modified-kernel-code":
            for c in f.evidence[0]["data"]["changes"]:
                out[c["function"]] = c["site"]
    return out


def test_arch_names_the_inline_patch_as_modified_kernel_code(rootkit_guest: runner.Guest,
                                                             arch_findings: list[Finding]) -> None:
    patched = _log(rootkit_guest.manifest(), r"(\S+) at \w+ now jumps to (\w+)").group(1)
    modified = [f for f in arch_findings if f.kind == "modified-kernel-code"]
    assert len(modified) == 1 and "vmlinux" in modified[0].title and patched in modified[0].title
    assert f"{patched}+0x0" in _changed_functions(arch_findings)


def test_arch_reports_the_ftrace_hook_at_its_fentry_site(rootkit_guest: runner.Guest,
                                                         arch_findings: list[Finding]) -> None:
    """nphrk's ftrace_ops makes ftrace call its trampoline at filldir64's fentry site: a call to code in no
    image is no variant the kernel's own ftrace writes there (ftrace_caller's call site is normalised)."""
    fn = _log(rootkit_guest.manifest(), r"ftrace hook on (\w+) at").group(1)
    changed = _changed_functions(arch_findings)
    assert changed.get(f"{fn}+0x1") == "mcount", changed
    assert not [f for f in changed if f.startswith(("ftrace_call", "ftrace_regs_call"))], changed


def test_arch_reports_the_hidden_module_memory_as_unknown_kernel_code(rootkit_guest: runner.Guest,
                                                                      arch_findings: list[Finding]) -> None:
    manifest = rootkit_guest.manifest()
    hook = int(_log(manifest, r"sys_call_table\[\d+\] at \w+ -> (\w+)").group(1), 16)
    jump = int(_log(manifest, r"now jumps to (\w+)").group(1), 16)
    unknown = [(f.evidence[0]["data"]["gva_start"], f.evidence[0]["data"]["gva_end"])
               for f in arch_findings if f.kind == "unknown-kernel-code"]
    for target in (hook, jump):  # nphrk's own functions, in the module memory it hid
        assert any(a <= target < b for a, b in unknown), (hex(target), [(hex(a), hex(b)) for a, b in unknown])


@pytest.fixture(scope="module")
def inspect_claims(rootkit_guest: runner.Guest, kb_path: Path) -> list:
    db = CodePageDB.open(kb_path)
    vm = resolve_target(rootkit_guest.name)
    try:
        with open_kernel(vm) as k:
            return list(kernel_integrity.collect(k, vm, store=db.kernel_store()))
    finally:
        db.close()


def test_inspect_trusts_only_verified_pages(rootkit_guest: runner.Guest, inspect_claims: list) -> None:
    manifest = rootkit_guest.manifest()
    slot = _log(manifest, r"sys_call_table\[(\d+)\]").group(1)
    patched = _log(manifest, r"(\S+) at \w+ now jumps to").group(1)
    tamper = {o.key: o.payload for o in inspect_claims if o.kind == "kernel-tamper"}
    hook = tamper[f"syscall-hook:sys_call_table[{slot}]"]
    assert hook.owner == "elsewhere" and "unknown kernel code" in hook.evidence  # type: ignore[attr-defined]
    # the table slot of the patched function is intact, but its target's page is not the package's
    modified = [p for k, p in tamper.items() if k.startswith("modified-code:")]
    assert any(patched in p.evidence and p.owner == "modified:vmlinux" for p in modified), modified  # type: ignore[attr-defined]
    inline = tamper[f"inline-hook:{patched}+0x0"]
    assert "unknown kernel code" in inline.evidence  # type: ignore[attr-defined]
    assert not [o for o in inspect_claims if o.key == "kernel-code"]  # the KB had the package: code identity ran
    view = merge(inspect_claims, ["inspect"], rootkit_guest.name)
    assert "modified-kernel-code" in {f.kind for f in view.findings}


def test_without_the_kernel_package_inspect_says_why_the_code_was_not_verified(
        rootkit_guest: runner.Guest, tmp_path: Path) -> None:
    db = CodePageDB.open(tmp_path / "empty.sqlite")
    vm = resolve_target(rootkit_guest.name)
    try:
        with open_kernel(vm) as k:
            claims = list(kernel_integrity.collect(k, vm, store=db.kernel_store()))
    finally:
        db.close()
    doubt = [o for o in claims if o.key == "kernel-code"]
    assert doubt and "holds no kernel package of kernel" in doubt[0].reason
    hooks = [o.payload for o in claims if o.kind == "kernel-tamper" and o.key.startswith("syscall-hook:")]
    assert hooks and all("its code was not verified" in h.evidence for h in hooks)  # type: ignore[attr-defined]
    assert not [o for o in claims if o.key.startswith("modified-code:")]


def test_manifest_kernel_matches_the_kb(rootkit_guest: runner.Guest, kb_path: Path) -> None:
    db = CodePageDB.open(kb_path)
    try:
        release = rootkit_guest.manifest()["kernel"]["release"]
        assert db.kernel_store().find_vmlinux(release) is not None
        names = db.kernel_store().module_names(release)
        assert names and "nphrk" not in names and "e1000" in names
    finally:
        db.close()
