"""Kernel pointer checks: where the system-call table, the IDT, function entries, ftrace and kprobe
handlers and the usual hook targets (proc and socket-seq operation tables) point.

Each code pointer is classified by `CodeMap.classify`, the one place that decides what counts as trusted
code. With kernel code identity (a `KernelCodeReport`: the KB holds the guest's kernel package) a target
must lie in a page that matched the package (`page_verified`): a target in a modified page is
"modified:IMAGE" (a finding of its own, technique "modified-code"), one in unknown kernel code is not
trusted either, whatever range it lies in. Without the kernel package the ranges decide — inside core
kernel text (kallsyms _stext.._etext), inside a listed module's text, or elsewhere — and every hook's
evidence says the target's code was not verified, and why. Elsewhere is a finding; so is a core table
entry pointing into a module where the kernel never puts one.

LSTAR (the SYSCALL entry MSR) has no source here: QEMU's HMP `info registers` does not print it, QMP has
no MSR query and the ELF core's QEMU note carries no MSRs, so it is reported `unverifiable` with that
reason (entry_SYSCALL_64 from kallsyms is what it should hold). Addresses are kernel gvas; nothing pauses.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nephoscope.core.errors import GuestDataError, MemoryAccessError
from nephoscope.os.linux.crossviews import ModuleText, ftrace_ops, layout
from nephoscope.os.linux.walkers import Listing

if TYPE_CHECKING:
    from nephoscope.introspect.kernelcode import KernelCodeReport
    from nephoscope.os.linux.model import LinuxKernel

_BAD = (MemoryAccessError, GuestDataError)
KERNEL_HALF = 0xFFFF800000000000
CORE, ELSEWHERE, UNKNOWN = "core-text", "elsewhere", "unknown-code"
MODIFIED = "modified:"  # owner prefix: a target in a page of this image that differs from its package
MODIFIED_CODE = "modified-code"  # the technique of a pointer whose target page is modified
LSTAR_UNAVAILABLE = ("no source for the LSTAR MSR: QEMU's HMP `info registers` does not print it, QMP has no MSR "
                     "query and the ELF core's QEMU note carries no MSRs")
MAX_SYSCALLS = 1024
KPROBE_TABLE_SIZE = 64  # kernel/kprobes.c: 1 << KPROBE_HASH_BITS
ENDBR64 = b"\xf3\x0f\x1e\xfa"
TEXT_CHUNK = 2 << 20
# operation tables the usual rootkits rewrite (symbol, struct): every code pointer in them is checked
HOOK_TABLES = (
    ("proc_root_operations", "file_operations"), ("proc_root_inode_operations", "inode_operations"),
    ("proc_dir_operations", "file_operations"), ("proc_sops", "super_operations"),
    ("tcp4_seq_ops", "seq_operations"), ("tcp6_seq_ops", "seq_operations"),
    ("udp_seq_ops", "seq_operations"), ("udp6_seq_ops", "seq_operations"),
)
# data members (not code pointers) of those structs
DATA_MEMBERS = {"file_operations": ("owner",)}


@dataclass(frozen=True, slots=True)
class CodeMap:
    """Where trusted kernel code is: core text and the listed modules' text ranges, and — when the KB holds
    the kernel package — which of their pages verified against it."""

    core: tuple[int, int]
    modules: tuple[ModuleText, ...]
    code: KernelCodeReport | None = None
    unverified: str = ""  # why `code` is None (the targets' code was not verified)

    def range_owner(self, gva: int) -> str:
        """Return "core-text", "module:NAME" or "elsewhere" by address ranges alone (kernel gva)."""
        if self.core[0] <= gva < self.core[1]:
            return CORE
        for m in self.modules:
            if m.start <= gva < m.end:
                return f"module:{m.name}"
        return ELSEWHERE

    def classify(self, gva: int) -> str:
        """Return "core-text" or "module:NAME" for trusted code, else "modified:IMAGE", "unknown-code" or
        "elsewhere" (kernel gva). With kernel code identity, trusted means a verified page; an image the
        verifier could not judge (unverifiable) keeps the range classification, and `note` says so."""
        owner = self.range_owner(gva)
        if self.code is None or owner == ELSEWHERE:
            return owner
        loc = self.code.classify(gva)
        if loc is None or loc.page_verified:
            return owner
        if loc.status == "modified":
            return f"{MODIFIED}{loc.image}"
        if loc.status == "unknown":  # a listed module its package does not ship; else a module that failed to verify
            return UNKNOWN if self.code.unknown_owner(gva) else owner
        return owner

    def note(self, gva: int) -> str:
        """Return what kernel code identity says about the code at kernel gva `gva` (for evidence)."""
        if self.code is None:
            return f"its code was not verified ({self.unverified or 'no kernel code identity'})"
        loc = self.code.classify(gva)
        if loc is None:
            return "arch saw no executable kernel memory there"
        if loc.status == "unknown":
            return f"unknown kernel code: {self.code.describe_unknown(gva, gva + 1)}"
        if loc.image == "" or (image := self.code.image(loc.image)) is None:
            return "its code was not verified (no image claims it)"
        where = f"{loc.function} in {loc.image}" if loc.function else loc.image
        if loc.page_verified:
            return f"{where}, a page verified against {image.package or 'its package'}"
        if loc.status == "modified":
            page = gva & ~0xFFF
            changed = sorted({c.function for c in image.changes if c.gva & ~0xFFF == page})
            return (f"{where}, a page that differs from {image.package} {image.version}"
                    + (f" (changed: {', '.join(changed[:4])})" if changed else ""))
        return f"{where}, whose code was not verified ({image.reason or loc.status})"


@dataclass(frozen=True, slots=True)
class Hook:
    """A kernel code pointer that points where it should not."""

    technique: str  # syscall-hook, idt-hook, inline-hook, ftrace-hook, kprobe-hook, ops-hook
    where: str  # what holds the pointer: "sys_call_table[62]", "__x64_sys_acct+0", ...
    target: int
    owner: str  # CodeMap.classify(target)
    evidence: str


def code_map(k: LinuxKernel, modules: list[ModuleText], code: KernelCodeReport | None = None,
             unverified: str = "") -> CodeMap:
    """Return the code map of `k`: kallsyms _stext.._etext, the given listed modules' text and, when
    given, the kernel code identity that decides which of their pages are trusted."""
    return CodeMap((k.symbols.get("_stext"), k.symbols.get("_etext")), tuple(modules), code, unverified)


def _symbol_at(k: LinuxKernel, gva: int) -> str:
    hit = k.symbols.lookup(gva)
    return f"{hit[0]}+0x{hit[1]:x}" if hit else f"0x{gva:x}"


def _describe(k: LinuxKernel, cmap: CodeMap, gva: int) -> str:
    owner = cmap.classify(gva)
    if owner == CORE or owner.startswith(MODIFIED):
        where = _symbol_at(k, gva)
    else:
        where = {ELSEWHERE: "in no kernel text and no listed module", UNKNOWN: "in unknown kernel code"}.get(owner,
                                                                                                         owner)
    return f"0x{gva:x} ({where}; {cmap.note(gva)})"


def check_syscall_tables(k: LinuxKernel, cmap: CodeMap) -> Listing[Hook]:
    """Check every sys_call_table (and ia32_sys_call_table) entry: core text, a __x64_sys_* function."""
    out: Listing[Hook] = Listing()
    addresses = sorted({a for a, _t, _n in k.symbols.entries()})
    found = False
    # kallsyms names one symbol per address: argument-less system calls answer as their __do_sys_ alias
    for table, prefixes in (("sys_call_table", ("__x64_sys_", "__do_sys_", "sys_ni_syscall")),
                            ("ia32_sys_call_table", ("__ia32_sys_", "__ia32_compat_sys_", "sys_ni_syscall",
                                                     "__do_sys_", "__do_compat_sys_"))):
        base = k.symbols.find(table)
        if base is None:
            continue
        found = True
        i = bisect.bisect_right(addresses, base)
        count = min(MAX_SYSCALLS, ((addresses[i] - base) // 8) if i < len(addresses) else MAX_SYSCALLS)
        try:
            raw = k.read(base, 8 * count)
        except _BAD as exc:
            out.fail(f"{table} unreadable ({exc})")
            continue
        for nr, target in enumerate(struct.unpack(f"<{count}Q", raw)):
            if not target:  # past the last system call: the padding up to the next symbol
                break
            owner = cmap.classify(target)
            name = (k.symbols.lookup(target) or ("", 0)) if owner == CORE else ("", 0)
            if owner == CORE and name[1] == 0 and name[0].startswith(prefixes):
                continue
            what = ("is not a system-call function" if owner == CORE else "points into modified kernel code"
                    if owner.startswith(MODIFIED) else "points into unknown kernel code" if owner == UNKNOWN
                    else "points out of kernel text")
            out.items.append(Hook("syscall-hook", f"{table}[{nr}]", target, owner,
                                  f"{table}[{nr}] at 0x{base + 8 * nr:x} {what}: {_describe(k, cmap, target)}"))
    if not found:
        out.fail("kallsyms lacks sys_call_table")
    return out


def check_idt(k: LinuxKernel, cmap: CodeMap, idtr_base: int | None) -> Listing[Hook]:
    """Check every present IDT gate's handler; the IDT is read at the vCPU's IDTR base when known (else
    idt_table), and an IDTR that maps other memory than idt_table is itself a finding."""
    out: Listing[Hook] = Listing()
    table = k.symbols.find("idt_table")
    base = idtr_base if idtr_base else table
    if base is None:
        return out.fail("no IDTR base and kallsyms lacks idt_table")
    try:
        raw = k.read(base, 256 * 16)
    except _BAD as exc:
        return out.fail(f"the IDT at 0x{base:x} is unreadable ({exc})")
    if idtr_base and table is not None:
        here, there = k.kernel.find_translation(idtr_base), k.kernel.find_translation(table)
        if here is not None and there is not None and here != there:
            out.items.append(Hook("idt-hook", "IDTR", idtr_base, cmap.classify(idtr_base),
                                  f"the IDTR base 0x{idtr_base:x} maps gpa 0x{here:x}, not idt_table's 0x{there:x}"))
    early = k.symbols.find("early_idt_handler_array")
    for vector in range(256):
        lo, _seg, bits, mid, hi, _rsv = struct.unpack_from("<HHHHII", raw, 16 * vector)
        if not bits & 0x8000:
            continue
        handler = lo | (mid << 16) | (hi << 32)
        owner = cmap.classify(handler)
        # reserved exception vectors (below 32) the kernel never re-points keep their boot-time handler in
        # early_idt_handler_array (init text, EARLY_IDT_HANDLER_SIZE: 9 bytes per vector, 13 with IBT's endbr)
        if early is not None and vector < 32 and handler - early in (9 * vector, 13 * vector):
            continue
        if owner != CORE:
            out.items.append(Hook("idt-hook", f"IDT vector {vector}", handler, owner,
                                  f"IDT vector {vector} (0x{vector:x}) handler {_describe(k, cmap, handler)}"))
    return out


def check_lstar(k: LinuxKernel, lstar: int | None, cmap: CodeMap) -> tuple[list[Hook], str]:
    """Return (hooks, why unverifiable): LSTAR must be entry_SYSCALL_64 (or its PTI trampoline)."""
    if lstar is None:
        return [], LSTAR_UNAVAILABLE
    expected = {k.symbols.find(n) for n in ("entry_SYSCALL_64", "entry_SYSCALL_64_trampoline")} - {None}
    if lstar in expected or (cmap.classify(lstar) == CORE and _symbol_at(k, lstar).startswith("entry_SYSCALL")):
        return [], ""
    return [Hook("syscall-hook", "LSTAR", lstar, cmap.classify(lstar),
                 f"LSTAR is {_describe(k, cmap, lstar)}, not entry_SYSCALL_64")], ""


def _jump_target(k: LinuxKernel, gva: int, code: bytes) -> int | None:
    """Return where the instruction at the start of `code` jumps to, for the patterns inline hooks write."""
    if code[:1] == b"\xe9":
        return (gva + 5 + struct.unpack_from("<i", code, 1)[0]) & (2**64 - 1)
    if code[:2] == b"\xff\x25":  # jmp [rip+disp32]
        try:
            return k.u64((gva + 6 + struct.unpack_from("<i", code, 2)[0]) & (2**64 - 1))
        except _BAD:
            return None
    if code[:2] == b"\x48\xb8" and code[10:12] == b"\xff\xe0":  # movabs rax, imm64; jmp rax
        return struct.unpack_from("<Q", code, 2)[0]
    if code[:1] == b"\x68" and code[5:6] == b"\xc3":  # push imm32; ret
        return struct.unpack_from("<i", code, 1)[0] & (2**64 - 1)
    return None


def check_function_entries(k: LinuxKernel, cmap: CodeMap) -> Listing[Hook]:
    """Check the first instruction of every core-text function: a jump out of core text is an inline hook
    (static-call trampolines, __SCT__*, may jump into a listed module's text)."""
    out: Listing[Hook] = Listing()
    lo, hi = cmap.core
    funcs = sorted((a, n) for a, t, n in k.symbols.entries() if t in "tT" and lo <= a < hi)
    text = bytearray()
    try:
        for at in range(lo, hi, TEXT_CHUNK):
            text += k.read(at, min(TEXT_CHUNK, hi - at))
    except _BAD as exc:
        return out.fail(f"core kernel text unreadable at 0x{lo + len(text):x} ({exc})")
    for gva, name in funcs:
        pos = gva - lo
        code = bytes(text[pos:pos + 16])
        skip = 4 if code.startswith(ENDBR64) else 0
        target = _jump_target(k, gva + skip, code[skip:] + bytes(16))
        if target is None:
            continue
        owner = cmap.classify(target)
        if owner == CORE or (owner.startswith("module:") and name.startswith("__SCT__")):
            continue
        out.items.append(Hook("inline-hook", f"{name}+0x{skip:x}", target, owner,
                              f"{name} at 0x{gva:x} begins with a jump to {_describe(k, cmap, target)} "
                              f"(bytes {code[skip:skip + 12].hex()})"))
    return out


def check_ftrace(k: LinuxKernel, cmap: CodeMap) -> Listing[Hook]:
    """Check every registered ftrace_ops' callback: a callback outside core text hooks kernel functions."""
    ops = ftrace_ops(k)
    out: Listing[Hook] = Listing(complete=ops.complete, problem=ops.problem)
    for gva, func, _tramp, _size in ops:
        owner = cmap.classify(func)
        if owner != CORE:
            out.items.append(Hook("ftrace-hook", f"ftrace_ops 0x{gva:x}", func, owner,
                                  f"ftrace_ops 0x{gva:x} on ftrace_ops_list calls {_describe(k, cmap, func)} "
                                  "on every traced function"))
    return out


def check_kprobes(k: LinuxKernel, cmap: CodeMap) -> Listing[Hook]:
    """Check every registered kprobe's handlers (kprobe_table hash lists)."""
    off = layout(k)
    out: Listing[Hook] = Listing()
    table = k.symbols.find("kprobe_table")
    if table is None or "kprobe.pre_handler" not in off:
        return out.fail("kallsyms lacks kprobe_table")
    for bucket in range(KPROBE_TABLE_SIZE):
        try:
            node, seen = k.u64(table + 8 * bucket), 0
            while node:
                seen += 1
                if seen > 4096:
                    return out.fail(f"kprobe_table[{bucket}] is longer than 4096 entries or cyclic")
                k.budget.node()
                probe = node - off["kprobe.hlist"]
                addr = k.u64(probe + off["kprobe.addr"])
                for member in ("pre_handler", "post_handler"):
                    handler = k.u64(probe + off[f"kprobe.{member}"])
                    if handler and cmap.classify(handler) != CORE:
                        out.items.append(Hook("kprobe-hook", f"kprobe on {_symbol_at(k, addr)}", handler,
                                              cmap.classify(handler),
                                              f"a kprobe on {_symbol_at(k, addr)} runs {member} "
                                              f"{_describe(k, cmap, handler)}"))
                node = k.u64(node + off["hlist_node.next"])
        except _BAD as exc:
            return out.fail(f"kprobe_table[{bucket}] unreadable ({exc})")
    return out


def check_hook_tables(k: LinuxKernel, cmap: CodeMap) -> Listing[Hook]:
    """Check every code pointer of the usual hook targets (proc's and the socket seq operation tables)."""
    out: Listing[Hook] = Listing()
    off = layout(k)
    for symbol, struct_name in HOOK_TABLES:
        gva = k.symbols.find(symbol)
        if gva is None or not k.types.has_struct(struct_name):
            continue
        size = k.types.struct_size(struct_name)
        skip = {off[f"{struct_name}.{m}"] for m in DATA_MEMBERS.get(struct_name, ()) if f"{struct_name}.{m}" in off}
        try:
            raw = k.read(gva, size)
        except _BAD as exc:
            out.fail(f"{symbol} unreadable ({exc})")
            continue
        for at in range(0, size - size % 8, 8):
            value = struct.unpack_from("<Q", raw, at)[0]
            if at in skip or value < KERNEL_HALF:
                continue
            owner = cmap.classify(value)
            if owner != CORE:
                out.items.append(Hook("ops-hook", f"{symbol}+0x{at:x}", value, owner,
                                      f"{symbol} ({struct_name}) at +0x{at:x} points to {_describe(k, cmap, value)}"))
    return out


CHECKS = {
    "sys_call_table": check_syscall_tables,
    "function-entries": check_function_entries,
    "ftrace": check_ftrace,
    "kprobes": check_kprobes,
    "hook-tables": check_hook_tables,
}
