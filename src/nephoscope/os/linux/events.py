"""Decode trapped kernel events (exec, exit, module load) with the one Linux kernel model.

A breakpoint on a hook function (`HOOKS`) stops a vCPU at the function's entry; its first argument
(`rdi`) is what is decoded, and the current task is read through the kernel GS base of that vCPU.
Every read goes through `LinuxKernel` (the kernel page tables); the new image's arguments are read in
its own address space, `LinuxKernel.user_space(mm->pgd)`. Paths come from `walkers.file_path` (mounts
crossed, like d_path()), tasks from `walkers.read_task`, module sizes from `core_layout` (<= 6.3) or
`walkers.module_memory` (6.4+, `mem[]`).

Members and symbols only events need (`linux_binprm.*`, the per-CPU current task, the hooks) are
resolved by `EventDecoder(kernel)`, not when the model loads: a kernel whose binprm differs still opens
for `inspect`, and `EventDecoder` fails once, naming the kernel, the struct and the member.
Addresses are kernel gvas unless named `user`. Nothing here pauses the VM: the trap method calls these
while a vCPU is stopped at a breakpoint.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from nephoscope.core.errors import DetectionError, GuestDataError, MemoryAccessError, NephoscopeError
from nephoscope.os.btf.types import Enum, Kind
from nephoscope.os.linux import walkers
from nephoscope.os.linux.model import LinuxKernel, Offsets

# event → kernel function whose entry is trapped; its first argument (rdi) is what is decoded
HOOKS = {"exec": "begin_new_exec", "exit": "do_exit", "module": "do_init_module"}
EXEC_MEMBERS = {"linux_binprm": ["filename", "interp", "file", "mm", "p", "argc"]}
MAX_PATH, MAX_ARGS, MAX_ARGV_BYTES, MAX_NAME = 4096, 64, 4096, 56
BAD = (MemoryAccessError, GuestDataError, struct.error, ValueError)


@dataclass(frozen=True, slots=True)
class Current:
    """The task that runs on the stopped vCPU (at a hook: the task doing the exec, exit or insmod)."""

    gva: int
    pid: int  # tgid, what users call the pid
    tid: int
    ppid: int  # real parent's tgid
    comm: str  # for an exec: the name before the exec
    mm_gva: int  # for an exec: the old mm (still current at begin_new_exec)


@dataclass(frozen=True, slots=True)
class Exec:
    """An exec at begin_new_exec: the binary is open and accepted by a binfmt, the new mm is built."""

    path: str  # bprm->filename, as passed to execve
    interp: str  # bprm->interp: what is really loaded (differs for scripts)
    file: str | None  # path of bprm->file, mounts crossed (None: unreadable, see problems)
    argv: tuple[str, ...] | None  # from the new stack in the new mm (None: unreadable)
    new_mm_gva: int  # bprm->mm
    problems: tuple[tuple[str, str], ...] = ()  # (field, why) for what could not be read


@dataclass(frozen=True, slots=True)
class Exit:
    """A task entering do_exit(code)."""

    code: int
    status: int
    signal: int


@dataclass(frozen=True, slots=True)
class ModuleLoad:
    """A module at do_init_module, before its init runs (its init sections are still mapped)."""

    name: str
    gva: int  # struct module
    core_base: int  # core_layout.base (<= 6.3) or mem[MOD_TEXT].base (6.4+), as /proc/modules shows
    core_size: int  # what /proc/modules shows once init is done and freed
    init_size: int  # init sections, freed after init


class EventDecoder:
    """The kernel model plus what event decoding needs beyond it, resolved once (does not pause the VM)."""

    def __init__(self, kernel: LinuxKernel, events: Iterable[str] = tuple(HOOKS)) -> None:
        """Resolve hooks, members and symbols for `events`; raise DetectionError or GuestDataError naming them."""
        self.kernel = kernel
        self.events = tuple(dict.fromkeys(events))
        release = kernel.info.release or "unknown kernel"
        unknown = [e for e in self.events if e not in HOOKS]
        if unknown:
            raise NephoscopeError(f"unknown kernel event(s) {', '.join(unknown)}; choose from {', '.join(HOOKS)}")
        self.hooks: dict[int, str] = {}
        for event in self.events:
            gva = kernel.symbols.find(HOOKS[event])
            if gva is None:
                raise DetectionError(f"kernel {release}: kallsyms lacks {HOOKS[event]}, the hook of {event} events "
                                     "(stage kallsyms)")
            self.hooks[gva] = event
        self.off = Offsets(kernel.btf, EXEC_MEMBERS if "exec" in self.events else {}, release)
        self.current_task = current_task_offset(kernel)
        self.total_forks = kernel.symbols.find("total_forks")
        self.init_mem_types = init_mem_types(kernel) if "module" in self.events else ()

    def current(self, gs_base: int) -> int:
        """Return the task_struct gva of the current task of the stopped vCPU (kernel GS base `gs_base`)."""
        return current_task(self.kernel, self.current_task, gs_base)

    def task(self, gs_base: int) -> Current:
        """Return the current task of the stopped vCPU."""
        return read_current(self.kernel, self.current(gs_base))

    def exec(self, bprm: int) -> Exec:
        """Return the exec described by the linux_binprm at `bprm`."""
        return decode_exec(self.kernel, self.off, bprm)

    def module(self, mod: int) -> ModuleLoad:
        """Return the module being loaded (struct module at `mod`)."""
        return decode_module(self.kernel, mod, self.init_mem_types)

    def exec_mm(self, bprm: int) -> int | None:
        """Return bprm->mm, the new image's mm (None if unreadable)."""
        try:
            return self.kernel.u64(bprm + self.off["linux_binprm.mm"])
        except BAD:
            return None

    def forks(self) -> int | None:
        """Return the kernel's fork counter `total_forks` (None if unknown or unreadable)."""
        return forks(self.kernel, self.total_forks)


def current_task_offset(k: LinuxKernel) -> int:
    """Return the per-CPU offset of the current task pointer; DetectionError naming the kernel if none."""
    gva = k.symbols.find("current_task")  # a per-CPU variable of its own up to 6.1
    if gva is not None:
        return gva
    hot = k.symbols.find("pcpu_hot")  # 6.2 moved it into struct pcpu_hot
    member = k.btf.find_struct("pcpu_hot")
    found = member.find_member("current_task") if member is not None else None
    if hot is None or found is None:
        raise DetectionError(f"kernel {k.info.release or 'unknown kernel'}: neither the per-CPU current_task nor "
                             "pcpu_hot.current_task (BTF struct pcpu_hot, member current_task) is known "
                             "(stage kallsyms)")
    return hot + found.offset


def current_task(k: LinuxKernel, percpu_offset: int, gs_base: int) -> int:
    """Return the task_struct gva a vCPU runs: the pointer at kernel gva `gs_base + percpu_offset`."""
    return k.u64(gs_base + percpu_offset)


def read_current(k: LinuxKernel, task: int) -> Current:
    """Return who the task at kernel gva `task` is (walkers.read_task, without user memory)."""
    t = walkers.read_task(k, task, details=False)
    return Current(task, t.tgid, t.pid, t.ppid, t.comm, t.mm_gva)


def task_mm(k: LinuxKernel, task: int, tgid: int | None = None) -> int | None:
    """Return task->mm, or None if unreadable or (with `tgid`) the task is no longer that process."""
    try:
        if tgid is not None and k.u32(task + k.off["task_struct.tgid"]) != tgid:
            return None
        return k.u64(task + k.off["task_struct.mm"])
    except BAD:
        return None


def pgd_gpa(k: LinuxKernel, mm: int) -> int:
    """Return the gpa of the top page table of the mm_struct at `mm` (mm->pgd through the kernel page tables)."""
    return k.kernel.translate(k.u64(mm + k.off["mm_struct.pgd"]))


def decode_exec(k: LinuxKernel, off: Offsets, bprm: int) -> Exec:
    """Return the exec of the linux_binprm at `bprm`; raise on an unreadable filename, keep going otherwise."""
    path = k.cstr(k.u64(bprm + off["linux_binprm.filename"]), MAX_PATH)
    interp_gva = k.u64(bprm + off["linux_binprm.interp"])
    interp = k.cstr(interp_gva, MAX_PATH) if interp_gva else ""
    new_mm = k.u64(bprm + off["linux_binprm.mm"])
    problems: list[tuple[str, str]] = []
    file: str | None = None
    argv: tuple[str, ...] | None = None
    try:
        file = walkers.file_path(k, k.u64(bprm + off["linux_binprm.file"]))
    except BAD as exc:
        problems.append(("file", str(exc)))
    try:
        argv = exec_argv(k, off, bprm, new_mm)
    except BAD as exc:
        problems.append(("argv", str(exc)))
    return Exec(path, interp, file, argv, new_mm, tuple(problems))


def exec_argv(k: LinuxKernel, off: Offsets, bprm: int, new_mm: int) -> tuple[str, ...]:
    """Return the new program's arguments: `argc` strings at user gva bprm->p in the new mm."""
    argc = min(k.u32(bprm + off["linux_binprm.argc"]), MAX_ARGS)
    user = k.user_space(k.u64(new_mm + k.off["mm_struct.pgd"]))
    p, raw = k.u64(bprm + off["linux_binprm.p"]), b""
    while raw.count(b"\0") < argc and len(raw) < MAX_ARGV_BYTES:
        n = min(4096 - (p & 4095), MAX_ARGV_BYTES - len(raw))
        raw += user.read(p, n)
        p += n
    return tuple(a.decode("utf-8", "backslashreplace") for a in raw.split(b"\0")[:argc])


def decode_exit(code: int) -> Exit:
    """Return the exit of do_exit(`code`)."""
    return Exit(code & 0xFFFFFFFF, (code >> 8) & 0xFF, code & 0x7F)


def init_mem_types(k: LinuxKernel) -> tuple[int, ...]:
    """Return the module.mem[] indices of init sections (6.4+: enum mod_mem_type's MOD_INIT_*), () before."""
    if not k.module_mem_types:
        return ()
    found = k.btf.find_by_name("mod_mem_type", frozenset({Kind.ENUM, Kind.ENUM64}))
    if not isinstance(found, Enum):
        raise GuestDataError(f"kernel {k.info.release or 'unknown kernel'}: BTF lacks enum mod_mem_type, which "
                             "says which module.mem[] entries are init sections")
    return tuple(v for name, v in found.values if name.startswith("MOD_INIT_") and 0 <= v < k.module_mem_types)


def decode_module(k: LinuxKernel, mod: int, init_types: tuple[int, ...] = ()) -> ModuleLoad:
    """Return the module being initialised (struct module at `mod`), sized like /proc/modules."""
    o = k.off
    name = k.cstr(mod + o["module.name"], MAX_NAME)
    if "module.core_layout.base" in o:  # <= 6.3
        base, core = k.u64(mod + o["module.core_layout.base"]), k.u32(mod + o["module.core_layout.size"])
        init = k.u32(mod + o["module.init_layout.size"]) if "module.init_layout.size" in o else 0
        return ModuleLoad(name, mod, base, core, init)
    base, total = walkers.module_memory(k, mod)  # 6.4+: module.mem[MOD_MEM_NUM_TYPES]
    stride = o.size["module_memory"]
    init = sum(k.u32(mod + o["module.mem"] + i * stride + o["module_memory.size"]) for i in init_types)
    return ModuleLoad(name, mod, base, total - init, init)


def forks(k: LinuxKernel, total_forks: int | None) -> int | None:
    """Return the unsigned long at kernel gva `total_forks` (None if unknown or unreadable)."""
    if total_forks is None:
        return None
    try:
        return k.u64(total_forks)
    except BAD:
        return None
