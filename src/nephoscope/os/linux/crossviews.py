"""Cross-views that DKOM defeats one at a time: tasks and modules seen from independent kernel structures.

Tasks: the task lists and the PID idr (walkers.cross_view) against three views a rootkit that unlinks a
task from both rarely touches: the scheduler's run queues (per-CPU `runqueues`: `curr` and the CFS
rb-tree, descending into group entities), each CPU's `current` (`current_task` on 6.1, `pcpu_hot` on
6.2+), and the address spaces the hardware has (page-table roots found by scanning RAM, each mapped to
its mm through the pgd page's `struct page`.pt_mm, the mm's pgd pointing back, and mm->owner naming a
task whose mm is that mm). Modules: the module list against sysfs (module_kset's kobjects) and against
the executable pages of the module area in the kernel page tables.

Every view is a bounded, validated walk returning a `Listing`; a claim (a task or module one view has and
another lacks) is made only when every view it rests on is complete. Otherwise the comparison is
unverifiable and says which view failed. Addresses are kernel gvas unless named gpa; nothing pauses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nephoscope.core.errors import GuestDataError, MemoryAccessError
from nephoscope.os.linux.model import Offsets
from nephoscope.os.linux.walkers import Listing, iter_pid_idr, iter_thread_gvas, modules, struct_pid_problem, walk_list

if TYPE_CHECKING:
    from nephoscope.os.linux.model import LinuxKernel

_BAD = (MemoryAccessError, GuestDataError)
MAX_CPUS = 512
KERNEL_HALF = 0xFFFF800000000000
# x86-64 module area (arch/x86/include/asm/pgtable_64_types.h): MODULES_VADDR is __START_KERNEL_map +
# KERNEL_IMAGE_SIZE (0xffffffffa0000000 with a 512 MiB image, 0xffffffffc0000000 with KASLR's 1 GiB),
# MODULES_END 0xffffffffff000000; the kernel image itself is cut out of the scan by its own _text.._end
MODULE_AREA = (0xFFFFFFFFA0000000, 0xFFFFFFFFFF000000)
MAX_MODULE_STRUCT_SCAN = 4 << 20  # bytes after a module's text searched for its struct module
TASK_DEAD = 0x80
# what the cross-views read beyond the kernel model's own members; "?" marks members some kernels lack
WANTED: dict[str, list[str]] = {
    "rq": ["curr", "idle", "cfs"],
    "cfs_rq": ["tasks_timeline.rb_root.rb_node"],
    "rb_node": ["rb_left", "rb_right", "__rb_parent_color"],
    "sched_entity": ["run_node", "my_q?"],
    "task_struct": ["se", "mm", "pid", "exit_state", "comm"],
    "mm_struct": ["pgd", "owner?"],
    "page": ["pt_mm?"],
    "module": ["list", "name", "mkobj.kobj", "core_layout.base?", "core_layout.size?", "core_layout.text_size?",
               "init_layout.base?", "init_layout.size?", "init_layout.text_size?", "mem?"],
    "module_kobject": ["kobj", "mod"],
    "kobject": ["entry", "name"],
    "kset": ["list"],
    # the pointer checks (introspect/kernelhooks.py)
    "kprobe": ["hlist", "addr", "pre_handler", "post_handler"],
    "hlist_node": ["next"],
    "file_operations": ["owner"],
}
# the kernel's own allocators of executable module-area memory that is no module (each keeps a list)
KNOWN_ALLOCATORS: dict[str, list[str]] = {
    "bpf_prog_pack": ["list", "ptr"],  # kernel/bpf/core.c pack_list: 2 MiB packs of JITed BPF programs
    "kprobe_insn_cache": ["pages"],  # kernel/kprobes.c: pages of copied instructions (kprobe_insn_slots)
    "kprobe_insn_page": ["list", "insns"],
    "ftrace_ops": ["func", "next", "trampoline?", "trampoline_size?"],
}
STATIC_FTRACE_OPS = ("kprobe_ftrace_ops", "kprobe_ipmodify_ops", "global_ops", "graph_ops", "trace_ops")
BPF_PROG_PACK_SIZE = 2 << 20  # PMD_SIZE on x86-64 (kernel/bpf/core.c)


def layout(k: LinuxKernel) -> Offsets:
    """Return (and cache on the model) the member offsets the cross-views and hook checks read."""
    cached = getattr(k, "_crossview_offsets", None)
    if cached is not None:
        return cached
    wanted = {s: list(m) for s, m in WANTED.items()}
    if k.types.has_struct("pcpu_hot"):  # 6.2+ (commit 64701838bf05): current_task moved into pcpu_hot
        wanted["pcpu_hot"] = ["current_task"]
    if k.types.has_struct("module_memory"):
        wanted["module_memory"] = ["base", "size"]
    if k.types.has_struct("ptdesc"):  # 6.6+: page-table pages are described by struct ptdesc (overlays page)
        wanted["ptdesc"] = ["pt_mm"]
    for name, members in KNOWN_ALLOCATORS.items():
        if k.types.has_struct(name):
            wanted[name] = list(members)
    off = Offsets(k.types, wanted, k.info.release or "unknown kernel")
    k._crossview_offsets = off  # type: ignore[attr-defined]
    return off


# --- per-CPU ------------------------------------------------------------------------------------


def cpu_offsets(k: LinuxKernel) -> Listing[int]:
    """Return __per_cpu_offset[cpu] for every possible CPU (nr_cpu_ids of them)."""
    out: Listing[int] = Listing()
    base, count_sym = k.symbols.find("__per_cpu_offset"), k.symbols.find("nr_cpu_ids")
    if base is None or count_sym is None:
        return out.fail("kallsyms lacks __per_cpu_offset or nr_cpu_ids")
    try:
        count = k.u32(count_sym)
        if not 0 < count <= MAX_CPUS:
            return out.fail(f"nr_cpu_ids is {count}")
        raw = k.read(base, 8 * count)
    except _BAD as exc:
        return out.fail(f"per-CPU offsets unreadable ({exc})")
    out.items = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]
    return out


def _percpu(k: LinuxKernel, symbol: str, cpu_off: int) -> int | None:
    """Return the gva of per-CPU variable `symbol` on the CPU whose per-CPU offset is `cpu_off`."""
    sym = k.symbols.find(symbol)
    if sym is None:
        return None
    return (sym + cpu_off) & ((1 << 64) - 1)


def current_tasks(k: LinuxKernel) -> Listing[int]:
    """Return each CPU's current task gva (pcpu_hot.current_task on 6.2+, current_task on 6.1)."""
    off = layout(k)
    cpus = cpu_offsets(k)
    out: Listing[int] = Listing(complete=cpus.complete, problem=cpus.problem)
    for cpu, cpu_off in enumerate(cpus):
        if "pcpu_hot.current_task" in off:
            at = _percpu(k, "pcpu_hot", cpu_off)
            at = None if at is None else at + off["pcpu_hot.current_task"]
        else:
            at = _percpu(k, "current_task", cpu_off)
        if at is None:
            return out.fail("kallsyms lacks current_task and pcpu_hot")
        try:
            task = k.u64(at)
        except _BAD as exc:
            out.fail(f"CPU {cpu}: current unreadable ({exc})")
            continue
        if task:
            out.items.append(task)
    return out


def _rb_nodes(k: LinuxKernel, root: int, what: str, budget: list[int]) -> Listing[int]:
    """Return every node of an rb-tree (root node gva), checking each child's parent pointer."""
    out: Listing[int] = Listing()
    off = layout(k)
    stack = [(root, 0)] if root else []
    seen: set[int] = set()
    while stack:
        node, parent = stack.pop()
        if node in seen or budget[0] <= 0:
            return out.fail(f"{what}: node 0x{node:x} revisited or too many nodes")
        seen.add(node)
        budget[0] -= 1
        try:
            k.budget.node()
            raw = k.read(node, off.size["rb_node"])
        except _BAD as exc:
            return out.fail(f"{what}: node 0x{node:x} unreadable ({exc})")
        color = int.from_bytes(raw[off["rb_node.__rb_parent_color"]:][:8], "little")
        if color & ~3 != parent:
            return out.fail(f"{what}: node 0x{node:x} names parent 0x{color & ~3:x}, not 0x{parent:x}")
        out.items.append(node)
        for member in ("rb_left", "rb_right"):
            child = int.from_bytes(raw[off[f"rb_node.{member}"]:][:8], "little")
            if child:
                stack.append((child, node))
    return out


def runqueue_tasks(k: LinuxKernel) -> Listing[int]:
    """Return the tasks the scheduler holds: every CPU's rq->curr and the CFS rb-trees (group entities
    descended through se->my_q). Sleeping tasks are on no run queue: this view sees runnable ones only."""
    off = layout(k)
    cpus = cpu_offsets(k)
    out: Listing[int] = Listing(complete=cpus.complete, problem=cpus.problem)
    se_in_task = off["task_struct.se"]
    run_node = off["sched_entity.run_node"]
    budget = [k.limits.max_tree_nodes]
    for cpu, cpu_off in enumerate(cpus):
        rq = _percpu(k, "runqueues", cpu_off)
        if rq is None:
            return out.fail("kallsyms lacks runqueues")
        try:
            curr, idle = k.u64(rq + off["rq.curr"]), k.u64(rq + off["rq.idle"])
        except _BAD as exc:
            out.fail(f"CPU {cpu}: run queue unreadable ({exc})")
            continue
        if curr and curr != idle:
            out.items.append(curr)
        queues, seen_q = [rq + off["rq.cfs"]], set()
        while queues:
            cfs = queues.pop()
            if cfs in seen_q or len(seen_q) > k.limits.max_tree_nodes:
                return out.fail(f"CPU {cpu}: cfs_rq 0x{cfs:x} revisited")
            seen_q.add(cfs)
            try:
                root = k.u64(cfs + off["cfs_rq.tasks_timeline.rb_root.rb_node"])
            except _BAD as exc:
                out.fail(f"CPU {cpu}: cfs_rq 0x{cfs:x} unreadable ({exc})")
                continue
            nodes = _rb_nodes(k, root, f"CPU {cpu} cfs_rq 0x{cfs:x}", budget)
            if not nodes.complete:
                out.fail(nodes.problem)
            for node in nodes:
                se = node - run_node
                try:
                    my_q = k.u64(se + off["sched_entity.my_q"]) if "sched_entity.my_q" in off else 0
                except _BAD as exc:
                    out.fail(f"sched_entity 0x{se:x} unreadable ({exc})")
                    continue
                if my_q:
                    queues.append(my_q)
                else:
                    out.items.append(se - se_in_task)
    return out


# --- address spaces (hardware roots → mm → owner) --------------------------------------------


def address_space_owners(k: LinuxKernel, root_gpas: list[int]) -> Listing[tuple[int, int]]:
    """Return (root gpa, owner task gva) for every page-table root whose pgd page names an mm that points
    back at it and whose owner task uses that mm. Roots whose page names no mm (kernel-only tables, freed
    pages) are skipped; a chain that breaks halfway makes the view incomplete."""
    off = layout(k)
    out: Listing[tuple[int, int]] = Listing()
    pt_mm = off.get("ptdesc.pt_mm") if "ptdesc.pt_mm" in off else off.get("page.pt_mm")
    if pt_mm is None or "mm_struct.owner" not in off:
        return out.fail("this kernel's BTF has no page/ptdesc pt_mm or mm_struct.owner (CONFIG_MEMCG)")
    vmemmap_sym = k.symbols.find("vmemmap_base")
    try:
        vmemmap = k.u64(vmemmap_sym) if vmemmap_sym is not None else 0xFFFFEA0000000000
    except _BAD as exc:
        return out.fail(f"vmemmap_base unreadable ({exc})")
    page_size = off.size["page"]
    for gpa in root_gpas:
        pgd_gpa = gpa & ~0x1FFF  # PTI: the kernel table is the even page of the pair
        try:
            mm = k.u64(vmemmap + (pgd_gpa >> 12) * page_size + pt_mm)
            if mm < KERNEL_HALF:
                continue  # a root whose page names no mm: init_top_pgt, a table being freed
            pgd = k.u64(mm + off["mm_struct.pgd"])
            if k.kernel.find_translation(pgd) != pgd_gpa:
                continue  # a stale pt_mm (the page was reused): not this mm's table
            owner = k.u64(mm + off["mm_struct.owner"])
            if owner and k.u64(owner + off["task_struct.mm"]) != mm:
                continue  # a stale owner (an mm kept alive as a lazy active_mm after its owner moved on)
        except _BAD as exc:
            out.fail(f"root 0x{gpa:x}: its mm is unreadable ({exc})")
            continue
        if owner:
            out.items.append((gpa, owner))
    return out


# --- tasks cross-view ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HiddenTask:
    """A task some view sees and the task list and/or the PID table do not."""

    pid: int
    comm: str
    task_gva: int
    seen_by: tuple[str, ...]  # views that have it: run-queue, current, address-space
    missing_from: tuple[str, ...]  # task-list, pid-table
    evidence: str


@dataclass(slots=True)
class TaskViews:
    """Each task view with its completeness, and the hidden tasks when the comparison is sound."""

    views: dict[str, Listing[int]] = field(default_factory=dict)
    hidden: Listing[HiddenTask] = field(default_factory=Listing)

    def summary(self) -> dict[str, dict[str, object]]:
        """Return each view's count and completeness (JSON-ready)."""
        return {name: {"count": len(v), "complete": v.complete, "problem": v.problem} for name, v in self.views.items()}


def task_views(k: LinuxKernel, root_gpas: list[int] | None = None) -> TaskViews:
    """Compare the task lists and the PID table with the run queues, per-CPU current and address spaces.

    `root_gpas`: page-table roots the hardware has (arch's scan); None leaves the address-space view out.
    A task found by a secondary view and missing from the primary ones is claimed only when the primary
    views and that secondary view are complete and the task is self-consistent (alive, pid > 0, its own
    struct pid naming its pid)."""
    off = layout(k)
    result = TaskViews()
    listed = iter_thread_gvas(k)
    idr = iter_pid_idr(k)
    result.views["task-list"] = listed
    result.views["pid-table"] = Listing([t for _nr, t in idr if t], idr.complete, idr.problem)
    result.views["run-queue"] = runqueue_tasks(k)
    result.views["current"] = current_tasks(k)
    if root_gpas is not None:
        owners = address_space_owners(k, root_gpas)
        result.views["address-space"] = Listing([t for _r, t in owners], owners.complete, owners.problem)
        roots_of = {t: r for r, t in owners}
    else:
        roots_of = {}
    primary = [n for n in ("task-list", "pid-table") if not result.views[n].complete]
    if primary:
        return _fail(result, f"the {' and '.join(primary)} view is incomplete "
                             f"({'; '.join(result.views[n].problem for n in primary)})")
    in_list, in_idr = set(listed.items), set(result.views["pid-table"].items)
    init_task = k.symbols.get("init_task")
    candidates: dict[int, list[str]] = {}
    for name in ("run-queue", "current", "address-space"):
        view = result.views.get(name)
        if view is None or not view.complete:
            continue
        for task in view:
            if task != init_task and not (task in in_list and task in in_idr):
                candidates.setdefault(task, []).append(name)
    incomplete = [n for n in ("run-queue", "current", "address-space") if n in result.views
                  and not result.views[n].complete]
    if incomplete:
        result.hidden.problem = (f"views left out: {', '.join(incomplete)} "
                                 f"({'; '.join(result.views[n].problem for n in incomplete)})")
    for task, seen_by in sorted(candidates.items()):
        try:
            blob = k.read(task, off.size["task_struct"])
            pid = int.from_bytes(blob[off["task_struct.pid"]:][:4], "little", signed=True)
            exit_state = int.from_bytes(blob[off["task_struct.exit_state"]:][:4], "little")
            state = int.from_bytes(blob[k.off[k.state_member]:][:4], "little")
            comm = blob[off["task_struct.comm"]:][:16].split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
        except _BAD as exc:
            return _fail(result, f"task 0x{task:x} (seen by {', '.join(seen_by)}) is unreadable ({exc})")
        if pid <= 0 or exit_state or state & TASK_DEAD:
            continue  # an idle task (pid 0) or one being reaped: not hidden, just not listed
        if problem := struct_pid_problem(k, task, pid):
            return _fail(result, f"a task seen by {', '.join(seen_by)} is not self-consistent ({problem})")
        missing = tuple(n for n, members in (("task-list", in_list), ("pid-table", in_idr)) if task not in members)
        where = f"; its address space is rooted at gpa 0x{roots_of[task]:x}" if task in roots_of else ""
        result.hidden.items.append(HiddenTask(pid, comm, task, tuple(seen_by), missing,
                                              f"task 0x{task:x} (pid {pid}, {comm}) is seen by "
                                              f"{', '.join(seen_by)} but is missing from {' and '.join(missing)}"
                                              + where))
    return result


def _fail(result: TaskViews, problem: str) -> TaskViews:
    result.hidden = Listing(complete=False, problem=f"task cross-view unverifiable: {problem}")
    return result


# --- modules ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModuleText:
    """Where one module's code is (kernel gvas [start, end)), from its struct module."""

    name: str
    gva: int  # struct module
    start: int
    end: int
    core: tuple[int, int]  # the whole core image [base, base + size)


def module_texts(k: LinuxKernel, module_gva: int, name: str) -> list[ModuleText]:
    """Return the text ranges of the module at `module_gva` (core and init; mem[] text types on 6.4+)."""
    off = layout(k)
    out = []
    if "module.mem" in off and "module_memory.base" in off:
        stride = off.size["module_memory"]
        count = k.module_mem_types
        blob = k.read(module_gva + off["module.mem"], stride * count)
        mems = [(int.from_bytes(blob[i * stride + off["module_memory.base"]:][:8], "little"),
                 int.from_bytes(blob[i * stride + off["module_memory.size"]:][:4], "little")) for i in range(count)]
        # enum mod_mem_type: MOD_TEXT = 0, ..., MOD_INIT_TEXT = 4 (include/linux/module.h, 6.4+)
        core = (mems[0][0], mems[0][0] + mems[0][1])
        for index in (0, 4):
            if index < count and mems[index][0] and mems[index][1]:
                out.append(ModuleText(name, module_gva, mems[index][0], mems[index][0] + mems[index][1], core))
        return out
    for part in ("core_layout", "init_layout"):
        if f"module.{part}.base" not in off:
            continue
        base = k.u64(module_gva + off[f"module.{part}.base"])
        size = k.u32(module_gva + off[f"module.{part}.size"])
        text = k.u32(module_gva + off[f"module.{part}.text_size"]) if f"module.{part}.text_size" in off else size
        if base and size:
            out.append(ModuleText(name, module_gva, base, base + min(text, size), (base, base + size)))
    return out


def listed_module_texts(k: LinuxKernel) -> Listing[ModuleText]:
    """Return the text ranges of every module on the module list."""
    mods = modules(k)
    out: Listing[ModuleText] = Listing(complete=mods.complete, problem=mods.problem)
    for m in mods:
        try:
            out.items.extend(module_texts(k, m.gva, m.name))
        except _BAD as exc:
            out.fail(f"module {m.name}: layout unreadable ({exc})")
    return out


def sysfs_modules(k: LinuxKernel) -> Listing[tuple[int, str]]:
    """Return (struct module gva, kobject name) of every loadable module's kobject in module_kset."""
    off = layout(k)
    out: Listing[tuple[int, str]] = Listing()
    sym = k.symbols.find("module_kset")
    if sym is None:
        return out.fail("kallsyms lacks module_kset")
    try:
        kset = k.u64(sym)
    except _BAD as exc:
        return out.fail(f"module_kset unreadable ({exc})")
    entries = walk_list(k, kset + off["kset.list"], off["kobject.entry"], k.limits.max_modules * 4, "module_kset.list")
    out.complete, out.problem = entries.complete, entries.problem
    for kobj in entries:
        mkobj = kobj - off["module_kobject.kobj"]
        try:
            mod = k.u64(mkobj + off["module_kobject.mod"])
            name = k.cstr(k.u64(kobj + off["kobject.name"]), 64)
        except _BAD as exc:
            out.fail(f"kobject 0x{kobj:x} unreadable ({exc})")
            continue
        if mod:  # built-in modules' parameter kobjects have no struct module
            out.items.append((mod, name))
    return out


@dataclass(frozen=True, slots=True)
class ExecRegion:
    """A run of executable kernel pages in the module area ([start, end) gvas) and who owns it."""

    start: int
    end: int
    owner: str  # "module:NAME" (listed), a kernel allocator (bpf-prog-pack, ...), "" (nobody)
    found_module: str = ""  # the name in a struct module whose text starts here (a hidden module's own)
    found_module_gva: int = 0


def known_exec_allocations(k: LinuxKernel) -> Listing[tuple[int, int, str]]:
    """Return ([start, end), label) of module-area code the kernel allocated for itself: BPF program packs,
    kprobe instruction pages and ftrace trampolines, each from the allocator's own list."""
    off = layout(k)
    out: Listing[tuple[int, int, str]] = Listing()
    pack_list = k.symbols.find("pack_list")
    if pack_list is not None and "bpf_prog_pack.ptr" in off:
        packs = walk_list(k, pack_list, off["bpf_prog_pack.list"], 4096, "bpf pack_list")
        if not packs.complete:
            out.fail(packs.problem)
        for pack in packs:
            try:
                ptr = k.u64(pack + off["bpf_prog_pack.ptr"])
            except _BAD as exc:
                out.fail(f"bpf_prog_pack 0x{pack:x} unreadable ({exc})")
                continue
            out.items.append((ptr, ptr + BPF_PROG_PACK_SIZE, "bpf-prog-pack"))
    for cache in ("kprobe_insn_slots", "kprobe_optinsn_slots"):
        sym = k.symbols.find(cache)
        if sym is None or "kprobe_insn_cache.pages" not in off:
            continue
        pages = walk_list(k, sym + off["kprobe_insn_cache.pages"], off["kprobe_insn_page.list"], 4096, cache)
        if not pages.complete:
            out.fail(pages.problem)
        for page in pages:
            try:
                insns = k.u64(page + off["kprobe_insn_page.insns"])
            except _BAD as exc:
                out.fail(f"{cache} page 0x{page:x} unreadable ({exc})")
                continue
            out.items.append((insns, insns + 4096, "kprobe-insn-slots"))
    ops = ftrace_ops(k)
    if not ops.complete:
        out.fail(ops.problem)
    # static ops keep their trampoline after being unregistered (only FTRACE_OPS_FL_DYNAMIC ones free it)
    static = []
    for name in STATIC_FTRACE_OPS:
        sym = k.symbols.find(name)
        if sym is not None and "ftrace_ops.trampoline" in off:
            try:
                static.append((sym, 0, k.u64(sym + off["ftrace_ops.trampoline"]),
                               k.u64(sym + off["ftrace_ops.trampoline_size"])))
            except _BAD as exc:
                out.fail(f"{name} unreadable ({exc})")
    for _gva, _func, tramp, size in ops.items + static:
        if tramp and size:
            start = tramp & ~0xFFF
            out.items.append((start, (tramp + size + 0xFFF) & ~0xFFF, "ftrace-trampoline"))
    return out


def ftrace_ops(k: LinuxKernel) -> Listing[tuple[int, int, int, int]]:
    """Return (ops gva, func, trampoline, trampoline size) of every ftrace_ops on ftrace_ops_list."""
    off = layout(k)
    out: Listing[tuple[int, int, int, int]] = Listing()
    head, end = k.symbols.find("ftrace_ops_list"), k.symbols.find("ftrace_list_end")
    if head is None or end is None or "ftrace_ops.func" not in off:
        return out.fail("kallsyms lacks ftrace_ops_list or ftrace_list_end")
    try:
        ops = k.u64(head)
        while ops != end:
            if len(out.items) >= 4096 or not ops:
                return out.fail("ftrace_ops_list is cut short or longer than 4096 entries")
            k.budget.node()
            func, nxt = k.u64(ops + off["ftrace_ops.func"]), k.u64(ops + off["ftrace_ops.next"])
            tramp = k.u64(ops + off["ftrace_ops.trampoline"]) if "ftrace_ops.trampoline" in off else 0
            size = k.u64(ops + off["ftrace_ops.trampoline_size"]) if "ftrace_ops.trampoline_size" in off else 0
            out.items.append((ops, func, tramp, size))
            ops = nxt
    except _BAD as exc:
        return out.fail(f"ftrace_ops_list unreadable ({exc})")
    return out


def module_area_exec(k: LinuxKernel, texts: list[ModuleText]) -> Listing[ExecRegion]:
    """Return the executable runs of the module area in the kernel page tables, each with its listed owner;
    a run no listed module covers is searched for its own struct module (name, core_layout.base == start)."""
    from nephoscope.memory.paging import iter_runs

    out: Listing[ExecRegion] = Listing()
    known = known_exec_allocations(k)
    if not known.complete:
        out.fail(f"the kernel's own code allocations cannot be listed ({known.problem})")
    owners = [(t.core[0], t.core[1], f"module:{t.name}") for t in texts] + known.items
    end_sym = k.symbols.find("_end")
    lo = max(MODULE_AREA[0], ((end_sym or 0) + 0x1FFFFF) & ~0x1FFFFF)
    before = k.kernel.anomalies.get("work-cap", 0) if hasattr(k.kernel, "anomalies") else 0
    runs = list(iter_runs(k.kernel.iter_mappings(exec_only=True, start=lo, end=MODULE_AREA[1])))
    if hasattr(k.kernel, "anomalies") and k.kernel.anomalies.get("work-cap", 0) != before:
        out.fail("the module-area page-table walk hit its work cap")
    for start, end, _maps in runs:
        pos = start
        while pos < end:  # split a run at module boundaries
            owner = next((o for o in owners if o[0] <= pos < o[1]), None)
            if owner is not None:
                stop = min(end, owner[1])
                out.items.append(ExecRegion(pos, stop, owner[2]))
            else:
                nxt = min([o[0] for o in owners if pos < o[0] < end] + [end])
                stop = nxt
                name, gva = _find_module_struct(k, pos)
                out.items.append(ExecRegion(pos, stop, "", name, gva))
            pos = stop
    return out


def _find_module_struct(k: LinuxKernel, text_gva: int) -> tuple[str, int]:
    """Return (name, gva) of a struct module whose core text starts at `text_gva`, or ("", 0).

    Up to 6.3 the struct sits in the module's own core image, after its text; from 6.4 (module.mem[])
    it is in the separate MOD_DATA allocation, so the writable pages of the module area are searched."""
    off = layout(k)
    key = off.get("module.core_layout.base")
    if key is None:
        key = off.get("module.mem")  # mem[MOD_TEXT].base (6.4+)
        if key is None:
            return "", 0
        key += off["module_memory.base"]
        pages = [m.gva + i for m in k.kernel.iter_mappings(start=MODULE_AREA[0], end=MODULE_AREA[1])
                 if m.writable and m.nx for i in range(0, m.size, 4096)][:MAX_MODULE_STRUCT_SCAN // 256]
    else:
        pages = list(range(text_gva, text_gva + MAX_MODULE_STRUCT_SCAN, 4096))
    needle = text_gva.to_bytes(8, "little")
    name_off = off["module.name"]
    for pos in pages:
        try:
            page = k.read(pos, 4096)
        except _BAD:
            if off.get("module.core_layout.base") is not None:
                break  # the end of this module's image
            continue
        at = page.find(needle)
        while at >= 0:
            if at % 8 == key % 8:
                cand = pos + at - key
                try:
                    raw = k.read(cand + name_off, 56)
                    name = raw.split(b"\0", 1)[0]
                    if b"\0" in raw and len(name) > 0 and all(32 < c < 127 for c in name):
                        return name.decode(), cand
                except _BAD:
                    pass
            at = page.find(needle, at + 1)
    return "", 0


@dataclass(slots=True)
class ModuleViews:
    """The module list, sysfs and module-area code compared; `hidden` when the comparison is sound."""

    listed: Listing[ModuleText]
    sysfs: Listing[tuple[int, str]]
    exec_regions: Listing[ExecRegion]
    hidden: Listing[dict[str, object]] = field(default_factory=Listing)

    def summary(self) -> dict[str, dict[str, object]]:
        """Return each view's count and completeness (JSON-ready)."""
        return {name: {"count": len(v), "complete": v.complete, "problem": v.problem}
                for name, v in (("module-list", self.listed), ("sysfs", self.sysfs),
                                ("module-memory", self.exec_regions))}


def module_views(k: LinuxKernel) -> ModuleViews:
    """Compare the module list with sysfs kobjects and with executable module-area memory."""
    listed = listed_module_texts(k)
    sysfs = sysfs_modules(k)
    regions = module_area_exec(k, listed.items) if listed.complete else Listing(complete=False,
                                                                                 problem="module list incomplete")
    views = ModuleViews(listed, sysfs, regions)
    broken = [(n, v.problem) for n, v in (("module list", listed), ("sysfs", sysfs), ("module memory", regions))
              if not v.complete]
    if broken:
        views.hidden = Listing(complete=False, problem="module cross-view unverifiable: " +
                               "; ".join(f"the {n} view is incomplete ({p})" for n, p in broken))
        return views
    listed_gvas = {t.gva: t.name for t in listed}
    for mod, name in sysfs:
        if mod not in listed_gvas:
            views.hidden.items.append({"module": name, "module_gva": mod, "seen_by": ["sysfs"],
                                       "missing_from": ["module-list"],
                                       "evidence": f"/sys/module/{name} (kobject of struct module 0x{mod:x}) "
                                                   "names a module that is not on the module list"})
    sysfs_gvas = {mod for mod, _n in sysfs}
    for t in listed:
        if t.gva not in sysfs_gvas and t.start == t.core[0]:
            views.hidden.items.append({"module": t.name, "module_gva": t.gva, "seen_by": ["module-list"],
                                       "missing_from": ["sysfs"],
                                       "evidence": f"module {t.name} is on the module list but has no kobject "
                                                   "in module_kset (/sys/module)"})
    for r in regions:
        if r.owner:
            continue
        name = r.found_module or "?"
        missing = ["module-list"] + ([] if r.found_module_gva in sysfs_gvas else ["sysfs"])
        views.hidden.items.append({
            "module": name, "module_gva": r.found_module_gva, "seen_by": ["module-memory"], "missing_from": missing,
            "gva_start": r.start, "gva_end": r.end,
            "evidence": f"{(r.end - r.start) // 4096} executable page(s) at 0x{r.start:x}-0x{r.end:x} in the module "
                        "area belong to no listed module" + (f"; a struct module at 0x{r.found_module_gva:x} there "
                                                            f"names {r.found_module!r}" if r.found_module else "")})
    return views
