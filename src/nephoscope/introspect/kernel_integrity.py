"""inspect's kernel-integrity pass: the task and module cross-views and the kernel pointer checks.

Each claim becomes a `kernel-tamper` observation (`verified`: the views or checks it rests on were
complete and the pointer is real code); whatever could not be read completely is `unverifiable` with the
reason, and feeds no claim. Pointer targets are trusted only in pages that verified against the KB's kernel
package (kernel code identity, `kernelcode.verify_kernel`) when the KB holds it; a target in a modified page
is a `modified-code` claim; without the package the address ranges decide and the evidence says the code
was not verified, and why. A pointer into memory that is not mapped executable in the kernel page tables
is corrupt data, not a hook (a hook has to run): that check is then unverifiable too. Reads guest RAM
through the kernel model's one read budget; the VM keeps running.
"""

from __future__ import annotations

from collections.abc import Iterator

from nephoscope.core import payloads
from nephoscope.core.errors import GuestDataError, MemoryAccessError, NephoscopeError
from nephoscope.core.records import Observation, Verdict
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect import kernelhooks
from nephoscope.introspect.base import observe, unverifiable
from nephoscope.introspect.kernelcode import KernelCodeReport
from nephoscope.knowledge.kernelpkg import KernelStore
from nephoscope.os.linux import crossviews
from nephoscope.os.linux.model import LinuxKernel

NAME = "inspect"
DEFAULT_KB = object()  # collect's default store: open the default KB
_BAD = (MemoryAccessError, GuestDataError)


def _is_code(k: LinuxKernel, gva: int) -> bool:
    """Return whether kernel gva is mapped executable in the kernel page tables."""
    try:
        return any(m.executable for m in k.kernel.iter_mappings(exec_only=True, start=gva, end=gva + 1))
    except _BAD:
        return False


def _root_gpas(k: LinuxKernel) -> tuple[list[int] | None, str]:
    """Return the page-table roots the hardware has (a RAM scan, no OS knowledge), or None and why not."""
    from nephoscope.memory.roots import scan_roots

    try:
        scan = scan_roots(k.phys)  # type: ignore[arg-type]
    except NephoscopeError as exc:
        return None, f"page-table roots could not be scanned ({exc})"
    if scan.not_examined:
        return None, f"the root scan left {scan.not_examined} candidates unexamined"
    return [r.gpa for r in scan.roots], ""


def kernel_code(k: LinuxKernel, store: KernelStore | object | None = DEFAULT_KB,
                ) -> tuple[KernelCodeReport | None, str]:
    """Return the kernel code identity of `k` against `store` (default: the default KB's kernel images), or
    None and why it is not available (kernel gvas; does not pause)."""
    from nephoscope.introspect.kernelcode import verify_kernel

    release = k.info.release or "?"
    db = None
    try:
        if store is DEFAULT_KB:
            from nephoscope.knowledge.binaries import CodePageDB, default_path

            if not default_path().exists():
                return None, f"no KB at {default_path()}"
            db = CodePageDB.open()
            store = db.kernel_store()
        if store is None:
            return None, "no KB was given"
        if store.find_vmlinux(release) is None:  # type: ignore[union-attr]
            return None, (f"the KB holds no kernel package of kernel {release}; add it: "
                          f"nephoscope kb add linux-image-{release}")
        return verify_kernel(k, store), ""  # type: ignore[arg-type]
    except NephoscopeError as exc:
        return None, f"kernel code verification failed ({exc})"
    finally:
        if db is not None:
            db.close()


def collect(k: LinuxKernel, vm: VmTarget, idtr_base: int | None = None, lstar: int | None = None,
            store: KernelStore | object | None = DEFAULT_KB) -> Iterator[Observation]:
    """Yield hidden tasks and modules and hooked kernel pointers of `k` (kernel-tamper observations);
    pointer targets are checked against kernel code identity from `store` (default: the default KB)."""
    roots, why = _root_gpas(k)
    if roots is None:
        yield unverifiable(NAME, vm, "task-views:address-space", why)
    try:
        tasks = crossviews.task_views(k, roots)
    except _BAD as exc:
        yield unverifiable(NAME, vm, "task-views", f"the task cross-views failed ({exc})")
        tasks = None
    if tasks is not None:
        if not tasks.hidden.complete:
            yield unverifiable(NAME, vm, "task-views", tasks.hidden.problem)
        elif tasks.hidden.problem:
            yield unverifiable(NAME, vm, "task-views:partial", tasks.hidden.problem)
        for h in tasks.hidden.items:
            if len(h.missing_from) < 2:
                continue  # missing from one primary view only: the task-list/PID-table cross-view reports it
            yield observe(NAME, vm, "kernel-tamper", f"hidden-task:{h.pid}",
                          payloads.KernelTamper("hidden-task", ",".join(h.seen_by), "task", h.task_gva, "", h.pid,
                                                "", h.evidence), Verdict.VERIFIED)
    try:
        mods = crossviews.module_views(k)
    except _BAD as exc:
        yield unverifiable(NAME, vm, "module-views", f"the module cross-views failed ({exc})")
        return
    if not mods.hidden.complete:
        yield unverifiable(NAME, vm, "module-views", mods.hidden.problem)
    for m in mods.hidden.items:
        yield observe(NAME, vm, "kernel-tamper", f"hidden-module:{m['module']}:{m.get('gva_start', 0):x}",
                      payloads.KernelTamper("hidden-module", ",".join(m["seen_by"]),  # type: ignore[arg-type]
                                            f"0x{m.get('gva_start', 0):x}", int(m.get("gva_start", 0)) or None,
                                            "", None, str(m["module"]), str(m["evidence"])), Verdict.VERIFIED)
    if not mods.listed.complete:
        yield unverifiable(NAME, vm, "kernel-hooks", "the module list is incomplete, so a pointer into a module "
                                                     f"cannot be told from a hook ({mods.listed.problem})")
        return
    code, why = kernel_code(k, store)
    if code is None:
        yield unverifiable(NAME, vm, "kernel-code", f"hook targets are checked by address range only: {why}")
    cmap = kernelhooks.code_map(k, mods.listed.items, code, why)
    checks = dict(kernelhooks.CHECKS)
    checks["idt"] = lambda k_, c_: kernelhooks.check_idt(k_, c_, idtr_base)
    for name, check in checks.items():
        try:
            result = check(k, cmap)
        except _BAD as exc:
            yield unverifiable(NAME, vm, f"kernel-hooks:{name}", f"the {name} check failed ({exc})")
            continue
        if not result.complete:
            yield unverifiable(NAME, vm, f"kernel-hooks:{name}", result.problem)
        corrupt = [h for h in result.items if h.where != "IDTR" and not _is_code(k, h.target)]
        if corrupt:
            yield unverifiable(NAME, vm, f"kernel-hooks:{name}",
                               f"{len(corrupt)} pointer(s) lead to no executable kernel memory (corrupt data, not "
                               f"hooks), e.g. {corrupt[0].evidence}")
        for h in result.items:
            if h in corrupt:
                continue
            technique = kernelhooks.MODIFIED_CODE if h.owner.startswith(kernelhooks.MODIFIED) else h.technique
            yield observe(NAME, vm, "kernel-tamper", f"{technique}:{h.where}",
                          payloads.KernelTamper(technique, name, h.where, h.target, h.owner, None, "", h.evidence),
                          Verdict.VERIFIED)
    hooks, why = kernelhooks.check_lstar(k, lstar, cmap)
    if why:
        yield unverifiable(NAME, vm, "kernel-hooks:lstar", why)
    for h in hooks:
        yield observe(NAME, vm, "kernel-tamper", "syscall-hook:LSTAR",
                      payloads.KernelTamper(h.technique, "lstar", h.where, h.target, h.owner, None, "", h.evidence),
                      Verdict.VERIFIED)
