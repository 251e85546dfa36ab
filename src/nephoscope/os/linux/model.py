"""The Linux kernel model: detection, symbols and every struct member the walkers use, resolved at load.

`LinuxKernel.open(phys)` detects the kernel (zero configuration), then resolves all member offsets,
sizes and array lengths from the guest's own BTF in one go, so a kernel that lays a structure out
differently fails here, naming the kernel, the struct and the member, not halfway through a walk. Kernel
drift (maple tree vs the old VMA list, `__state` vs `state`, `core_layout` vs `mem[]`) is decided here,
in one place. The layout is then proved against the kernel's own static objects (`check_anchors`): BTF
or kernel data that contradict each other make the model fail to load (GuestDataError), not yield
plausible garbage. Every read is charged to one `Budget` per model (one command).

Addresses: `gva` are kernel-virtual unless a name says `user`; reads go through `init_top_pgt`.
Nothing pauses the VM unless you use `paused()` (which needs a QMP connection).
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nephoscope.core.errors import DetectionError, GuestDataError, MemoryAccessError
from nephoscope.memory.paging import AddressSpace
from nephoscope.os.linux.detect import Detection, DetectionReport, KernelInfo, Stage, detect
from nephoscope.os.linux.kallsyms import Kallsyms, Phys

if TYPE_CHECKING:
    from nephoscope.os.btf.reader import Btf
    from nephoscope.os.linux import walkers
    from nephoscope.os.linux.symbols import TypeSource

# Every member a walker reads, by what reads it; "?" marks members only some kernels have (their absence
# is handled where they are used). Nothing is required that no code reads: a kernel must not fail to
# load for a member nobody needs.
WANTED: dict[str, list[str]] = {
    # processes, threads, the cross-view (walkers.read_task, iter_thread_gvas, hidden_processes)
    "task_struct": ["tasks", "pid", "tgid", "real_parent", "comm", "real_cred", "start_time", "start_boottime?",
                    "__state?", "state?", "exit_state", "flags", "mm", "signal", "thread_node", "pid_links",
                    "thread_pid?", "files"],
    "signal_struct": ["thread_head"],
    "cred": ["uid", "gid", "euid", "egid"],
    "list_head": ["next", "prev"],
    "hlist_node": ["pprev"],
    # exe, cmdline, VMAs (read_task, vmas)
    "mm_struct": ["pgd", "arg_start", "arg_end", "exe_file", "start_brk", "brk", "start_stack"],
    "vm_area_struct": ["vm_start", "vm_end", "vm_flags", "vm_pgoff", "vm_file", "vm_mm", "vm_ops?",
                       "vm_private_data?"],
    # paths (d_path, file_path)
    "file": ["f_path"],
    "path": ["mnt", "dentry"],
    "dentry": ["d_parent", "d_name", "d_hash.pprev", "d_sb", "d_inode"],
    "qstr": ["len", "name"],
    "mount": ["mnt", "mnt_parent", "mnt_mountpoint"],
    "vfsmount": ["mnt_root"],
    "super_block": ["s_type"],
    "file_system_type": ["name"],
    "inode": ["i_ino"],
    # open files (files)
    "files_struct": ["fdt"],
    "fdtable": ["max_fds", "fd"],
    # modules (modules, module_memory)
    "module": ["list", "name", "state", "core_layout.base?", "core_layout.size?", "init_layout.size?", "mem?"],
    # the PID idr (iter_pid_idr) and its anchors
    "pid_namespace": ["idr", "level?", "pid_allocated?", "child_reaper?"],
    "idr": ["idr_rt", "idr_base?"],
    "xarray": ["xa_head"],
    "xa_node": ["shift", "slots", "offset?", "count?", "parent?"],
    "pid": ["tasks", "numbers", "level?"],
    "upid": ["nr", "ns"],
}
OLD_VMA = {"mm_struct": ["mmap"], "vm_area_struct": ["vm_next"]}
# 6.1+ (commit d4af56c5c7c6, "mm: start tracking VMAs with maple tree"): the maple tree's node layouts
NEW_VMA = {"mm_struct": ["mm_mt"], "maple_tree": ["ma_root"], "maple_node": [],
           "maple_range_64": ["pivot", "slot", "meta.end"], "maple_arange_64": ["pivot", "slot", "meta.end"]}
SYMBOLS = ("init_task", "init_pid_ns", "modules")
# the structs read whole (LinuxKernel.struct) or node by node: each must be a plausible size for this
MAX_STRUCT_SIZE = 8 * 4096
READ_WHOLE = ("task_struct", "cred", "mm_struct", "vm_area_struct", "xa_node", "pid", "upid", "maple_node")
# members the walkers read with a fixed width: BTF must agree (a corrupt type id must not pass as a layout)
WIDTHS: dict[str, tuple[int, ...]] = {
    **{f"task_struct.{m}": (4,) for m in ("pid", "tgid", "flags", "exit_state", "__state")},
    "task_struct.state": (4, 8), "task_struct.comm": (16,),
    **{f"cred.{m}": (4,) for m in ("uid", "gid", "euid", "egid")},
    "task_struct.tasks": (16,), "task_struct.thread_node": (16,),
    **{k: (8,) for k in ("task_struct.real_parent", "task_struct.real_cred", "task_struct.mm", "task_struct.signal",
                         "task_struct.thread_pid", "task_struct.start_time", "list_head.next", "list_head.prev",
                         "hlist_node.pprev", "mm_struct.pgd", "xarray.xa_head", "upid.ns", "maple_tree.ma_root")},
    "signal_struct.thread_head": (16,), "upid.nr": (4,), "pid.level": (4,), "idr.idr_base": (4,),
    "pid_namespace.level": (4,), "pid_namespace.pid_allocated": (4,), "qstr.len": (4,), "fdtable.max_fds": (4,),
    "xa_node.shift": (1,), "xa_node.offset": (1,), "xa_node.count": (1,), "maple_range_64.meta.end": (1,),
    "maple_arange_64.meta.end": (1,),
}
SWAPPER = "swapper"  # init_task.comm: "swapper/0" (sched_init names the boot CPU's idle task)
PF_KTHREAD = 0x00200000
MAX_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps that keep walks of hostile or changing kernel structures bounded.

    The per-walk caps stop one runaway structure; `max_reads`, `max_read_bytes` and `max_nodes` are one
    budget for everything a LinuxKernel reads (one command), so many bounded walks cannot add up to a hang.
    """

    max_tasks: int = 1 << 16
    max_threads: int = 1 << 14  # per process
    max_vmas: int = 1 << 16
    max_fds: int = 1 << 16
    max_modules: int = 4096
    max_path_depth: int = 256
    max_cmdline: int = 1 << 17
    max_tree_nodes: int = 1 << 16
    max_module_symbols: int = 1 << 18  # per module
    max_reads: int = 1 << 23  # reads of kernel (and user) memory per command
    max_read_bytes: int = 4 << 30
    max_single_read: int = 16 << 20
    max_nodes: int = 1 << 22  # list entries and tree nodes visited per command


class Budget:
    """What one command may still read: reads, bytes and walk nodes; GuestDataError once one runs out.

    Every read through the kernel model and every list entry or tree node a walk visits is charged here,
    so the caps hold across walks; `exhausted` keeps the first cap hit so callers can report it.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.reads = self.bytes = self.nodes = 0
        self.exhausted = ""

    def reset(self) -> None:
        """Start a new budget (a new command, or the next event of a long watch)."""
        self.reads = self.bytes = self.nodes = 0
        self.exhausted = ""

    def _over(self, what: str) -> GuestDataError:
        if not self.exhausted:
            self.exhausted = what
        return GuestDataError(f"read budget exhausted: {what}")

    def read(self, size: int) -> None:
        """Charge one read of `size` bytes; raise GuestDataError past the caps."""
        lim = self.limits
        if size > lim.max_single_read:
            raise GuestDataError(f"refusing a {size}-byte read of guest memory (cap {lim.max_single_read})")
        self.reads += 1
        self.bytes += size
        if self.reads > lim.max_reads:
            raise self._over(f"more than {lim.max_reads} reads")
        if self.bytes > lim.max_read_bytes:
            raise self._over(f"more than {lim.max_read_bytes} bytes read")

    def node(self, count: int = 1) -> None:
        """Charge `count` list entries or tree nodes; raise GuestDataError past `max_nodes`."""
        self.nodes += count
        if self.nodes > self.limits.max_nodes:
            raise self._over(f"more than {self.limits.max_nodes} list entries and tree nodes")

    def to_dict(self) -> dict[str, int | str]:
        """Return what was spent (JSON-ready)."""
        return {"reads": self.reads, "bytes": self.bytes, "nodes": self.nodes, "exhausted": self.exhausted}


class Offsets:
    """Resolved member offsets (`off["task_struct.pid"]`), sizes and array lengths, and struct sizes.

    Raise GuestDataError when the BTF's own numbers are impossible: a struct of size 0, a member that ends
    past its struct, a struct read whole that is larger than a few pages.
    """

    def __init__(self, types: Btf | TypeSource, wanted: dict[str, list[str]], kernel: str,
                 read_whole: tuple[str, ...] = ()) -> None:
        """Resolve `wanted` from the guest's BTF or any TypeSource (a Volatility ISF, DWARF, the model cache)."""
        from nephoscope.os.linux.symbols import BtfTypes

        source = types if hasattr(types, "members") else BtfTypes(types)  # type: ignore[arg-type]
        layout = source.members(wanted, kernel)
        self._off: dict[str, int] = {}
        self.msize: dict[str, int] = {}  # member size in bytes
        self.count: dict[str, int] = {}  # element count of array members
        self.size = {s: source.struct_size(s) for s in layout}
        bad: list[str] = []
        for s, members in layout.items():
            size = self.size[s]
            if size <= 0 or (s in read_whole and size > MAX_STRUCT_SIZE):
                bad.append(f"struct {s} has size {size}")
            for path, m in members.items():
                key = f"{s}.{path}"
                msize = m.size
                self._off[key], self.msize[key] = m.offset, msize
                if m.count is not None:
                    self.count[key] = m.count
                end_bits = m.bit_offset + (m.bitfield_size or msize * 8)
                if m.bit_offset < 0 or end_bits > size * 8:
                    bad.append(f"{key} at {m.offset} (+{msize}) ends past the struct's {size} bytes")
        if bad:
            raise GuestDataError(f"kernel {kernel}: {source.label} layout is impossible ({'; '.join(bad[:5])}); "
                                 "the type information is corrupt, so no structure can be read reliably")

    def __getitem__(self, key: str) -> int:
        return self._off[key]

    def __contains__(self, key: object) -> bool:
        return key in self._off

    def get(self, key: str) -> int | None:
        """Return the offset of `struct.member`, or None when this kernel lacks it."""
        return self._off.get(key)


@dataclass(frozen=True, slots=True)
class NodeLayout:
    """Where one maple node type keeps its pivots, slots and metadata end byte (from BTF)."""

    pivot: int
    pivots: int
    slot: int
    slots: int
    end: int | None  # offset of meta.end, None where the node has no metadata


@dataclass(frozen=True, slots=True)
class MapleLayout:
    """The maple tree's node size, node type numbers (enum maple_type) and per-type layouts (6.1+)."""

    node_size: int
    leaf_64: int
    range_64: int
    arange_64: int
    range: NodeLayout
    arange: NodeLayout


class LinuxKernel:
    """One guest Linux kernel, ready to walk: info, detection report, symbols, BTF and member offsets."""

    def __init__(self, phys: Phys, detection: Detection, qmp: Any = None, limits: Limits | None = None,
                 types: TypeSource | None = None) -> None:
        """Build the model from a successful detection; raise GuestDataError naming any missing member.

        Layouts come from `types` (a --symbols file, the model cache) or else the guest's own BTF.
        """
        own_btf = () if types is not None else ("btf",)
        detection.report.require("kallsyms", "phys/virt base", "page-table root", *own_btf)
        assert detection.info and detection.kallsyms and detection.kernel_space
        self.phys = phys
        self.detection = detection
        self.info: KernelInfo = detection.info
        self.report: DetectionReport = detection.report
        self.symbols: Kallsyms = detection.kallsyms
        self.btf: Btf | None = detection.btf  # None when the types came from a file without BTF
        if types is None:
            from nephoscope.os.linux.symbols import BtfTypes

            types = BtfTypes(detection.btf)  # type: ignore[arg-type]
        self.types: TypeSource = types
        self.kernel: AddressSpace = detection.kernel_space
        self.qmp = qmp
        self.limits = limits or Limits()
        self.budget = Budget(self.limits)
        kernel = self.info.release or "unknown kernel"
        self.maple = self.types.has_struct("maple_tree")
        wanted = {k: list(v) for k, v in WANTED.items()}
        for name, members in (NEW_VMA if self.maple else OLD_VMA).items():
            wanted.setdefault(name, []).extend(members)
        if self.types.has_struct("mod_kallsyms"):
            wanted["module"].append("kallsyms")
            wanted["mod_kallsyms"] = ["symtab", "num_symtab", "strtab", "typetab"]
        if self.types.has_struct("module_memory"):  # 6.4+: module.mem[MOD_MEM_NUM_TYPES]
            wanted["module_memory"] = ["base", "size"]
        self.off = Offsets(self.types, wanted, kernel, READ_WHOLE)
        widths = [f"{key} is {self.off.msize[key]} bytes" for key, allowed in WIDTHS.items()
                  if key in self.off and self.off.msize[key] not in allowed]
        if widths:
            raise GuestDataError(f"kernel {kernel}: BTF member sizes are impossible ({'; '.join(widths[:5])}); "
                                 "the BTF in guest memory is corrupt")
        self.module_mem_types = self._module_mem_types()
        self.state_member = "task_struct.__state" if "task_struct.__state" in self.off else "task_struct.state"
        if self.state_member not in self.off:
            raise GuestDataError(f"kernel {kernel}: BTF struct task_struct has neither __state nor state")
        if self.off.get("module.core_layout.base") is None and self.off.get("module.mem") is None:
            raise GuestDataError(f"kernel {kernel}: BTF struct module has neither core_layout nor mem[]")
        self.maple_layout = self._maple_layout(kernel) if self.maple else None
        self.xa_slots = self.off.count.get("xa_node.slots", 0)
        if self.xa_slots not in (16, 64):  # XA_CHUNK_SIZE: 64, or 16 with CONFIG_BASE_SMALL
            raise GuestDataError(f"kernel {kernel}: BTF says xa_node.slots has {self.xa_slots} entries")
        missing = [s for s in SYMBOLS if self.symbols.find(s) is None]
        if missing:
            raise DetectionError(f"kernel {kernel}: kallsyms lacks {', '.join(missing)} (stage kallsyms)")
        started = time.perf_counter()
        problems = self.check_anchors()
        self.report.stages = [st for st in self.report.stages if st.name != "model"]
        self.report.stages.append(Stage("model", not problems, "; ".join(problems) or
                                        "init_task, init_struct_pid, init_cred and init_mm fit the BTF layout",
                                        time.perf_counter() - started))
        if problems:
            raise GuestDataError(f"kernel {kernel}: the kernel's own objects contradict its BTF layout "
                                 f"({'; '.join(problems)}); the BTF or kernel data in this image is corrupt, "
                                 "so nothing read through this model could be trusted")
        self.budget.reset()

    def _module_mem_types(self) -> int:
        """Return the length of module.mem[] (6.4+), or 0 on kernels with core_layout/init_layout."""
        return self.off.count.get("module.mem", 0) if self.off.size.get("module_memory") else 0

    def _maple_layout(self, kernel: str) -> MapleLayout:
        """Return the maple node layouts from BTF; raise GuestDataError if they cannot be a maple tree."""
        o = self.off
        values = self.types.enum_values("maple_type") or {}
        names = ("maple_leaf_64", "maple_range_64", "maple_arange_64")
        if any(n not in values for n in names):
            raise GuestDataError(f"kernel {kernel}: BTF enum maple_type lacks one of {', '.join(names)}")

        def node(s: str) -> NodeLayout:
            return NodeLayout(o[f"{s}.pivot"], o.count.get(f"{s}.pivot", 0), o[f"{s}.slot"],
                              o.count.get(f"{s}.slot", 0), o.get(f"{s}.meta.end"))

        size = o.size["maple_node"]
        layout = MapleLayout(size, values["maple_leaf_64"], values["maple_range_64"], values["maple_arange_64"],
                             node("maple_range_64"), node("maple_arange_64"))
        for name, n in (("maple_range_64", layout.range), ("maple_arange_64", layout.arange)):
            # a node is aligned to its size (the low bits of a node pointer encode its type), and a node
            # with p pivots has p + 1 slots
            if not 0 < n.pivots < n.slots == n.pivots + 1 or size & (size - 1) or size < 64 or \
                    max(n.pivot + 8 * n.pivots, n.slot + 8 * n.slots, (n.end or 0) + 1) > size:
                raise GuestDataError(f"kernel {kernel}: BTF layout of {name} ({n.pivots} pivots, {n.slots} slots, "
                                     f"node size {size}) cannot be a maple node")
        return layout

    def check_anchors(self) -> list[str]:
        """Return how the kernel's own static objects contradict the BTF layout ([] when they fit).

        init_task is the boot CPU's idle task: comm "swapper/0", pid and tgid 0, a kernel thread without
        an mm that is its own real_parent, the only thread of init_signals, with init_cred and
        init_struct_pid (pid 0 in init_pid_ns); init_mm's pgd is init_top_pgt. A wrong member offset or
        corrupt kernel data shows here before any walk trusts them. Reads kernel gvas; does not pause.
        """
        o, sym = self.off, self.symbols
        init = sym.get("init_task")
        problems: list[str] = []

        def expect(what: str, got: object, want: object) -> None:
            if got != want:
                problems.append(f"{what} is {got!r}, expected {want!r}")

        try:
            task = self.struct("task_struct", init)
            raw = task[o["task_struct.comm"]:o["task_struct.comm"] + 16]
            comm = raw.split(b"\0", 1)[0].decode("latin-1")
            if not comm.startswith(SWAPPER) or b"\0" not in raw:
                problems.append(f"init_task.comm is {comm!r}, not {SWAPPER}/0")
            expect("init_task.pid", self.field(task, "task_struct.pid", "i"), 0)
            expect("init_task.tgid", self.field(task, "task_struct.tgid", "i"), 0)
            expect("init_task.mm", self.field(task, "task_struct.mm"), 0)
            expect("init_task.real_parent", self.field(task, "task_struct.real_parent"), init)
            if not self.field(task, "task_struct.flags", "I") & PF_KTHREAD:
                problems.append("init_task.flags lacks PF_KTHREAD")
            signal = self.field(task, "task_struct.signal")
            expect("init_task.signal->thread_head.next", self.u64(signal + o["signal_struct.thread_head"]),
                   init + o["task_struct.thread_node"])
            cred_gva = self.field(task, "task_struct.real_cred")
            if sym.find("init_cred") is not None:
                expect("init_task.real_cred", cred_gva, sym.get("init_cred"))
            cred = self.struct("cred", cred_gva)
            for member in ("uid", "gid", "euid", "egid"):
                expect(f"init_cred.{member}", self.field(cred, f"cred.{member}", "I"), 0)
            ns = sym.get("init_pid_ns")
            if "pid_namespace.level" in o:
                expect("init_pid_ns.level", self.u32(ns + o["pid_namespace.level"]), 0)
            struct_pid = sym.find("init_struct_pid")
            if struct_pid is not None:
                if "task_struct.thread_pid" in o:
                    expect("init_task.thread_pid", self.field(task, "task_struct.thread_pid"), struct_pid)
                upid = struct_pid + o["pid.numbers"]
                expect("init_struct_pid.numbers[0].nr", self.u32(upid + o["upid.nr"]), 0)
                expect("init_struct_pid.numbers[0].ns", self.u64(upid + o["upid.ns"]), ns)
                if "pid.level" in o:
                    expect("init_struct_pid.level", self.u32(struct_pid + o["pid.level"]), 0)
            if sym.find("init_mm") is not None and sym.find("init_top_pgt") is not None:
                expect("init_mm.pgd", self.u64(sym.get("init_mm") + o["mm_struct.pgd"]), sym.get("init_top_pgt"))
        except (MemoryAccessError, GuestDataError) as exc:
            problems.append(f"a kernel anchor is unreadable ({exc})")
        return problems

    @classmethod
    def open(cls, phys: Phys, qmp: Any = None, *, symbols: Kallsyms | None = None,
             limits: Limits | None = None, types: TypeSource | None = None) -> LinuxKernel:
        """Detect the kernel in guest-physical `phys` and load the model (does not pause the VM).

        `symbols` (link-time, from a file) replace kallsyms recovery; `types` replace the guest's BTF.
        """
        return cls(phys, detect(phys, symbols=symbols, want_btf=types is None), qmp=qmp, limits=limits, types=types)

    # --- memory ----------------------------------------------------------------------------------

    def read(self, gva: int, size: int) -> bytes:
        """Return `size` bytes at kernel gva (through init_top_pgt), charged to the budget.

        Raise TranslationError if unmapped, GuestDataError for an impossible address or size or once the
        command's read budget is spent.
        """
        return self.read_in(self.kernel, gva, size)

    def read_in(self, space: AddressSpace, gva: int, size: int) -> bytes:
        """Return `size` bytes at gva in `space` (kernel or a process's), charged to the same budget."""
        if not 0 <= gva <= MAX_U64 or not 0 <= size <= MAX_U64 - gva + 1:
            raise GuestDataError(f"impossible read of {size} bytes at 0x{gva:x} (guest data is garbage)")
        self.budget.read(size)
        return space.read(gva, size)

    def u64(self, gva: int) -> int:
        """Return the u64 at kernel gva."""
        return int.from_bytes(self.read(gva, 8), "little")

    def u32(self, gva: int) -> int:
        """Return the u32 at kernel gva."""
        return int.from_bytes(self.read(gva, 4), "little")

    def cstr(self, gva: int, limit: int = 256) -> str:
        """Return the NUL-terminated string at kernel gva (at most `limit` bytes, not crossing unmapped pages)."""
        out = b""
        while len(out) < limit:
            n = min(limit - len(out), 4096 - (gva + len(out)) % 4096)
            chunk = self.read(gva + len(out), n)
            nul = chunk.find(b"\0")
            if nul >= 0:
                return (out + chunk[:nul]).decode("utf-8", "backslashreplace")
            out += chunk
        return out.decode("utf-8", "backslashreplace")

    def struct(self, name: str, gva: int) -> bytes:
        """Return the whole struct `name` at kernel gva as bytes (one read, then unpack locally)."""
        return self.read(gva, self.off.size[name])

    def field(self, blob: bytes, key: str, fmt: str = "Q") -> int:
        """Return `struct.member` from a struct blob read with `struct()`; GuestDataError if it does not fit."""
        try:
            return int(struct.unpack_from("<" + fmt, blob, self.off[key])[0])
        except struct.error:
            raise GuestDataError(f"{key} at {self.off[key]} does not fit a {len(blob)}-byte struct") from None

    def user_space(self, pgd_gva: int) -> AddressSpace:
        """Return the user address space whose top table is at kernel gva `pgd_gva` (mm->pgd)."""
        return AddressSpace(self.phys, self.kernel.translate(pgd_gva), self.info.levels)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Pause the VM via QMP for a consistent walk, resume after only if it ran (no-op without QMP)."""
        from nephoscope.hypervisor.control import paused
        with paused(self.qmp):
            self.kernel.flush()
            yield

    # --- walks (see walkers.py) ------------------------------------------------------------------

    def processes(self) -> walkers.Listing[walkers.Task]:
        """Return every process (thread-group leader) on init_task.tasks, with exe and cmdline."""
        from nephoscope.os.linux import walkers
        return walkers.processes(self)

    def threads(self) -> walkers.Listing[walkers.Task]:
        """Return every thread of every process (no exe/cmdline)."""
        from nephoscope.os.linux import walkers
        return walkers.threads(self)

    def vmas(self, task: walkers.Task) -> walkers.Listing[walkers.Vma]:
        """Return the memory mappings of `task` (maple tree on 6.1+, the VMA list before)."""
        from nephoscope.os.linux import walkers
        return walkers.vmas(self, task)

    def files(self, task: walkers.Task) -> walkers.Listing[walkers.OpenFile]:
        """Return the open file descriptors of `task`."""
        from nephoscope.os.linux import walkers
        return walkers.files(self, task)

    def modules(self) -> walkers.Listing[walkers.Module]:
        """Return the loaded kernel modules on the `modules` list."""
        from nephoscope.os.linux import walkers
        return walkers.modules(self)

    def module_symbols(self, module: walkers.Module) -> walkers.Listing[tuple[int, str, str]]:
        """Return (gva, type, name) of a module's symbols (its own kallsyms), like /proc/kallsyms."""
        from nephoscope.os.linux import walkers
        return walkers.module_symbols(self, module)

    def hidden_processes(self) -> walkers.Listing[walkers.HiddenPid]:
        """Return pids seen in only one of the task list and the PID idr (init_pid_ns); incomplete, with no
        claims, unless both views are complete and consistent."""
        from nephoscope.os.linux import walkers
        return walkers.hidden_processes(self)

    def cross_view(self) -> walkers.CrossView:
        """Return both kernel views of the tasks (task lists, PID idr), each with its completeness, and the
        hidden pids when the comparison could be verified."""
        from nephoscope.os.linux import walkers
        return walkers.cross_view(self)

    def __repr__(self) -> str:
        return f"LinuxKernel({self.info.release!r}, kaslr={self.info.kaslr}, {len(self.symbols)} symbols)"


def safe(fn: Any, *args: Any) -> Any:
    """Return fn(*args), or None if guest data made it fail (a read outside RAM or a bad value).

    The model converts every failure that guest data can cause into these two errors at the source.
    """
    try:
        return fn(*args)
    except (MemoryAccessError, GuestDataError):
        return None
