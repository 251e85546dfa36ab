"""The x86-64 Linux kernel's own tables of the code it patches at boot and load, and their legitimate variants.

Every table here is decoded from bytes of a trusted file (the package's vmlinux or .ko) or from guest
memory; either way, each entry is bounded and validated: an address outside the text it describes, an
absurd count or a length no instruction has makes the whole table unreadable (`SiteTableError` names the
table), never a crash. Addresses are link-time virtual addresses of the image the table belongs to
(`Site.start`); the verifier adds the load offset.

Tables (arch/x86, 6.1 and 6.12):
  .altinstructions      struct alt_instr: s32 instr, s32 repl, u16 cpuid (6.1) | u32 ft_flags (6.12), u8 len, u8 replen
  .parainstructions     struct paravirt_patch_site (6.1): u8 *instr, u8 type, u8 len (16 bytes)
  __jump_table          struct jump_entry: s32 code, s32 target, long key (relative, 16 bytes)
  .static_call_sites    struct static_call_site: s32 addr, s32 key (relative, 8 bytes)
  .retpoline_sites, .return_sites, .call_sites, .smp_locks, .ibt_endbr_seal   s32 relative offsets
  __mcount_loc          unsigned long absolute addresses (the `call __fentry__` sites)
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from nephoscope.core.errors import GuestDataError

MAX_SITES = 1 << 20  # no kernel has a million patch sites of one kind (6.1: 46k mcount sites, the most)
MAX_SITE_LEN = 64  # longest alternative seen is ~30 bytes; anything longer is garbage
INT3 = 0xCC
JMP8, JMP32, CALL32, RET = 0xEB, 0xE9, 0xE8, 0xC3
LOCK, DS = 0xF0, 0x3E
XOR5RAX = bytes((0x2E, 0x2E, 0x2E, 0x31, 0xC0))  # a static call to __static_call_return0: "xor %eax,%eax"


class SiteTableError(GuestDataError):
    """A patch-site table could not be read or does not describe this image; the message names the table."""


@dataclass(frozen=True, slots=True)
class Site:
    """One place the kernel may rewrite: [start, start+length) in link-time addresses, its kind and variants.

    `repl` is the alternative's replacement bytes (and `repl_addr` their link address); `target` a jump
    label's jump target (link address). A "reloc_range" site is a module relocation whose target section
    has no known load address: its field, read as a signed (4 bytes) or unsigned (8 bytes) integer, must
    lie in [target, bound] (the module's own allocation of the section's kind, see kernelcode)."""

    start: int
    length: int
    kind: str  # "alternative", "paravirt", "jump_label", "static_call", "retpoline", "return", "call", "lock",
    #            "endbr", "mcount", "static_call_tramp", "ftrace_call", "reloc_range"
    repl: bytes = b""
    repl_addr: int = 0
    target: int = 0
    bound: int = 0


# --- decoding -------------------------------------------------------------------------------------------


def _check_count(table: str, data: bytes, stride: int) -> int:
    if len(data) % stride:
        raise SiteTableError(f"{table}: {len(data)} bytes is not a whole number of {stride}-byte entries")
    count = len(data) // stride
    if count > MAX_SITES:
        raise SiteTableError(f"{table}: {count} entries is absurd (limit {MAX_SITES})")
    return count


def _in(addr: int, length: int, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= addr and addr + length <= bounds[1]


def decode_relative(table: str, data: bytes, table_addr: int, text: tuple[int, int], kind: str,
                    length: int) -> list[Site]:
    """Decode a table of s32 offsets relative to each entry (retpoline, return, call, lock, endbr sites)."""
    count = _check_count(table, data, 4)
    rel = np.frombuffer(data, "<i4", count).astype(np.int64).view(np.uint64)
    addrs = rel + np.uint64(table_addr) + np.uint64(4) * np.arange(count, dtype=np.uint64)  # wraps mod 2^64
    _bounded(table, addrs, length, text)
    return [Site(int(a), length, kind) for a in addrs.tolist()]


def _bounded(table: str, addrs: np.ndarray, length: int, text: tuple[int, int]) -> None:
    """Raise when an entry points outside `text` (the whole image: tables also list init and exit code)."""
    lo, hi = np.uint64(text[0]), np.uint64(text[1] - length)
    bad = np.flatnonzero((addrs < lo) | (addrs > hi))
    if bad.size:
        i = int(bad[0])
        raise SiteTableError(f"{table}: entry {i} points to 0x{int(addrs[i]):x}, outside the image "
                             f"0x{text[0]:x}-0x{text[1]:x} ({bad.size} such entries)")


def decode_absolute(table: str, data: bytes, text: tuple[int, int], kind: str, length: int) -> list[Site]:
    """Decode a table of 64-bit absolute addresses (__mcount_loc)."""
    count = _check_count(table, data, 8)
    addrs = np.frombuffer(data, "<u8", count)
    addrs = addrs[addrs != 0]  # the build zeroes the entries of discarded weak functions (ftrace skips them)
    _bounded(table, addrs, length, text)
    return [Site(int(a), length, kind) for a in addrs.tolist()]


def decode_jump_table(table: str, data: bytes, table_addr: int, text: tuple[int, int],
                      code_at: Callable[[int, int], bytes]) -> list[Site]:
    """Decode struct jump_entry (s32 code, s32 target, long key; relative); the site length is the file's
    instruction there (2: jmp8/nop2, 5: jmp32/nop5)."""
    count = _check_count(table, data, 16)
    out = []
    for i in range(count):
        code_rel, target_rel = struct.unpack_from("<ii", data, 16 * i)
        code = (table_addr + 16 * i + code_rel) & (2**64 - 1)
        target = (table_addr + 16 * i + 4 + target_rel) & (2**64 - 1)
        if not _in(code, 2, text) or not text[0] <= target < text[1]:
            raise SiteTableError(f"{table}: entry {i} (code 0x{code:x}, target 0x{target:x}) is outside the text")
        head = code_at(code, 5)
        if not head:
            continue  # code outside the text this verifier reads (init or exit text)
        length = 2 if head[:1] == bytes([JMP8]) or head[:2] == b"\x66\x90" else 5
        out.append(Site(code, length, "jump_label", target=target))
    return out


def decode_static_calls(table: str, data: bytes, table_addr: int, text: tuple[int, int]) -> list[Site]:
    """Decode struct static_call_site (s32 addr, s32 key; relative): 5-byte call or jmp sites."""
    count = _check_count(table, data, 8)
    rel = np.frombuffer(data, "<i4", 2 * count).astype(np.int64)[0::2].view(np.uint64)
    addrs = rel + np.uint64(table_addr) + np.uint64(8) * np.arange(count, dtype=np.uint64)
    _bounded(table, addrs, 5, text)
    return [Site(int(a), 5, "static_call") for a in addrs.tolist()]


def decode_paravirt(table: str, data: bytes, text: tuple[int, int]) -> list[Site]:
    """Decode struct paravirt_patch_site (6.1: u8 *instr, u8 type, u8 len; 16 bytes)."""
    count = _check_count(table, data, 16)
    out = []
    for i in range(count):
        instr, _type, length = struct.unpack_from("<QBB", data, 16 * i)
        if not 0 < length <= MAX_SITE_LEN or not _in(instr, length, text):
            raise SiteTableError(f"{table}: entry {i} (0x{instr:x}, {length} bytes) is outside the text")
        out.append(Site(instr, length, "paravirt"))
    return out


def decode_alternatives(table: str, data: bytes, table_addr: int, text: tuple[int, int],
                        repl_section: tuple[int, bytes]) -> list[Site]:
    """Decode struct alt_instr (12 bytes on 6.1, 14 on 6.12; the stride is the one every entry validates with).

    `repl_section` is (link address, bytes) of .altinstr_replacement (replacements may also point into the
    text itself, e.g. the 6.12 ALT_FLAG_DIRECT_CALL entries; those carry the text's bytes)."""
    problems = []
    for stride in (12, 14):
        if len(data) % stride:
            problems.append(f"not a multiple of {stride} bytes")
            continue
        try:
            return _alternatives(table, data, table_addr, text, repl_section, stride)
        except SiteTableError as exc:
            problems.append(str(exc))
    raise SiteTableError(f"{table}: no entry layout fits ({'; '.join(problems)})")


def _alternatives(table: str, data: bytes, table_addr: int, text: tuple[int, int],
                  repl_section: tuple[int, bytes], stride: int) -> list[Site]:
    count = _check_count(table, data, stride)
    repl_base, repl_bytes = repl_section
    out = []
    for i in range(count):
        at = stride * i
        instr_rel, repl_rel = struct.unpack_from("<ii", data, at)
        instrlen, replen = data[at + stride - 2], data[at + stride - 1]
        instr = (table_addr + at + instr_rel) & (2**64 - 1)
        repl = (table_addr + at + 4 + repl_rel) & (2**64 - 1)
        if not instrlen or instrlen > MAX_SITE_LEN or replen > instrlen or not _in(instr, instrlen, text):
            raise SiteTableError(f"{table}: entry {i} (0x{instr:x}, {instrlen}/{replen} bytes) does not fit "
                                 f"the text with {stride}-byte entries")
        if _in(repl, replen, (repl_base, repl_base + len(repl_bytes))):
            body = repl_bytes[repl - repl_base: repl - repl_base + replen]
        elif replen == 0:
            body = b""
        else:
            raise SiteTableError(f"{table}: entry {i} replacement 0x{repl:x} is outside .altinstr_replacement")
        out.append(Site(instr, instrlen, "alternative", body, repl))
    return out


def parse_relocs(data: bytes, max_entries: int = 1 << 22) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (32-bit, inverse 32-bit, 64-bit) relocation addresses from the table at the end of vmlinux.bin.

    arch/x86/tools/relocs writes: 0, 64-bit relocs, 0, inverse 32-bit relocs, 0, 32-bit relocs; read from the
    end (arch/x86/boot/compressed/misc.c). Each is a u32 holding the low half of a link address."""
    words = np.frombuffer(data[len(data) & 3:], "<u4")[::-1]
    groups = []
    pos = 0
    for _ in range(3):
        stops = np.flatnonzero(words[pos:pos + max_entries] == 0)
        if not stops.size:
            raise SiteTableError(f"the relocation table has no end marker within {max_entries} entries")
        end = pos + int(stops[0])
        groups.append(words[pos:end].astype(np.uint64) | np.uint64(0xFFFF_FFFF_0000_0000))
        pos = end + 1
    return groups[0], groups[1], groups[2]


# --- instructions the kernel writes ---------------------------------------------------------------------


def nop_length(code: bytes | memoryview, at: int) -> int:
    """Return the length of the NOP instruction at `at` (prefixes 66/2e/3e, then 90 or 0f 1f /0), else 0."""
    i, n = at, len(code)
    while i < n and code[i] in (0x66, 0x2E, 0x3E) and i - at < 8:
        i += 1
    if i >= n:
        return 0
    if code[i] == 0x90:
        return i + 1 - at
    if code[i] != 0x0F or i + 2 >= n or code[i + 1] != 0x1F:
        return 0
    modrm = code[i + 2]
    mod, rm = modrm >> 6, modrm & 7
    length = 3
    if mod != 3 and rm == 4:  # SIB byte
        if i + 3 >= n:
            return 0
        length += 1
        if mod == 0 and code[i + 3] & 7 == 5:
            length += 4
    if mod == 1:
        length += 1
    elif mod == 2 or (mod == 0 and rm == 5):
        length += 4
    return i + length - at if i + length <= n else 0


def is_padding(code: bytes | memoryview, after_branch: bool = False) -> bool:
    """Return whether `code` is only NOP instructions, or a jmp to its end over int3/NOPs (6.6+ add_nop).

    int3 bytes count as padding only where no instruction runs into them: after a jmp or ret
    (`after_branch`); elsewhere an int3 is a breakpoint, not padding."""
    i, n = 0, len(code)
    if n >= 2 and code[0] == JMP8 and code[1] == n - 2:  # 6.6+ add_nop(): jmp.d8 over int3 padding
        i, after_branch = 2, True
    elif n >= 5 and code[0] == JMP32 and int.from_bytes(code[1:5], "little", signed=True) == n - 5:
        i, after_branch = 5, True
    while i < n:
        if code[i] == INT3 and after_branch:
            i += 1
            continue
        step = nop_length(code, i)
        if not step:
            return False
        i += step
    return True


def content(code: bytes) -> bytes:
    """Return `code` without its trailing padding (the bytes that matter once NOPs are interchangeable)."""
    for k in range(len(code) + 1):
        if is_padding(code[k:]):
            return code[:k]
    return code


def pad_run(code: bytes | memoryview, at: int) -> int:
    """Return the length of the padding run at `at`: consecutive NOPs, or a jmp8 over int3/NOPs (0 if none)."""
    n = len(code)
    if at + 1 < n and code[at] == JMP8 and at + 2 + code[at + 1] <= n and code[at + 1] < 0x80:
        end = at + 2 + code[at + 1]
        if is_padding(code[at + 2:end], after_branch=True):
            return end - at
    i = at
    while i < n and (step := nop_length(code, i)):
        i += step
    return i - at


def same_code(got: bytes, want: bytes, shift: int = 0) -> bool:
    """Return whether `got` is `want` with padding runs rewritten (optimize_nops, add_nop) and, when `shift` is
    non-zero, rel32 fields moved by `shift` (code copied `shift` bytes away: alternative replacements)."""
    n = len(got)
    if len(want) != n:
        return False
    i = 0
    shift &= 0xFFFF_FFFF
    while i < n:
        if got[i] == want[i] and not (pad_run(got, i) and pad_run(got, i) != pad_run(want, i)):
            i += 1
            continue
        for j in range(i, max(-1, i - 12), -1):  # a padding run may start a few equal bytes earlier
            lg = pad_run(got, j)
            if lg and lg == pad_run(want, j) and j + lg > i and got[j:i] == want[j:i]:
                i = j + lg
                break
        else:
            if not shift:
                return False
            for j in range(max(0, i - 3), min(i, n - 4) + 1):
                if got[j:i] != want[j:i]:
                    continue
                delta = (int.from_bytes(got[j:j + 4], "little") - int.from_bytes(want[j:j + 4], "little"))
                if delta & 0xFFFF_FFFF == shift:
                    i = j + 4
                    break
            else:
                return False
    return True


def same_modulo_rel32(got: bytes, want: bytes, shift: int) -> bool:
    """Return whether `got` equals `want` except in 4-byte windows whose value moved by `shift` (mod 2^32):
    the rel32 of a call, jmp or RIP-relative operand copied `shift` bytes away (alternatives, module code)."""
    if len(got) != len(want):
        return False
    i, n = 0, len(got)
    shift &= 0xFFFF_FFFF
    while i < n:
        if got[i] == want[i]:
            i += 1
            continue
        for j in range(max(0, i - 3), min(i, n - 4) + 1):
            if got[j:i] != want[j:i]:
                continue
            delta = (int.from_bytes(got[j:j + 4], "little") - int.from_bytes(want[j:j + 4], "little")) & 0xFFFF_FFFF
            if delta == shift:
                i = j + 4
                break
        else:
            return False
    return True


def branch_target(code: bytes, at: int) -> int | None:
    """Return the target of a jmp8/jmp32/call32 at link address `at` encoded in `code`, else None."""
    if code[:1] == bytes([JMP8]) and len(code) >= 2:
        return at + 2 + int.from_bytes(code[1:2], "little", signed=True)
    if code[:1] in (bytes([JMP32]), bytes([CALL32])) and len(code) >= 5:
        return (at + 5 + int.from_bytes(code[1:5], "little", signed=True)) & (2**64 - 1)
    return None


@dataclass(frozen=True, slots=True)
class Targets:
    """Where a patched call or jump may legitimately go (run-time addresses), decided by the verifier."""

    is_code: Callable[[int], bool]  # inside verified kernel or module text
    is_thunk: Callable[[int], bool]  # a return thunk (__x86_return_thunk, srso_*, its_return_thunk ...)
    is_ftrace: Callable[[int], bool]  # __fentry__, ftrace_caller, ftrace_regs_caller


def accepts(site: Site, orig: bytes, got: bytes, slide: int, targets: Targets) -> bool:
    """Return whether `got` (run-time bytes at the site) is a variant the kernel itself writes there.

    `orig` are the file's bytes with KASLR relocations applied; `slide` = run-time − link address of the site."""
    if got == orig:
        return True
    at = site.start + slide  # run-time address of the site
    kind = site.kind
    if kind == "runtime_const":  # 6.11+: the immediate holds the variable's boot-time value (site.target)
        return got == (site.target & ((1 << (8 * site.length)) - 1)).to_bytes(site.length, "little")
    if kind == "reloc_range":  # a bounded check, not an exact match: the field lands in the allowed range
        return len(got) in (4, 8) and site.target <= int.from_bytes(got, "little", signed=len(got) == 4) <= site.bound
    if kind == "lock":
        return got[:1] in (bytes([LOCK]), bytes([DS]))
    if kind == "alternative" or kind == "paravirt":
        if same_code(got, orig) or content(got) == content(orig):  # the original, NOPs optimised
            return True
        if kind == "alternative":
            body, want = content(got), content(site.repl)
            if len(body) == len(want) and same_code(body, want, site.repl_addr - site.start):
                return True
            if same_code(got, site.repl + _nops(site.length - len(site.repl)), site.repl_addr - site.start):
                return True
            # recompute_jump (6.1): a jmp32 replacement shortened to jmp8 with the same target
            t_repl = branch_target(site.repl, site.repl_addr + slide)
            t_got = branch_target(got, at)
            if t_repl is not None and t_got is not None and t_repl == t_got and got[:1] == bytes([JMP8]):
                return is_padding(got[2:], True)
            if len(site.repl) == 0 or is_padding(site.repl):
                return is_padding(got)
        # 6.1 paravirt sites and 6.12 ALT_FLAG_DIRECT_CALL ("call *pv_ops[n]"): a direct call to what the
        # pv_ops slot holds, or NOPs when that is a no-op function
        indirect = orig[:2] == b"\xff\x15" or site.repl[:2] == b"\xff\x15"
        return indirect and (_direct_call(got, at, targets) or is_padding(got))
    if kind == "jump_label":
        if is_padding(got):
            return True
        return branch_target(got, at) == site.target + slide and len(got) in (2, 5) and got[0] in (JMP8, JMP32)
    if kind in ("static_call", "static_call_tramp"):
        if is_padding(got) or (got[:1] == bytes([RET]) and is_padding(got[1:], True)) or got == XOR5RAX:
            return True
        target = branch_target(got, at)
        return (got[0] in (CALL32, JMP32) and target is not None
                and (targets.is_code(target) or targets.is_thunk(target)))
    if kind == "ftrace_call":  # ftrace_caller's call site: ftrace_stub, the list function or one ops' callback
        target = branch_target(got, at)
        return (got[:1] == bytes([CALL32]) and target is not None
                and (targets.is_code(target) or targets.is_ftrace(target)))
    if kind == "mcount":
        target = branch_target(got, at)
        return is_padding(got) or (got[:1] == bytes([CALL32]) and target is not None and targets.is_ftrace(target))
    if kind == "return":
        if got[:1] == bytes([RET]) and is_padding(got[1:], True):
            return True
        target = branch_target(got, at)
        return got[:1] == bytes([JMP32]) and target is not None and targets.is_thunk(target)
    if kind == "retpoline":
        return _indirect(got)
    if kind == "call":
        target = branch_target(got, at)
        return got[:1] == bytes([CALL32]) and target is not None and targets.is_code(target)
    if kind == "endbr":
        return is_padding(got)
    return False


def _nops(n: int) -> bytes:
    """Return n bytes of single-byte NOPs (same_code treats any padding run as equal to any other)."""
    return b"\x90" * n


def _direct_call(got: bytes, at: int, targets: Targets) -> bool:
    """A call (6.12 ALT_FLAG_DIRECT_CALL, 6.1 paravirt) to verified code, padded."""
    target = branch_target(got, at)
    return got[:1] == bytes([CALL32]) and target is not None and targets.is_code(target) and is_padding(got[5:])


def _indirect(got: bytes) -> bool:
    """A retpoline site rewritten to an indirect call/jmp through a register (optionally lfence'd, CS-prefixed)."""
    i = 0
    if got[:3] == b"\x0f\xae\xe8":  # lfence
        i = 3
    if got[i:i + 1] == b"\x2e":  # cs prefix (jmp)
        i += 1
    if got[i:i + 1] == b"\x41":  # REX.B: r8-r15
        i += 1
    if got[i:i + 1] != b"\xff" or i + 1 >= len(got) or not (0xD0 <= got[i + 1] <= 0xD7 or 0xE0 <= got[i + 1] <= 0xE7):
        # a conditional retpoline site (jcc to a thunk) becomes "jncc.d8 over; jmp *%reg"
        if len(got) == 6 and 0x70 <= got[0] <= 0x7F:
            return _indirect(got[2:])
        return False
    return is_padding(got[i + 2:], True)


def sort_sites(sites: Sequence[Site]) -> tuple[list[Site], np.ndarray]:
    """Return sites sorted by start and their starts as a uint64 array (for searchsorted)."""
    ordered = sorted(sites, key=lambda s: (s.start, s.length))
    return ordered, np.array([s.start for s in ordered], np.uint64)
