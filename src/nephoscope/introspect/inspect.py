"""The `inspect` method: read guest RAM from the host and walk the kernel's own structures.

Zero configuration: the kernel is recognised and its symbols (kallsyms) and type layouts (BTF) are
recovered from the guest's RAM. A process seen both on the task list and in the PID idr is `verified`
(two independent kernel views agree). A pid seen in only one view becomes a `cross-view` observation,
and so a hidden-process finding, only when both views were complete and passed their checks; otherwise
the comparison is `unverifiable`, naming the view that failed, and makes no claim.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from nephoscope.core import payloads
from nephoscope.core.errors import ConnectorError, DetectionError, GuestDataError, MemoryAccessError
from nephoscope.core.records import Observation, Verdict
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.base import observe, unverifiable
from nephoscope.introspect.kernel import open_kernel, task_cr3
from nephoscope.os.linux.model import LinuxKernel
from nephoscope.os.linux.walkers import CrossView, Listing, Task, read_task

NAME = "inspect"
LIVE_REREADS = 2  # a torn task-list walk of a running VM is read again this often before it is reported incomplete
PID_TABLE_ONLY = "seen in the PID table only: the task list walk stopped before it"


class InspectMethod:
    """Walk tasks, mappings and modules of a live VM (no pause) or a dump."""

    name = NAME

    def __init__(self, mappings: bool = True, symbols: str | Path | None = None, cache: bool = False) -> None:
        self.mappings = mappings
        self.symbols = symbols  # a --symbols file for kernels whose BTF/kallsyms are not in RAM
        self.cache = cache  # reuse a validated kernel model of the same build
        self.last_stats: dict[str, float] = {}
        self.kernel_integrity = True  # task/module cross-views and kernel pointer checks (kernel_integrity.py)
        self.interpreters = True  # what interpreter processes run: stacks and script files (introspect/interp)

    @staticmethod
    def _idtr_base(vm: VmTarget) -> int | None:
        """Return vCPU 0's IDTR base from HMP `info registers` of a live VM (None for dumps or no monitor)."""
        if not vm.live or (vm.qmp_socket is None and vm.domain is None):
            return None
        import re

        from nephoscope.hypervisor.monitor import open_monitor

        try:
            monitor = open_monitor(vm)
            try:
                text = monitor.hmp("info registers")
            finally:
                monitor.close()
        except ConnectorError:
            return None
        m = re.search(r"^IDT=\s*([0-9a-fA-F]+)", text, re.M)
        return int(m.group(1), 16) if m else None

    def collect(self, vm: VmTarget) -> Iterator[Observation]:
        """Yield the kernel, every process (with cr3), its executable mappings, modules and cross-view gaps."""
        try:
            with open_kernel(vm, symbols=self.symbols, cache=self.cache) as kernel:
                yield from self._collect(kernel, vm)
        except (DetectionError, GuestDataError, ConnectorError, MemoryAccessError) as exc:
            yield unverifiable(NAME, vm, "kernel", f"the guest kernel could not be read: {exc}")

    def _collect(self, k: LinuxKernel, vm: VmTarget) -> Iterator[Observation]:
        yield observe(NAME, vm, "kernel", "kernel",
                      payloads.Details({**k.info.to_dict(), "detection": k.report.to_dict()}), Verdict.VERIFIED)
        procs = k.processes()
        for _ in range(LIVE_REREADS):  # a running guest can change its task list under the walk (fork, exit)
            if procs.complete or not vm.live or k.budget.exhausted:
                break
            procs = k.processes()
        cross = k.cross_view()
        hidden = cross.hidden
        one_view = {h.pid: h for h in hidden.items}
        if not procs.complete:
            yield unverifiable(NAME, vm, "processes", f"the task list walk stopped early: {procs.problem}")
        if not cross.threads.complete:
            yield unverifiable(NAME, vm, "threads", f"the thread list walk stopped early: {cross.threads.problem}")
        if not cross.pid_idr.complete:
            yield unverifiable(NAME, vm, "pid-idr", f"the PID idr walk stopped early or failed its checks: "
                                                    f"{cross.pid_idr.problem}")
        if not hidden.complete:
            yield unverifiable(NAME, vm, "cross-view", f"hidden processes cannot be checked: {hidden.problem}")
        for h in hidden.items:  # only when both views are complete and validated
            yield observe(NAME, vm, "cross-view", f"pid:{h.pid}",
                          payloads.CrossView(h.pid, h.comm, in_task_list=h.in_task_list, in_pid_idr=h.in_pid_idr,
                                             views_complete=True), Verdict.VERIFIED)
        for t in procs.items + self._idr_only(k, procs, cross):
            data = payloads.Process(
                pid=t.pid, tgid=t.tgid, ppid=t.ppid, comm=t.comm, exe=t.exe or "", cmdline=tuple(t.cmdline or ()),
                uid=t.uid, gid=t.gid, euid=t.euid, state=t.state, start_boottime_ns=t.start_boottime_ns,
                kernel_thread=t.kernel_thread, cr3=task_cr3(k, t.mm_gva), notes=tuple(t.notes))
            cross_checked = t.pid not in one_view and hidden.complete
            reason = "" if cross_checked else ("seen on the task list only" if hidden.complete
                                               else "not cross-checked: " + hidden.problem)
            if t.notes and t.notes[-1] == PID_TABLE_ONLY:
                reason = PID_TABLE_ONLY
            yield observe(NAME, vm, "process", f"pid:{t.pid}", data,
                          Verdict.VERIFIED if cross_checked else Verdict.REPORTED, reason)
            if self.mappings and not t.kernel_thread:
                vmas = k.vmas(t)
                for v in vmas.items:
                    if "x" in v.perms:
                        yield observe(NAME, vm, "mapping", f"pid:{t.pid}:{v.start:x}",
                                      payloads.Mapping(t.pid, v.start, v.end, v.perms, v.offset, v.path),
                                      Verdict.REPORTED)
                if not vmas.complete:
                    yield unverifiable(NAME, vm, f"maps:{t.pid}", f"mapping walk stopped: {vmas.problem}")
        mods = k.modules()
        for m in mods.items:
            yield observe(NAME, vm, "module", f"module:{m.name}", payloads.Module(m.name, m.base, m.size),
                          Verdict.REPORTED)
        if not mods.complete:
            yield unverifiable(NAME, vm, "modules", f"module list walk stopped: {mods.problem}")
        yield from self._sockets(k, vm, procs)
        if self.interpreters:
            yield from self._interpreters(k, vm)
        if self.kernel_integrity:
            from nephoscope.introspect import kernel_integrity

            yield from kernel_integrity.collect(k, vm, idtr_base=self._idtr_base(vm))
        if k.budget.exhausted:
            yield unverifiable(NAME, vm, "budget", f"the read budget ran out ({k.budget.exhausted}); "
                                                   "later walks are incomplete")
        self.last_stats = {"reads": float(k.budget.reads), "read_bytes": float(k.budget.bytes)}

    @staticmethod
    def _interpreters(k: LinuxKernel, vm: VmTarget) -> Iterator[Observation]:
        """Yield one `interpreter` observation per interpreter process (introspect/interp/files.py)."""
        from nephoscope.introspect.interp import GUEST_ERRORS
        from nephoscope.introspect.interp.files import collect_scripts, observations
        from nephoscope.knowledge.scripts import open_default

        try:
            db = open_default()
        except GUEST_ERRORS:
            db = None
        try:
            yield from observations(NAME, vm, collect_scripts(k, db))
        except GUEST_ERRORS as exc:
            yield unverifiable(NAME, vm, "interpreters", f"interpreter processes could not be read: {exc}")
        finally:
            if db is not None:
                db.close()

    @staticmethod
    def _sockets(k: LinuxKernel, vm: VmTarget, procs: Listing[Task]) -> Iterator[Observation]:
        """Yield every socket of both kernel views (file tables, hash tables) with its owners (os/linux/net.py)."""
        from nephoscope.os.linux.net import confirmed_view

        try:
            view = confirmed_view(k, procs)
        except (GuestDataError, MemoryAccessError) as exc:
            yield unverifiable(NAME, vm, "sockets", f"the socket walk failed: {exc}")
            return
        for name, listing in (("sockets", view.files), ("socket-tables", view.tables)):
            if not listing.complete:
                yield unverifiable(NAME, vm, name, f"socket walk incomplete: {listing.problem}")
        hidden = {e.socket.sock_gva for e in view.hidden.items}
        for e in view.endpoints():
            s = e.socket
            data = payloads.Socket(s.proto, s.family, s.type, s.state, s.local, s.local_port, s.remote,
                                   s.remote_port, s.rx_queue, s.tx_queue, s.inode, tuple(e.views),
                                   tuple(o.pid for o in e.owners), s.sock_gva in hidden)
            both = "files" in e.views and len(e.views) > 1
            yield observe(NAME, vm, "socket", f"sock:{s.sock_gva:x}", data,
                          Verdict.VERIFIED if both or s.sock_gva in hidden else Verdict.REPORTED)

    @staticmethod
    def _idr_only(k: LinuxKernel, procs: Listing[Task], cross: CrossView) -> list[Task]:
        """Return the processes only the PID table saw when the task-list walk stopped early (what the
        complete view saw; `reported`, never a hidden-process claim)."""
        if procs.complete or not cross.pid_idr.complete:
            return []
        listed = {t.pid for t in procs.items}
        found = []
        for nr, gva in cross.pid_idr.items:
            if nr in listed or not gva:
                continue
            try:
                task = read_task(k, gva)
            except (GuestDataError, MemoryAccessError):
                continue
            if task.is_process:
                found.append(replace(task, notes=(*task.notes, PID_TABLE_ONLY)))
        return found
