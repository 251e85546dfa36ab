"""The Linux kernel model: detection, symbols and every struct member the walkers use, resolved at load.

`LinuxKernel.open(phys)` detects the kernel (zero configuration), then resolves all member offsets
from the guest's own BTF in one go, so a kernel that lays a structure out differently fails here,
naming the kernel, the struct and the member, not halfway through a walk. Kernel drift (maple tree vs
the old VMA list, `__state` vs `state`, `core_layout` vs `mem[]`) is decided here, in one place.

Addresses: `gva` are kernel-virtual unless a name says `user`; reads go through `init_top_pgt`.
Nothing pauses the VM unless you use `paused()` (which needs a QMP connection).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nephoscope.core.errors import DetectionError, GuestDataError, MemoryAccessError
from nephoscope.memory.paging import AddressSpace
from nephoscope.os.btf.layout import member_offsets
from nephoscope.os.btf.reader import Btf
from nephoscope.os.linux.detect import Detection, DetectionReport, KernelInfo, detect
from nephoscope.os.linux.kallsyms import Kallsyms, Phys

if TYPE_CHECKING:
    from nephoscope.os.linux import walkers

# Every member a walker touches; "?" marks members only some kernel versions have.
WANTED: dict[str, list[str]] = {
    "task_struct": ["tasks", "pid", "tgid", "real_parent", "group_leader", "comm", "real_cred", "start_time",
                    "start_boottime?", "__state?", "state?", "exit_state", "flags", "mm", "files", "signal",
                    "thread_node", "pid_links"],
    "signal_struct": ["thread_head"],
    "cred": ["uid", "gid", "euid", "egid"],
    "mm_struct": ["pgd", "arg_start", "arg_end", "exe_file", "start_brk", "brk", "start_stack", "mm_mt?", "mmap?"],
    "vm_area_struct": ["vm_start", "vm_end", "vm_flags", "vm_pgoff", "vm_file", "vm_mm", "vm_ops?",
                       "vm_private_data?"],
    "file": ["f_path", "f_inode"],
    "path": ["mnt", "dentry"],
    "dentry": ["d_parent", "d_name", "d_hash.pprev", "d_sb", "d_inode"],
    "qstr": ["len", "name"],
    "mount": ["mnt", "mnt_parent", "mnt_mountpoint"],
    "vfsmount": ["mnt_root", "mnt_sb"],
    "super_block": ["s_type"],
    "file_system_type": ["name"],
    "inode": ["i_ino"],
    "files_struct": ["fdt"],
    "fdtable": ["max_fds", "fd"],
    "module": ["list", "name", "state", "core_layout.base?", "core_layout.size?", "init_layout.size?", "mem?"],
    "pid_namespace": ["idr"],
    "idr": ["idr_rt", "idr_base"],
    "xarray": ["xa_head"],
    "xa_node": ["shift", "slots"],
    "pid": ["tasks", "numbers", "level"],
    "upid": ["nr", "ns"],
    "list_head": ["next", "prev"],
}
OLD_VMA = {"mm_struct": ["mmap"], "vm_area_struct": ["vm_next"]}
NEW_VMA = {"mm_struct": ["mm_mt"], "maple_tree": ["ma_root"], "maple_range_64": ["pivot", "slot"],
           "maple_arange_64": ["pivot", "slot"]}
SYMBOLS = ("init_task", "init_pid_ns", "modules")


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps that keep walks of hostile or changing kernel structures bounded."""

    max_tasks: int = 1 << 16
    max_threads: int = 1 << 14  # per process
    max_vmas: int = 1 << 16
    max_fds: int = 1 << 16
    max_modules: int = 4096
    max_path_depth: int = 256
    max_cmdline: int = 1 << 17
    max_tree_nodes: int = 1 << 16
    max_module_symbols: int = 1 << 18  # per module


class Offsets:
    """Resolved member offsets (`off["task_struct.pid"]`) and struct sizes (`size["task_struct"]`)."""

    def __init__(self, btf: Btf, wanted: dict[str, list[str]], kernel: str) -> None:
        layout = member_offsets(btf, wanted, kernel=kernel)
        self._off = {f"{s}.{path}": m.offset for s, members in layout.items() for path, m in members.items()}
        self.size = {s: btf.get_struct(s).size for s in layout}

    def __getitem__(self, key: str) -> int:
        return self._off[key]

    def __contains__(self, key: object) -> bool:
        return key in self._off

    def get(self, key: str) -> int | None:
        """Return the offset of `struct.member`, or None when this kernel lacks it."""
        return self._off.get(key)


class LinuxKernel:
    """One guest Linux kernel, ready to walk: info, detection report, symbols, BTF and member offsets."""

    def __init__(self, phys: Phys, detection: Detection, qmp: Any = None, limits: Limits | None = None) -> None:
        """Build the model from a successful detection; raise GuestDataError naming any missing member."""
        detection.report.require("kallsyms", "phys/virt base", "page-table root", "btf")
        assert detection.info and detection.kallsyms and detection.kernel_space and detection.btf
        self.phys = phys
        self.detection = detection
        self.info: KernelInfo = detection.info
        self.report: DetectionReport = detection.report
        self.symbols: Kallsyms = detection.kallsyms
        self.btf: Btf = detection.btf
        self.kernel: AddressSpace = detection.kernel_space
        self.qmp = qmp
        self.limits = limits or Limits()
        kernel = self.info.release or "unknown kernel"
        self.maple = self.btf.find_struct("maple_tree") is not None
        wanted = {k: list(v) for k, v in WANTED.items()}
        for name, members in (NEW_VMA if self.maple else OLD_VMA).items():
            wanted.setdefault(name, []).extend(members)
        if self.btf.find_struct("mod_kallsyms") is not None:
            wanted["module"].append("kallsyms")
            wanted["mod_kallsyms"] = ["symtab", "num_symtab", "strtab", "typetab"]
        if self.btf.find_struct("module_memory") is not None:  # 6.4+: module.mem[MOD_MEM_NUM_TYPES]
            wanted["module_memory"] = ["base", "size"]
        self.off = Offsets(self.btf, wanted, kernel)
        self.module_mem_types = self._module_mem_types()
        self.state_member = "task_struct.__state" if "task_struct.__state" in self.off else "task_struct.state"
        if self.state_member not in self.off:
            raise GuestDataError(f"kernel {kernel}: BTF struct task_struct has neither __state nor state")
        if self.off.get("module.core_layout.base") is None and self.off.get("module.mem") is None:
            raise GuestDataError(f"kernel {kernel}: BTF struct module has neither core_layout nor mem[]")
        missing = [s for s in SYMBOLS if self.symbols.find(s) is None]
        if missing:
            raise DetectionError(f"kernel {kernel}: kallsyms lacks {', '.join(missing)} (stage kallsyms)")

    def _module_mem_types(self) -> int:
        """Return the length of module.mem[] (6.4+), or 0 on kernels with core_layout/init_layout."""
        member = self.btf.get_struct("module").find_member("mem") if "module.mem" in self.off else None
        stride = self.off.size.get("module_memory", 0)
        return self.btf.sizeof(member.type_id) // stride if member is not None and stride else 0

    @classmethod
    def open(cls, phys: Phys, qmp: Any = None, *, symbols: Kallsyms | None = None,
             limits: Limits | None = None) -> LinuxKernel:
        """Detect the kernel in guest-physical `phys` and load the model (does not pause the VM)."""
        return cls(phys, detect(phys, symbols=symbols), qmp=qmp, limits=limits)

    # --- memory ----------------------------------------------------------------------------------

    def read(self, gva: int, size: int) -> bytes:
        """Return `size` bytes at kernel gva (through init_top_pgt); TranslationError if unmapped."""
        return self.kernel.read(gva, size)

    def u64(self, gva: int) -> int:
        """Return the u64 at kernel gva."""
        return int.from_bytes(self.kernel.read(gva, 8), "little")

    def u32(self, gva: int) -> int:
        """Return the u32 at kernel gva."""
        return int.from_bytes(self.kernel.read(gva, 4), "little")

    def cstr(self, gva: int, limit: int = 256) -> str:
        """Return the NUL-terminated string at kernel gva (at most `limit` bytes, not crossing unmapped pages)."""
        out = b""
        while len(out) < limit:
            n = min(limit - len(out), 4096 - (gva + len(out)) % 4096)
            chunk = self.kernel.read(gva + len(out), n)
            nul = chunk.find(b"\0")
            if nul >= 0:
                return (out + chunk[:nul]).decode("utf-8", "backslashreplace")
            out += chunk
        return out.decode("utf-8", "backslashreplace")

    def struct(self, name: str, gva: int) -> bytes:
        """Return the whole struct `name` at kernel gva as bytes (one read, then unpack locally)."""
        return self.kernel.read(gva, self.off.size[name])

    def field(self, blob: bytes, key: str, fmt: str = "Q") -> int:
        """Return `struct.member` from a struct blob read with `struct()`."""
        return int(struct.unpack_from("<" + fmt, blob, self.off[key])[0])

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
        """Return pids seen in only one of the task list and the PID idr (init_pid_ns)."""
        from nephoscope.os.linux import walkers
        return walkers.hidden_processes(self)

    def __repr__(self) -> str:
        return f"LinuxKernel({self.info.release!r}, kaslr={self.info.kaslr}, {len(self.symbols)} symbols)"


def safe(fn: Any, *args: Any) -> Any:
    """Return fn(*args), or None if guest data made it fail (a read outside RAM or a bad value)."""
    try:
        return fn(*args)
    except (MemoryAccessError, GuestDataError, struct.error, UnicodeDecodeError, ValueError):
        return None
