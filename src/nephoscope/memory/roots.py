"""Page-table root (cr3) discovery: each vCPU's CR3 from the monitor, and every PGD found by scanning RAM.

All addresses are guest-physical. The scan needs no OS knowledge: on x86-64 every process's top-level
table shares the kernel half (entries 256..511) with the kernel's own table, so candidates are pages whose
upper half matches the majority pattern, with every present entry structurally valid. Nothing here pauses
the VM: reading registers over the monitor does not stop the guest (pause it first for a consistent view).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from nephoscope.core.errors import MemoryAccessError
from nephoscope.memory.paging import ADDR_MASK, NX, PS, RW, US, Budget, P
from nephoscope.memory.physical import MAX_GPA, PhysicalMemory

PAGE = 4096
CR4_LA57 = 1 << 12
_REG = re.compile(r"\b(CR[0234]|EFER|RIP|RSP)=([0-9a-fA-F]+)")


@dataclass(frozen=True, slots=True)
class VcpuState:
    """The paging-relevant registers of one vCPU, as HMP `info registers` reports them."""

    index: int
    cr3: int
    cr4: int
    efer: int
    rip: int
    rsp: int

    @property
    def levels(self) -> int:
        return 5 if self.cr4 & CR4_LA57 else 4


def parse_registers(text: str) -> list[VcpuState]:
    """Parse HMP `info registers` output (one or more `CPU#n` blocks) into VcpuStates."""
    states = []
    for index, block in enumerate(re.split(r"^CPU#\d+\s*$", text, flags=re.M)[1:] or [text]):
        regs = {k: int(v, 16) for k, v in _REG.findall(block)}
        if "CR3" in regs:
            states.append(VcpuState(index, regs["CR3"], regs.get("CR4", 0), regs.get("EFER", 0),
                                    regs.get("RIP", 0), regs.get("RSP", 0)))
    return states


class Monitor(Protocol):
    """Anything that runs human monitor commands (nephoscope.hypervisor.qmp.Qmp)."""

    def hmp(self, line: str) -> str: ...


def read_vcpu_states(monitor: Monitor) -> list[VcpuState]:
    """Return every vCPU's registers via HMP `info registers -a` (does not pause the VM)."""
    states = parse_registers(monitor.hmp("info registers -a"))
    return states or parse_registers(monitor.hmp("info registers"))


@dataclass(frozen=True, slots=True)
class Root:
    """One accepted top-level table: where it is, the table user code runs on, and its user-entry count."""

    gpa: int  # the table with the full kernel half (what CR3 holds in kernel mode)
    user_gpa: int  # the table user mode runs on: the PTI twin (gpa + 4 KiB) when there is one, else gpa
    user_entries: int  # present entries in the lower half (0: kernel-only, e.g. init's or an exited process's)

    @property
    def pti(self) -> bool:
        return self.user_gpa != self.gpa


@dataclass(slots=True)
class RootScan:
    """The page-table roots found in RAM and the evidence behind them."""

    roots: list[Root]
    kernel_entries: int  # present upper-half entries of the majority (kernel) pattern
    candidates: int  # pages that passed the prefilter
    rejected: Counter[str] = field(default_factory=Counter)
    not_examined: int = 0  # candidates past MAX_ROOT_CANDIDATES (a cap was hit: roots may be missing)

    @property
    def process_roots(self) -> list[Root]:
        """Return the roots with user mappings (one per live process address space)."""
        return [r for r in self.roots if r.user_entries]


_CHUNK = 8192  # pages per vectorised step (32 MiB of RAM, ~16 MiB of temporaries)
_NOT_NX = np.uint64(~NX & 0xFFFF_FFFF_FFFF_FFFF)


def _valid_kernel_entry(entry: int, ram_end: int) -> bool:
    """Return whether `entry` could be a kernel-half PGD entry: present, writable, no PS, target in RAM (not 0).

    Linux sets US on upper-level kernel entries too (leaf entries carry the protection), so US says nothing.
    """
    target = entry & ADDR_MASK
    return entry & (P | RW) == P | RW and not entry & PS and target > 0 and target + PAGE <= ram_end


MAX_ROOT_CANDIDATES = 1 << 14  # distinct candidate tables examined per scan (a real guest has one per process)


def scan_roots(phys: PhysicalMemory, *, known: list[int] | None = None, min_kernel_entries: int = 4,
               budget: Budget | None = None) -> RootScan:
    """Return every page in RAM that looks like an x86-64 top-level page table, with PTI twins paired.

    The kernel half's majority pattern comes from the `known` roots (vCPU CR3s) when they are in RAM,
    else from a vote. One vectorised pass over RAM (adjacent segments joined, however the dump splits
    them); bounded by RAM size whatever the contents. Tables with identical contents are one address
    space (kept once; the copies are counted as rejected "duplicate-table"); past MAX_ROOT_CANDIDATES
    distinct candidates the rest are not examined and `budget` (if given) records the cap.
    """
    ram_end = min(max(e for _, e in phys.ranges), MAX_GPA)
    views = [(s, v) for s, v in _iter_scan_views(phys) if s % PAGE == 0 and len(v) >= PAGE]
    key = _kernel_key(phys, views, known or [], ram_end)
    if key is None:
        return RootScan([], 0, 0, Counter({"no-kernel-pattern": 1}))
    # candidates: pages whose last entry (kernel text/fixmap on Linux; identical in every PGD) matches
    cand: dict[int, np.ndarray] = {}
    seen: dict[bytes, int] = {}  # table contents → the first gpa holding them
    rejected: Counter[str] = Counter()
    capped = 0
    known_gpas = {k & ADDR_MASK for k in known or []}
    for start, view in views:
        n = len(view) // PAGE
        for c in range(0, n, _CHUNK):
            arr = np.frombuffer(view[c * PAGE: min(n, c + _CHUNK) * PAGE], dtype="<u8").reshape(-1, 512)
            for i in np.flatnonzero((arr[:, 511] & _NOT_NX) == key):
                gpa, page = start + (c + int(i)) * PAGE, arr[i]
                digest = hashlib.blake2b(page.tobytes(), digest_size=16).digest()
                if digest in seen and gpa not in known_gpas:
                    rejected["duplicate-table"] += 1
                    continue
                if len(cand) >= MAX_ROOT_CANDIDATES and gpa not in known_gpas:
                    capped += 1
                    continue
                seen.setdefault(digest, gpa)
                cand[gpa] = page.copy()
    if capped and budget is not None:
        budget.hit(f"page-table root candidates (over {MAX_ROOT_CANDIDATES}; {capped} not examined)")
    pattern = _majority_upper(cand, known or [])
    pat_present = (pattern & np.uint64(P)).astype(bool)
    if pat_present.sum() < min_kernel_entries:
        return RootScan([], int(pat_present.sum()), len(cand), Counter({"kernel-pattern-too-sparse": 1}))
    accepted: dict[int, int] = {}
    for gpa, page in cand.items():
        reason = _check_root(page, pattern, pat_present, ram_end)
        if reason:
            rejected[reason] += 1
        else:
            lower = page[:256]
            accepted[gpa] = int(((lower & np.uint64(P)) != 0).sum())
    roots = []
    for gpa, users in sorted(accepted.items()):
        twin = pti_twin(phys, gpa, cand.get(gpa), ram_end) if gpa % (2 * PAGE) == 0 else None
        roots.append(Root(gpa, twin if twin is not None else gpa, users))
    return RootScan(roots, int(pat_present.sum()), len(cand), rejected, capped)


def _kernel_key(phys: PhysicalMemory, views: list[tuple[int, memoryview]], known: list[int],
                ram_end: int) -> int | None:
    """Return the kernel's last PGD entry (NX masked), the value every process's top-level table shares.

    Candidates: the last entry of each known root and of its 8 KiB-aligned twin (under PTI a vCPU in user
    mode runs on the user PGD, whose kernel half differs), and the most common valid values in RAM.
    Code and data repeat too (padding, constants), so each is scored by how many pages holding it have a
    structurally valid kernel half; the best wins.
    """
    values: list[int] = []
    for cr3 in known:
        for gpa in dict.fromkeys((cr3 & ADDR_MASK, cr3 & ADDR_MASK & ~(2 * PAGE - 1))):
            try:
                entry = int.from_bytes(phys.read(gpa + 511 * 8, 8), "little")
            except MemoryAccessError:
                continue
            if _valid_kernel_entry(entry, ram_end):
                values.append(entry & ~NX)
    counted: Counter[int] = Counter()  # counted over all of RAM: a dump may split it into many segments
    for _start, view in views:
        last = np.frombuffer(view[: len(view) // PAGE * PAGE], dtype="<u8")[511::512]
        uniq, counts = np.unique(last[(last & np.uint64(P)) != 0], return_counts=True)
        counted.update(dict(zip(uniq.tolist(), counts.tolist(), strict=True)))
    votes: Counter[int] = Counter()
    for v, c in counted.most_common():
        if c < 2 or len(votes) >= 8:
            break
        if _valid_kernel_entry(v, ram_end):
            votes[v & ~NX] += c
    values += [v for v, _ in votes.most_common(8)]
    best, best_score = None, 0
    for value in dict.fromkeys(values):
        score = _score_key(views, value, ram_end)
        if score > best_score:
            best, best_score = value, score
    return best


def _score_key(views: list[tuple[int, memoryview]], value: int, ram_end: int) -> int:
    """Return how many pages whose last entry is `value` have >= 2 present, all valid, kernel-half entries."""
    score = 0
    for _start, view in views:
        arr = np.frombuffer(view[: len(view) // PAGE * PAGE], dtype="<u8").reshape(-1, 512)
        upper = arr[np.flatnonzero((arr[:, 511] & _NOT_NX) == value)[:512], 256:]
        present = (upper & np.uint64(P)) != 0
        target = upper & np.uint64(ADDR_MASK)
        valid = (((upper & np.uint64(P | RW)) == np.uint64(P | RW)) & ((upper & np.uint64(PS)) == 0)
                 & (target > 0) & (target + np.uint64(PAGE) <= np.uint64(ram_end)))
        score += int(((present.sum(axis=1) >= 2) & (valid | ~present).all(axis=1)).sum())
    return score


def _majority_upper(cand: dict[int, np.ndarray], known: list[int]) -> np.ndarray:
    votes: Counter[bytes] = Counter()
    for gpa in [k & ADDR_MASK for k in known if k & ADDR_MASK in cand] or list(cand):
        votes[(cand[gpa][256:] & _NOT_NX).tobytes()] += 1
    if not votes:
        return np.zeros(256, dtype="<u8")
    return np.frombuffer(votes.most_common(1)[0][0], dtype="<u8")


def _check_root(page: np.ndarray, pattern: np.ndarray, pat_present: np.ndarray, ram_end: int) -> str:
    """Return why `page` is not a top-level table ("" if it is one)."""
    same = (page[256:] & _NOT_NX) == pattern
    # nearly all kernel entries identical to the majority; a few may lag (lazily synced vmalloc areas)
    if same[pat_present].mean() < 0.9:
        return "kernel-half-differs"
    extra = page[256:][~pat_present & ((page[256:] & np.uint64(P)) != 0)]
    if any(not _valid_kernel_entry(int(e), ram_end) for e in extra):
        return "bad-kernel-entry"
    lower = page[:256]
    for entry in (int(e) for e in lower[(lower & np.uint64(P)) != 0]):
        if entry & PS or (entry & ADDR_MASK) + PAGE > ram_end:
            return "bad-user-entry"
        if not entry & US:
            return "supervisor-user-entry"
    return ""


def pti_twin(phys: PhysicalMemory, gpa: int, page: np.ndarray | None = None, ram_end: int | None = None) -> int | None:
    """Return gpa + 4 KiB if it is the PTI user twin of the kernel PGD at `gpa` (same user entries, sparse
    kernel half), else None; guest-physical addresses; `page` is the PGD's content if already read."""
    ram_end = min(max(e for _, e in phys.ranges), MAX_GPA) if ram_end is None else ram_end
    if gpa % (2 * PAGE) or not gpa + 2 * PAGE <= ram_end:
        return None
    try:
        if page is None:
            page = np.frombuffer(phys.read(gpa, PAGE), dtype="<u8")
        twin = np.frombuffer(phys.read(gpa + PAGE, PAGE), dtype="<u8")
    except MemoryAccessError:
        return None
    lower, tlower = page[:256] & _NOT_NX, twin[:256] & _NOT_NX
    users = (lower & np.uint64(P)) != 0
    if not users.any() or not np.array_equal(lower, tlower):
        return None
    tupper_present = (twin[256:] & np.uint64(P)) != 0
    # the user twin maps only the entry trampoline and cpu_entry_area: a strict subset of the kernel half
    if not tupper_present.any() or tupper_present.sum() >= ((page[256:] & np.uint64(P)) != 0).sum():
        return None
    return gpa + PAGE


def _iter_scan_views(phys: PhysicalMemory) -> Iterator[tuple[int, memoryview]]:
    """Yield (gpa, view) covering RAM in few large pieces (adjacent segments joined; untouched RAM skipped)."""
    range_views = getattr(phys, "iter_range_views", None)  # SegmentedMemory, ProcessMemory: holes are skipped
    if range_views is not None:
        yield from range_views()
        return
    for start, end in phys.ranges:  # a generic PhysicalMemory: copy in chunks
        for s in range(start, end, 64 << 20):
            yield s, memoryview(phys.read(s, min(64 << 20, end - s)))
