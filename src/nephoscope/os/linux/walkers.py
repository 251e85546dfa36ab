"""Walk the guest kernel's own structures: tasks, threads, VMAs, open files, modules, the PID idr.

Every walk is bounded (work caps, revisit detection, back-pointer checks) and returns a `Listing`
whose `complete` is False with a `problem` when guest data was cyclic, truncated or garbage: what the
walk could see is kept, and the caller marks the rest unverifiable. Addresses are kernel gvas unless
named `user`. Nothing here pauses the VM (use `LinuxKernel.paused()` around a walk for consistency).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from nephoscope.core.errors import GuestDataError, MemoryAccessError

if TYPE_CHECKING:
    from nephoscope.memory.paging import AddressSpace
    from nephoscope.os.linux.model import LinuxKernel

T = TypeVar("T")
PF_KTHREAD = 0x00200000
TASK_REPORT = 0x7F
TASK_IDLE = 0x402
STATE_LETTERS = "RSDTtXZPI"
VM_READ, VM_WRITE, VM_EXEC, VM_MAYSHARE = 1, 2, 4, 0x80  # maps shows "s" for VM_MAYSHARE
# include/linux/maple_tree.h (6.1): an encoded node is node | type << 3 | 4; these are #defines, not in
# BTF. The node size, the type numbers and every offset come from BTF (model.MapleLayout).
MAPLE_TYPE_SHIFT, MAPLE_TYPE_MASK = 3, 0xF
MAX_U64 = (1 << 64) - 1
MAX_PID_NS_LEVEL = 32  # kernel/pid_namespace.c
XA_RETRY_ENTRY, XA_ZERO_ENTRY = 0x402, 0x406  # include/linux/xarray.h: xa_mk_internal(256), (257)
PIDNS_ADDING = 1 << 31  # kernel/pid.c: pid_allocated's flag while the namespace accepts new pids
PROCTITLE_MAX = 4096  # get_mm_proctitle() reads at most one page
PSEUDO_FS = {"pipefs": "pipe:[{ino}]", "sockfs": "socket:[{ino}]", "anon_inodefs": "anon_inode:{name}"}
# the model turns every failure guest data can cause into one of these, at the source
_BAD = (MemoryAccessError, GuestDataError)


@dataclass(slots=True)
class Listing(Generic[T]):
    """What a walk found; `complete` is False (and `problem` says why) if it had to stop early."""

    items: list[T] = field(default_factory=list)
    complete: bool = True
    problem: str = ""

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def fail(self, problem: str) -> Listing[T]:
        """Mark this listing incomplete (keeping the first problem) and return it."""
        if self.complete:
            self.complete, self.problem = False, problem
        return self


@dataclass(frozen=True, slots=True)
class Task:
    """A task (process or thread) as the kernel's task_struct describes it."""

    gva: int
    pid: int
    tgid: int
    ppid: int
    comm: str
    state: str
    uid: int
    gid: int
    euid: int
    egid: int
    start_time_ns: int  # CLOCK_MONOTONIC at fork
    start_boottime_ns: int  # CLOCK_BOOTTIME at fork (what /proc/PID/stat field 22 counts, in ticks)
    kernel_thread: bool
    mm_gva: int
    exe: str | None = None  # None: not read or unreadable (see notes)
    cmdline: list[str] | None = None
    notes: tuple[str, ...] = ()

    @property
    def is_process(self) -> bool:
        return self.pid == self.tgid


@dataclass(frozen=True, slots=True)
class Vma:
    """One memory mapping (user gvas [start, end)), like a /proc/PID/maps line."""

    start: int
    end: int
    perms: str  # "r-xp"
    offset: int  # file offset in bytes (0 for anonymous)
    path: str  # file path, [heap], [stack], [vdso], [vvar] or ""
    file_gva: int
    flags: int

    @property
    def executable(self) -> bool:
        return "x" in self.perms


@dataclass(frozen=True, slots=True)
class OpenFile:
    """An open file descriptor."""

    fd: int
    path: str
    file_gva: int


@dataclass(frozen=True, slots=True)
class Module:
    """A loaded kernel module (core image at gva `base`, `size` bytes as /proc/modules counts)."""

    name: str
    base: int
    size: int
    gva: int
    state: int


@dataclass(frozen=True, slots=True)
class HiddenPid:
    """A pid seen in only one of the two kernel views (task list, PID idr)."""

    pid: int
    in_task_list: bool
    in_pid_idr: bool
    task_gva: int
    comm: str


# --- lists -------------------------------------------------------------------------------------


def walk_list(k: LinuxKernel, head: int, link_off: int, limit: int, what: str) -> Listing[int]:
    """Return container gvas of list `head` (link at `link_off`), checking back-pointers, cycle- and cap-safe.

    Every entry's `prev` must name the entry before it, and on return to the head, the head's own `prev`
    must name the last entry: a list whose last `next` jumps back to the head early is incomplete.
    """
    out: Listing[int] = Listing()
    seen: set[int] = set()
    next_off, prev_off = k.off["list_head.next"], k.off["list_head.prev"]
    lo = min(next_off, prev_off)  # one read per entry for both pointers
    span, at_next, at_prev = abs(next_off - prev_off) + 8, next_off - lo, prev_off - lo
    prev, cur = head, 0
    try:
        cur = k.u64(head + next_off)
        while cur != head:
            if cur in seen:
                return out.fail(f"{what}: the list revisits 0x{cur:x} (a cycle)")
            if len(out.items) >= limit:
                return out.fail(f"{what}: more than {limit} entries; stopped")
            k.budget.node()
            raw = k.read(cur + lo, span)
            nxt = int.from_bytes(raw[at_next:at_next + 8], "little")
            back = int.from_bytes(raw[at_prev:at_prev + 8], "little")
            if back != prev:
                return out.fail(f"{what}: entry 0x{cur:x} does not point back to 0x{prev:x} (corrupt or changing)")
            seen.add(cur)
            out.items.append(cur - link_off)
            prev, cur = cur, nxt
        last = k.u64(head + prev_off)
        if last != prev:
            return out.fail(f"{what}: the head's prev is 0x{last:x}, not the last entry 0x{prev:x} "
                            "(the list is cut short or corrupt)")
    except _BAD as exc:
        return out.fail(f"{what}: unreadable entry at 0x{cur:x} ({exc})")
    return out


# --- tasks -------------------------------------------------------------------------------------


def _state(value: int, exit_state: int) -> str:
    if value == TASK_IDLE:
        return "I"
    bits = (value | exit_state) & TASK_REPORT
    return STATE_LETTERS[bits.bit_length()]


def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def read_task(k: LinuxKernel, gva: int, *, details: bool = True) -> Task:
    """Return the task at kernel gva; with `details`, also its exe path and cmdline (user memory)."""
    o = k.off
    blob = k.struct("task_struct", gva)
    f = k.field
    parent = f(blob, "task_struct.real_parent")
    ppid = k.u32(parent + o["task_struct.tgid"]) if parent and parent != gva else 0
    cred = k.struct("cred", f(blob, "task_struct.real_cred"))
    mm = f(blob, "task_struct.mm")
    flags = f(blob, "task_struct.flags", "I")
    task = dict(gva=gva, pid=f(blob, "task_struct.pid", "i"), tgid=f(blob, "task_struct.tgid", "i"), ppid=ppid,
                comm=_comm(blob[o["task_struct.comm"]:o["task_struct.comm"] + 16]),
                state=_state(f(blob, k.state_member, "I"), f(blob, "task_struct.exit_state", "i")),
                uid=k.field(cred, "cred.uid", "I"), gid=k.field(cred, "cred.gid", "I"),
                euid=k.field(cred, "cred.euid", "I"), egid=k.field(cred, "cred.egid", "I"),
                start_time_ns=f(blob, "task_struct.start_time"),
                start_boottime_ns=f(blob, "task_struct.start_boottime") if "task_struct.start_boottime" in o else 0,
                kernel_thread=bool(flags & PF_KTHREAD), mm_gva=mm)
    if not details or not mm or flags & PF_KTHREAD:
        return Task(**task, exe="" if flags & PF_KTHREAD or not mm else None, cmdline=[] if not mm else None)
    notes: list[str] = []
    exe: str | None = None
    cmdline: list[str] | None = None
    try:
        mmb = k.struct("mm_struct", mm)
        exe_file = k.field(mmb, "mm_struct.exe_file")
        exe = file_path(k, exe_file) if exe_file else ""
    except _BAD as exc:
        notes.append(f"exe unreadable: {exc}")
        mmb = b""
    if mmb:
        try:
            cmdline = _cmdline(k, mmb)
        except _BAD as exc:
            notes.append(f"cmdline unreadable (paged out or unmapped): {exc}")
    return Task(**task, exe=exe, cmdline=cmdline, notes=tuple(notes))


def _cmdline(k: LinuxKernel, mmb: bytes) -> list[str]:
    start, end = k.field(mmb, "mm_struct.arg_start"), k.field(mmb, "mm_struct.arg_end")
    if end <= start:
        return []
    if end - start > k.limits.max_cmdline:
        raise GuestDataError(f"argument area of {end - start} bytes is absurd")
    user = k.user_space(k.field(mmb, "mm_struct.pgd"))
    raw = k.read_in(user, start, end - start)
    if raw[-1:] != b"\0":  # setproctitle() overwrote the area: like /proc, one string up to a NUL
        title = raw + _read_until_nul(k, user, end, PROCTITLE_MAX - len(raw))
        return [title.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")]
    parts = raw.split(b"\0")
    while parts and not parts[-1]:
        parts.pop()
    return [p.decode("utf-8", "backslashreplace") for p in parts]


def _read_until_nul(k: LinuxKernel, user: AddressSpace, gva: int, limit: int) -> bytes:
    """Return user bytes from `gva` up to a NUL, `limit` or the first unmapped page."""
    out = b""
    while len(out) < limit:
        n = min(limit - len(out), 4096 - gva % 4096)
        try:
            chunk = k.read_in(user, gva, n)
        except _BAD:
            break
        out += chunk
        gva += n
        if b"\0" in chunk:
            break
    return out


def iter_task_gvas(k: LinuxKernel) -> Listing[int]:
    """Return the gvas of every thread-group leader on init_task.tasks (init_task itself excluded)."""
    init = k.symbols.get("init_task")
    off = k.off["task_struct.tasks"]
    listing = walk_list(k, init + off, off, k.limits.max_tasks, "init_task.tasks")
    if not listing.complete:  # a running guest may fork or reap mid-walk: look once more, afresh
        k.kernel.flush()
        listing = walk_list(k, init + off, off, k.limits.max_tasks, "init_task.tasks")
    return listing


def _tasks(k: LinuxKernel, gvas: Listing[int], details: bool) -> Listing[Task]:
    out: Listing[Task] = Listing(complete=gvas.complete, problem=gvas.problem)
    for gva in gvas:
        try:
            out.items.append(read_task(k, gva, details=details))
        except _BAD as exc:
            out.fail(f"task at 0x{gva:x} unreadable ({exc})")
    return out


def processes(k: LinuxKernel) -> Listing[Task]:
    """Return every process on the task list with exe path and cmdline."""
    return _tasks(k, iter_task_gvas(k), details=True)


def iter_thread_gvas(k: LinuxKernel) -> Listing[int]:
    """Return the gvas of every thread of every process (signal->thread_head lists)."""
    leaders = iter_task_gvas(k)
    out: Listing[int] = Listing(complete=leaders.complete, problem=leaders.problem)
    link = k.off["task_struct.thread_node"]
    for leader in leaders:
        try:
            signal = k.u64(leader + k.off["task_struct.signal"])
        except _BAD as exc:
            out.fail(f"task 0x{leader:x}: signal unreadable ({exc})")
            continue
        group = walk_list(k, signal + k.off["signal_struct.thread_head"], link, k.limits.max_threads,
                          f"threads of task 0x{leader:x}")
        out.items.extend(group.items)
        if not group.complete:
            out.fail(group.problem)
    return out


def threads(k: LinuxKernel) -> Listing[Task]:
    """Return every thread (no exe/cmdline)."""
    return _tasks(k, iter_thread_gvas(k), details=False)


# --- paths -------------------------------------------------------------------------------------


def _dentry_name(k: LinuxKernel, dentry: int) -> str:
    q = dentry + k.off["dentry.d_name"]
    length = k.u32(q + k.off["qstr.len"]) & 0xFFFFFFFF
    if length > 255:
        raise GuestDataError(f"dentry 0x{dentry:x} name length {length} is absurd")
    name = k.read(k.u64(q + k.off["qstr.name"]), length) if length else b""
    return name.decode("utf-8", "backslashreplace")


def _fs_type(k: LinuxKernel, dentry: int) -> str:
    sb = k.u64(dentry + k.off["dentry.d_sb"])
    return k.cstr(k.u64(k.u64(sb + k.off["super_block.s_type"]) + k.off["file_system_type.name"]), 64)


def d_path(k: LinuxKernel, vfsmount: int, dentry: int) -> str:
    """Return the path of (vfsmount, dentry) up to the global root, crossing mounts, like d_path()."""
    o = k.off
    mount = vfsmount - o["mount.mnt"]
    leaf = dentry
    parts: list[str] = []
    pseudo = False
    for _ in range(k.limits.max_path_depth):
        mnt_root = k.u64(mount + o["mount.mnt"] + o["vfsmount.mnt_root"])
        parent = k.u64(dentry + o["dentry.d_parent"])
        if dentry == mnt_root:
            up = k.u64(mount + o["mount.mnt_parent"])
            if up == mount or up == 0:
                break
            dentry = k.u64(mount + o["mount.mnt_mountpoint"])
            mount = up
            continue
        if parent == dentry:  # a pseudo file (memfd, anon): its own root, named by simple_dname()
            parts.append(_dentry_name(k, dentry))
            pseudo = True
            break
        parts.append(_dentry_name(k, dentry))
        dentry = parent
    else:
        raise GuestDataError(f"path of dentry 0x{leaf:x} deeper than {k.limits.max_path_depth} (a cycle?)")
    fs = _fs_type(k, leaf)
    if fs in PSEUDO_FS:
        ino = k.u64(k.u64(leaf + o["dentry.d_inode"]) + o["inode.i_ino"])
        return PSEUDO_FS[fs].format(ino=ino, name=_dentry_name(k, leaf))
    path = "/" + "/".join(reversed(parts))
    unhashed = k.u64(leaf + o["dentry.d_hash.pprev"]) == 0
    if pseudo or (unhashed and k.u64(leaf + o["dentry.d_parent"]) != leaf):
        path += " (deleted)"
    return path


def file_path(k: LinuxKernel, file: int) -> str:
    """Return the path of `struct file` at kernel gva `file`."""
    base = file + k.off["file.f_path"]
    return d_path(k, k.u64(base + k.off["path.mnt"]), k.u64(base + k.off["path.dentry"]))


# --- VMAs --------------------------------------------------------------------------------------


def _perms(flags: int) -> str:
    return ("r" if flags & VM_READ else "-") + ("w" if flags & VM_WRITE else "-") + \
        ("x" if flags & VM_EXEC else "-") + ("s" if flags & VM_MAYSHARE else "p")


def _is_node(entry: int) -> bool:
    return entry & 3 == 2 and entry > 4096


def iter_maple_leaves(k: LinuxKernel, root: int) -> Listing[tuple[int, int, int]]:
    """Return (entry, first index, last index) of every non-empty leaf slot of a maple tree (6.1+).

    Node size, node type numbers, pivot and slot offsets and counts, and the metadata end byte all come
    from the kernel's BTF (`k.maple_layout`); a node that breaks the tree's invariants stops the walk.
    """
    out: Listing[tuple[int, int, int]] = Listing()
    lay = k.maple_layout
    if lay is None:
        return out.fail("this kernel's BTF has no maple tree")
    if not _is_node(root):  # the root bit (0x2) is absent: one entry stored directly, for index 0 only
        if root:
            out.items.append((root, 0, 0))
        return out
    stack = [(root, 0, MAX_U64)]  # children of internal nodes are always encoded nodes
    seen: set[int] = set()
    while stack:
        entry, lo, hi = stack.pop()
        node, kind = entry & ~(lay.node_size - 1), (entry >> MAPLE_TYPE_SHIFT) & MAPLE_TYPE_MASK
        if node in seen or len(seen) >= k.limits.max_tree_nodes:
            return out.fail(f"maple tree: node 0x{node:x} revisited or more than {k.limits.max_tree_nodes} nodes")
        seen.add(node)
        if kind in (lay.leaf_64, lay.range_64):
            n = lay.range
        elif kind == lay.arange_64:
            n = lay.arange
        else:
            return out.fail(f"maple tree: node 0x{node:x} has unexpected type {kind}")
        try:
            k.budget.node()
            blob = k.read(node, lay.node_size)
        except _BAD as exc:
            return out.fail(f"maple tree: node 0x{node:x} unreadable ({exc})")
        pivots = struct.unpack_from(f"<{n.pivots}Q", blob, n.pivot)
        slots = struct.unpack_from(f"<{n.slots}Q", blob, n.slot)
        meta = blob[n.end] if n.end is not None else len(pivots)
        if kind == lay.arange_64:  # ma_data_end(): allocation nodes always keep the end in their metadata
            end = meta
        else:
            end = meta if not pivots[-1] else (len(pivots) - 1 if pivots[-1] == hi else len(pivots))
        if end >= len(slots):
            return out.fail(f"maple tree: node 0x{node:x} claims {end + 1} slots of {len(slots)}")
        first = lo
        for i in range(end + 1):
            last = pivots[i] if i < len(pivots) and pivots[i] else hi
            if i == end:
                last = hi if i >= len(pivots) or not pivots[i] else pivots[i]
            if last < first or last > hi:
                return out.fail(f"maple tree: node 0x{node:x} pivots out of order")
            if slots[i]:
                if kind == lay.leaf_64:
                    out.items.append((slots[i], first, last))
                else:
                    stack.append((slots[i], first, last))
            if last >= hi:
                break
            first = last + 1
    out.items.sort(key=lambda t: t[1])
    return out


def _vma_gvas(k: LinuxKernel, mm: int) -> Listing[int]:
    o = k.off
    if k.maple:
        leaves = iter_maple_leaves(k, k.u64(mm + o["mm_struct.mm_mt"] + o["maple_tree.ma_root"]))
        out: Listing[int] = Listing(complete=leaves.complete, problem=leaves.problem)
        for vma, first, last in leaves:
            try:
                start, end = k.u64(vma + o["vm_area_struct.vm_start"]), k.u64(vma + o["vm_area_struct.vm_end"])
                owner = k.u64(vma + o["vm_area_struct.vm_mm"])
            except _BAD as exc:
                out.fail(f"maple leaf [0x{first:x}, 0x{last:x}] holds 0x{vma:x}, unreadable ({exc})")
                continue
            if start != first or end - 1 != last or owner != mm:
                out.fail(f"maple leaf [0x{first:x}, 0x{last:x}] holds 0x{vma:x}, not a VMA of this mm")
                continue
            out.items.append(vma)
        return out
    out = Listing()
    seen: set[int] = set()
    try:
        vma = k.u64(mm + o["mm_struct.mmap"])
        while vma:
            if len(out.items) >= k.limits.max_vmas or vma in seen:
                return out.fail("mm->mmap list too long or cyclic")
            k.budget.node()
            seen.add(vma)
            out.items.append(vma)
            vma = k.u64(vma + o["vm_area_struct.vm_next"])
    except _BAD as exc:
        return out.fail(f"mm->mmap list unreadable ({exc})")
    return out


def _special_name(k: LinuxKernel, blob: bytes) -> str:
    """Return the name of a special mapping ([vdso], [vvar]) from its vm_special_mapping, else ""."""
    ops = k.symbols.find("special_mapping_vmops")
    if ops is None or k.off.get("vm_area_struct.vm_ops") is None:
        return ""
    if k.field(blob, "vm_area_struct.vm_ops") != ops:
        return ""
    return k.cstr(k.u64(k.field(blob, "vm_area_struct.vm_private_data")), 32)


def vmas(k: LinuxKernel, task: Task) -> Listing[Vma]:
    """Return the mappings of `task` in address order (empty for kernel threads)."""
    if not task.mm_gva:
        return Listing()
    try:
        gvas = _vma_gvas(k, task.mm_gva)
        mmb = k.struct("mm_struct", task.mm_gva)
        brk0, brk1 = k.field(mmb, "mm_struct.start_brk"), k.field(mmb, "mm_struct.brk")
        stack = k.field(mmb, "mm_struct.start_stack")
    except _BAD as exc:
        return Listing[Vma]().fail(f"mm 0x{task.mm_gva:x} unreadable ({exc})")
    out: Listing[Vma] = Listing(complete=gvas.complete, problem=gvas.problem)
    for vma in gvas:
        try:
            blob = k.struct("vm_area_struct", vma)
            start, end = k.field(blob, "vm_area_struct.vm_start"), k.field(blob, "vm_area_struct.vm_end")
            flags, file = k.field(blob, "vm_area_struct.vm_flags"), k.field(blob, "vm_area_struct.vm_file")
            pgoff = k.field(blob, "vm_area_struct.vm_pgoff")
            if file:
                path, offset = file_path(k, file), pgoff << 12
            else:
                offset = 0
                if start <= brk1 and end >= brk0:  # as show_map_vma() decides
                    path = "[heap]"
                elif start <= stack <= end:
                    path = "[stack]"
                else:
                    path = _special_name(k, blob)
            out.items.append(Vma(start, end, _perms(flags), offset, path, file, flags))
        except _BAD as exc:
            out.fail(f"VMA 0x{vma:x} unreadable ({exc})")
    return out


# --- files, modules, pid idr -------------------------------------------------------------------


def fd_table(k: LinuxKernel, task: Task) -> Listing[tuple[int, int]]:
    """Return (fd, struct file gva) of every open descriptor of `task` (files->fdt->fd[0..max_fds))."""
    o = k.off
    out: Listing[tuple[int, int]] = Listing()
    try:
        fs = k.u64(task.gva + o["task_struct.files"])
        if not fs:
            return out
        fdt = k.u64(fs + o["files_struct.fdt"])
        max_fds = k.u32(fdt + o["fdtable.max_fds"])
        if max_fds > k.limits.max_fds:
            return out.fail(f"fdtable claims {max_fds} descriptors (cap {k.limits.max_fds})")
        array = k.read(k.u64(fdt + o["fdtable.fd"]), 8 * max_fds)
    except _BAD as exc:
        return out.fail(f"file table of pid {task.pid} unreadable ({exc})")
    out.items.extend((fd, file) for fd, file in enumerate(struct.unpack(f"<{max_fds}Q", array)) if file)
    return out


def files(k: LinuxKernel, task: Task) -> Listing[OpenFile]:
    """Return the open descriptors of `task` (files->fdt->fd[0..max_fds))."""
    table = fd_table(k, task)
    out: Listing[OpenFile] = Listing(complete=table.complete, problem=table.problem)
    for fd, file in table:
        try:
            out.items.append(OpenFile(fd, file_path(k, file), file))
        except _BAD as exc:
            out.fail(f"fd {fd} of pid {task.pid}: file 0x{file:x} unreadable ({exc})")
    return out


def modules(k: LinuxKernel) -> Listing[Module]:
    """Return every module on the `modules` list."""
    o = k.off
    gvas = walk_list(k, k.symbols.get("modules"), o["module.list"], k.limits.max_modules, "modules")
    out: Listing[Module] = Listing(complete=gvas.complete, problem=gvas.problem)
    for mod in gvas:
        try:
            name = k.cstr(mod + o["module.name"], 56)
            if "module.core_layout.base" in o:
                base = k.u64(mod + o["module.core_layout.base"])
                size = k.u32(mod + o["module.core_layout.size"]) + k.u32(mod + o["module.init_layout.size"])
            else:
                base, size = module_memory(k, mod)
            out.items.append(Module(name, base, size, mod, k.u32(mod + o["module.state"])))
        except _BAD as exc:
            out.fail(f"module at 0x{mod:x} unreadable ({exc})")
    return out


def module_memory(k: LinuxKernel, mod: int) -> tuple[int, int]:
    """Return (base, size) of a 6.4+ module like /proc/modules: mem[MOD_TEXT].base, the sum of every mem[].size."""
    stride, count = k.off.size["module_memory"], k.module_mem_types
    if not 0 < count <= 16:
        raise GuestDataError(f"module.mem[] has {count} entries in this kernel's BTF")
    blob = k.read(mod + k.off["module.mem"], stride * count)
    base = struct.unpack_from("<Q", blob, k.off["module_memory.base"])[0]
    size = sum(struct.unpack_from("<I", blob, i * stride + k.off["module_memory.size"])[0] for i in range(count))
    return base, size


def module_symbols(k: LinuxKernel, module: Module) -> Listing[tuple[int, str, str]]:
    """Return (gva, type char, name) for each named symbol in `module`'s mod_kallsyms (ELF symtab)."""
    o = k.off
    out: Listing[tuple[int, str, str]] = Listing()
    if "module.kallsyms" not in o:
        return out.fail("this kernel's BTF has no mod_kallsyms")
    try:
        ks = k.u64(module.gva + o["module.kallsyms"])
        count = k.u32(ks + o["mod_kallsyms.num_symtab"])
        if count > k.limits.max_module_symbols:
            return out.fail(f"module {module.name}: {count} symbols is absurd")
        symtab = k.read(k.u64(ks + o["mod_kallsyms.symtab"]), 24 * count)
        types = k.read(k.u64(ks + o["mod_kallsyms.typetab"]), count)
        strtab = k.u64(ks + o["mod_kallsyms.strtab"])
    except _BAD as exc:
        return out.fail(f"module {module.name}: kallsyms unreadable ({exc})")
    for i in range(count):
        st_name, _info, _other, shndx, value, _size = struct.unpack_from("<IBBHQQ", symtab, 24 * i)
        if shndx == 0:  # SHN_UNDEF
            continue
        try:
            name = k.cstr(strtab + st_name, 512)
        except _BAD as exc:
            out.fail(f"module {module.name}: symbol {i} name unreadable ({exc})")
            continue
        if name:
            out.items.append((value, chr(types[i]), name))
    return out


def iter_pid_idr(k: LinuxKernel, loose: list[tuple[int, int]] | None = None) -> Listing[tuple[int, int]]:
    """Return (pid number, task gva or 0) for every struct pid in init_pid_ns's idr (an xarray).

    The walk checks the xarray's shape (each node's shift a multiple of the chunk shift, one chunk less
    than its parent's, its offset, count and parent back-pointer where BTF has them) and every entry's
    own claims: its number is the index it is stored at, its namespace is init_pid_ns, and its task (if
    any) points back at it (task->pid, pid_links.pprev, thread_pid). Any break makes the listing
    incomplete: a garbage page yields an invalid view, never wrong pids. `loose` receives the index
    ranges of nodes that count more allocated slots than they hold (a pid being allocated, or a slot
    lost to damage): there, a missing pid proves nothing. On a running guest that changed mid-walk it
    looks once more.
    """
    ranges: list[tuple[int, int]] = []
    listing = _walk_pid_idr(k, ranges)
    if not listing.complete:
        k.kernel.flush()
        ranges.clear()
        listing = _walk_pid_idr(k, ranges)
    if loose is not None:
        loose.extend(ranges)
    return listing


def _walk_pid_idr(k: LinuxKernel, loose: list[tuple[int, int]]) -> Listing[tuple[int, int]]:
    o = k.off
    out: Listing[tuple[int, int]] = Listing()
    ns = k.symbols.get("init_pid_ns")
    idr = ns + o["pid_namespace.idr"]
    chunk = k.xa_slots
    chunk_shift = chunk.bit_length() - 1
    node_size = k.off.size["xa_node"]
    try:
        head = k.u64(idr + o["idr.idr_rt"] + o["xarray.xa_head"])
        base = k.u32(idr + o["idr.idr_base"]) if "idr.idr_base" in o else 0
    except _BAD as exc:
        return out.fail(f"pid idr: init_pid_ns unreadable ({exc})")
    # (entry, first index it covers, gva of the node holding it or 0, that node's shift or -1, its slot)
    stack: list[tuple[int, int, int, int, int]] = [(head, 0, 0, -1, 0)]
    seen: set[int] = set()
    while stack:
        entry, index, parent, parent_shift, slot = stack.pop()
        if _is_node(entry):
            node = entry - 2
            if node in seen or len(seen) >= k.limits.max_tree_nodes:
                return out.fail(f"pid idr: node 0x{node:x} revisited or more than {k.limits.max_tree_nodes} nodes")
            seen.add(node)
            try:
                k.budget.node()
                blob = k.read(node, node_size)
                slots = struct.unpack_from(f"<{chunk}Q", blob, o["xa_node.slots"])
                problem = _xa_node_problem(k, blob, slots, parent, parent_shift, slot, chunk_shift)
            except _BAD as exc:
                return out.fail(f"pid idr: node 0x{node:x} unreadable ({exc})")
            if problem:
                return out.fail(f"pid idr: node 0x{node:x} {problem} (not an xarray node)")
            shift = blob[o["xa_node.shift"]]
            if "xa_node.count" not in o or blob[o["xa_node.count"]] != sum(1 for e in slots if e):
                loose.append((index, index + (chunk << shift) - 1))
            stack.extend((e, index + (i << shift), node, shift, i) for i, e in reversed(list(enumerate(slots))) if e)
            continue
        if not entry:
            continue
        if entry & 1:
            return out.fail(f"pid idr: index {index + base} holds a value entry 0x{entry:x} (an idr of struct "
                            "pid holds only pointers)")
        if entry & 3 == 2:  # XA_RETRY_ENTRY or XA_ZERO_ENTRY: a slot being changed; a sibling is never a pid
            if entry not in (XA_RETRY_ENTRY, XA_ZERO_ENTRY):
                return out.fail(f"pid idr: index {index + base} holds internal entry 0x{entry:x}")
            loose.append((index, index))
            continue
        if parent_shift > 0:
            return out.fail(f"pid idr: entry 0x{entry:x} sits in a node of shift {parent_shift} (multi-index "
                            "entries are never pids)")
        try:
            nr, task = _pid_entry(k, entry, index + base, ns)
        except _BAD as exc:
            out.fail(f"pid idr: struct pid 0x{entry:x} at index {index + base}: {exc}")
            continue
        out.items.append((nr, task))
    if base:
        loose[:] = [(lo + base, hi + base) for lo, hi in loose]
    if out.complete:
        _check_pid_namespace(k, ns, out)
    return out


def _check_pid_namespace(k: LinuxKernel, ns: int, out: Listing[tuple[int, int]]) -> None:
    """Fail `out` unless init_pid_ns agrees with its idr: pid_allocated counts its entries and still has
    PIDNS_ADDING (only a dying namespace clears it), pid 1 is its child reaper (alloc_pid and free_pid
    change the idr and the count together under pidmap_lock)."""
    o = k.off
    try:
        if "pid_namespace.pid_allocated" in o:
            raw = k.u32(ns + o["pid_namespace.pid_allocated"])
            if not raw & PIDNS_ADDING or raw & ~PIDNS_ADDING != len(out.items):
                out.fail(f"pid idr: holds {len(out.items)} pids but init_pid_ns.pid_allocated is 0x{raw:x} "
                         "(entries lost or invented)")
                return
        if "pid_namespace.child_reaper" not in o:
            return
        reaper = k.u64(ns + o["pid_namespace.child_reaper"])
    except _BAD as exc:
        out.fail(f"pid idr: init_pid_ns unreadable ({exc})")
        return
    init = next((task for nr, task in out.items if nr == 1), 0)
    if not reaper or init != reaper:
        out.fail(f"pid idr: pid 1 is task 0x{init:x}, but init_pid_ns.child_reaper is 0x{reaper:x}")


def _xa_node_problem(k: LinuxKernel, blob: bytes, slots: tuple[int, ...], parent: int, parent_shift: int,
                     slot: int, chunk_shift: int) -> str:
    """Return how an xa_node breaks the xarray's invariants ("" when it fits)."""
    o = k.off
    shift = blob[o["xa_node.shift"]]
    if shift % chunk_shift or shift >= 64:
        return f"has shift {shift}, not a multiple of {chunk_shift}"
    if parent_shift >= 0 and shift != parent_shift - chunk_shift:
        return f"has shift {shift} under a node of shift {parent_shift}"
    if parent_shift >= 0 and "xa_node.offset" in o and blob[o["xa_node.offset"]] != slot:
        return f"says it is slot {blob[o['xa_node.offset']]} of its parent, but it is slot {slot}"
    if "xa_node.parent" in o and k.field(blob, "xa_node.parent") != parent:
        return f"names parent 0x{k.field(blob, 'xa_node.parent'):x}, not 0x{parent:x}"
    if "xa_node.count" in o:
        count, used = blob[o["xa_node.count"]], sum(1 for e in slots if e)
        if count > len(slots) or used > count or not count:
            return f"counts {count} entries but holds {used}"
    return ""


def _pid_entry(k: LinuxKernel, pid: int, index: int, ns: int) -> tuple[int, int]:
    """Return (nr, task gva or 0) of the struct pid stored at idr `index`; GuestDataError if it lies."""
    o = k.off
    upid = pid + o["pid.numbers"]
    nr = k.u32(upid + o["upid.nr"])
    if nr != index:
        raise GuestDataError(f"says pid {nr}, but it is stored at index {index}")
    if k.u64(upid + o["upid.ns"]) != ns:
        raise GuestDataError("its numbers[0].ns is not init_pid_ns")
    if "pid.level" in o and not 0 <= k.u32(pid + o["pid.level"]) <= MAX_PID_NS_LEVEL:
        raise GuestDataError(f"its level {k.u32(pid + o['pid.level'])} is absurd")
    head = pid + o["pid.tasks"]  # tasks[PIDTYPE_PID].first
    first = k.u64(head)
    if not first:  # a process group or session id whose leader has exited: no task of its own
        return nr, 0
    task = first - o["task_struct.pid_links"]
    if k.u64(first + o["hlist_node.pprev"]) != head:
        raise GuestDataError(f"its task 0x{task:x}'s pid_links do not point back at it")
    task_pid = k.u32(task + o["task_struct.pid"])
    if task_pid != nr:
        raise GuestDataError(f"its task 0x{task:x} says pid {task_pid}")
    if "task_struct.thread_pid" in o and k.u64(task + o["task_struct.thread_pid"]) != pid:
        raise GuestDataError(f"its task 0x{task:x}'s thread_pid is another struct pid")
    return nr, task


@dataclass(slots=True)
class CrossView:
    """The two kernel views of which tasks exist (task lists, PID idr) and what comparing them showed.

    `hidden` is complete only when both views were complete and every check passed; otherwise it holds
    no claims and its problem names the view that failed (the comparison is unverifiable).
    """

    threads: Listing[int]  # task gvas on the task and thread lists
    pid_idr: Listing[tuple[int, int]]  # (pid, task gva or 0) in init_pid_ns's idr
    hidden: Listing[HiddenPid]

    @property
    def verified(self) -> bool:
        return self.hidden.complete

    def views(self) -> dict[str, dict[str, object]]:
        """Return each view's completeness (JSON-ready)."""
        return {"threads": {"count": len(self.threads), "complete": self.threads.complete,
                            "problem": self.threads.problem},
                "pid_idr": {"count": len(self.pid_idr), "complete": self.pid_idr.complete,
                            "problem": self.pid_idr.problem},
                "cross_view": {"verdict": "verified" if self.verified else "unverifiable",
                               "problem": self.hidden.problem, "hidden": len(self.hidden)}}


def cross_view(k: LinuxKernel) -> CrossView:
    """Compare the task lists with the PID idr; claim a hidden pid only when both views are sound."""
    listed = iter_thread_gvas(k)
    loose: list[tuple[int, int]] = []
    idr = iter_pid_idr(k, loose)
    hidden: Listing[HiddenPid] = Listing()
    if not listed.complete:
        hidden.fail(f"cross-view unverifiable: the task list walk is incomplete ({listed.problem})")
    if not idr.complete:
        hidden.fail(f"cross-view unverifiable: the PID idr walk is incomplete or invalid ({idr.problem})")
    if not hidden.complete:
        return CrossView(listed, idr, hidden)
    problem = ""
    in_list: dict[int, int] = {}
    for gva in listed:
        try:
            pid = k.u32(gva + k.off["task_struct.pid"])
        except _BAD as exc:
            problem = f"task 0x{gva:x} unreadable ({exc})"
            break
        if pid in in_list:
            problem = f"pid {pid} belongs to two tasks on the task list (0x{in_list[pid]:x}, 0x{gva:x})"
            break
        in_list[pid] = gva
    in_idr = {nr: task for nr, task in idr if task}
    numbers = {nr for nr, _task in idr}
    for pid in sorted(set(in_list) & set(in_idr)):
        if problem:
            break
        if in_list[pid] != in_idr[pid]:
            problem = f"pid {pid} is task 0x{in_list[pid]:x} on the task list but 0x{in_idr[pid]:x} in the PID idr"
    for pid in sorted(set(in_list) - set(in_idr)):
        if problem:
            break
        if pid in numbers:
            problem = f"pid {pid} is in the PID idr, but its struct pid does not link task 0x{in_list[pid]:x}"
        elif any(lo <= pid <= hi for lo, hi in loose):
            problem = (f"pid {pid} is on the task list but missing from a PID idr node that counts more "
                       "allocated slots than it holds (a pid being allocated, or a slot lost to damage)")
        else:
            problem = struct_pid_problem(k, in_list[pid], pid)
    if problem:
        return CrossView(listed, idr, hidden.fail(f"cross-view unverifiable: the views contradict each other "
                                                  f"({problem})"))
    for pid in sorted(set(in_list) ^ set(in_idr)):
        gva = in_list.get(pid) or in_idr[pid]
        try:
            comm = _comm(k.read(gva + k.off["task_struct.comm"], 16))
        except _BAD:
            comm = ""
        hidden.items.append(HiddenPid(pid, pid in in_list, pid in in_idr, gva, comm))
    return CrossView(listed, idr, hidden)


def struct_pid_problem(k: LinuxKernel, task: int, pid: int) -> str:
    """Return why a task's own struct pid (thread_pid) does not name `pid` in init_pid_ns ("" when it does)."""
    o = k.off
    if "task_struct.thread_pid" not in o:
        return ""
    try:
        struct_pid = k.u64(task + o["task_struct.thread_pid"])
        upid = struct_pid + o["pid.numbers"]
        nr, ns = k.u32(upid + o["upid.nr"]), k.u64(upid + o["upid.ns"])
    except _BAD as exc:
        return f"task 0x{task:x} (pid {pid}): its struct pid is unreadable ({exc})"
    if nr != pid or ns != k.symbols.get("init_pid_ns"):
        return f"task 0x{task:x} says pid {pid} but its struct pid says {nr}"
    return ""


def hidden_processes(k: LinuxKernel) -> Listing[HiddenPid]:
    """Return pids whose task is in the PID idr but not on the task lists, or the other way round.

    Incomplete (no items, the problem naming the view that failed) unless both views are complete and
    consistent: a damaged view must never produce hidden-process claims.
    """
    return cross_view(k).hidden
