"""The `trap` method: breakpoints on kernel functions (QEMU gdbstub), decoded from guest RAM at each hit.

Symbols come from the kallsyms tables recovered from RAM and struct offsets from the kernel's own BTF
(never from the guest agent): the one kernel model, `os.linux.model.LinuxKernel`, with the event decoding
of `os.linux.events`. At a hit the VM is stopped; the event is read from guest RAM (RAM file or QEMU
process) through the kernel page tables, and the VM resumes (rip moved past a no-op, or remove →
single-step → re-insert → continue). Every event is delivered as soon as the VM runs again; an exec's
code identity follows later as a second record (kind `identity`) that names the exec by `exec_seq` and
`exec_time` + pid.
A guest that traps faster than `budget` events per second loses its breakpoints for `cooldown` seconds;
the gap is reported as unverifiable, with the number of forks the kernel counted meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from nephoscope.core import payloads
from nephoscope.core.errors import ConnectorError, NephoscopeError
from nephoscope.core.records import Observation, Verdict
from nephoscope.hypervisor.gdbstub import GdbStub, Guard, remove_stub, start_stub
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.base import observe, unverifiable
from nephoscope.introspect.exectrack import ExecTracker
from nephoscope.introspect.identify import Identifier, open_kb
from nephoscope.introspect.ram import open_ram
from nephoscope.os.linux import events as kevents
from nephoscope.os.linux.model import LinuxKernel

NAME = "trap"
HOOKS = kevents.HOOKS  # event → kernel function whose entry is trapped
EVENTS = tuple(HOOKS)
# instructions that do nothing but advance rip: ftrace's patched-out call, endbr64 (no CET in TCG), nops
NOPS = (b"\x0f\x1f\x44\x00\x00", b"\xf3\x0f\x1e\xfa", b"\x66\x90", b"\x90")
Errors = (*kevents.BAD, KeyError)


@dataclass(slots=True)
class TrapEvent:
    """One trapped kernel event: who (current task) and what (path, exit code, module), or an exec's identity."""

    kind: str  # exec, exit, module — or identity, the code identity of an earlier exec
    time: float
    pid: int | None = None  # tgid, what users call the pid
    tid: int | None = None
    ppid: int | None = None
    comm: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    paused_s: float = 0.0  # how long the guest stood still for this event
    error: str = ""
    seq: int = 0  # number of this record within its watch (1, 2, …; 0: not delivered yet)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)

    def identity_record(self, identity: dict[str, Any]) -> TrapEvent:
        """Return the `identity` record of this exec event: it names the exec by seq, time and pid."""
        return TrapEvent("identity", time.time(), self.pid, self.tid, self.ppid, self.comm,
                         {"exec_seq": self.seq, "exec_time": self.time, "path": self.detail.get("path", ""),
                          "identity": identity})


@dataclass(slots=True)
class WatchStats:
    """What a watch cost and what it could not see."""

    events: int = 0  # trapped events (identity records not counted)
    by_kind: dict[str, int] = field(default_factory=dict)
    identities: int = 0  # identity records delivered
    decode_errors: int = 0
    skipped_nops: int = 0  # resumed by moving rip past a no-op instead of remove/step/re-insert
    attach_s: float = 0.0  # VM paused while breakpoints went in
    detach_s: float = 0.0
    paused_s: float = 0.0  # total guest stand-still over all events
    max_paused_s: float = 0.0
    watched_s: float = 0.0
    gaps: list[dict[str, Any]] = field(default_factory=list)  # budget cool-downs: start, end, forks missed
    gdbstub: str = ""  # "the VM's" or "on demand at HOST:PORT, removed afterwards"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (with mean per-event pause)."""
        d = asdict(self)
        d["mean_paused_ms"] = 1000 * self.paused_s / self.events if self.events else 0.0
        return d


def _exec_detail(ex: kevents.Exec) -> dict[str, Any]:
    d: dict[str, Any] = {"path": ex.path, "interp": ex.interp}
    if ex.file is not None:
        d["file"] = ex.file
    if ex.argv is not None:
        d["argv"] = list(ex.argv)
    d.update({f"{what}_error": why for what, why in ex.problems})
    return d


def _module_detail(mod: kevents.ModuleLoad) -> dict[str, Any]:
    return {"name": mod.name, "struct_gva": mod.gva, "core_base": mod.core_base, "core_size": mod.core_size,
            "init_size": mod.init_size}


class HookDecoder:
    """Turn a stop at a hook into a TrapEvent, with the kernel model and its event decoding (VM stopped)."""

    def __init__(self, kernel: LinuxKernel, events: Iterable[str]) -> None:
        """Resolve hooks and event members; raise DetectionError/GuestDataError naming what this kernel lacks."""
        self.kernel = kernel
        self.events = kevents.EventDecoder(kernel, events)
        self.hooks = self.events.hooks

    def nop_length(self, gva: int) -> int:
        """Return the length of the no-op instruction at kernel `gva`, or 0 if it is anything else."""
        try:
            code = self.kernel.read(gva, 5)
        except Errors:
            return 0
        return next((len(n) for n in NOPS if code.startswith(n)), 0)

    def forks(self) -> int | None:
        """Return the kernel's fork counter (None if unknown)."""
        return self.events.forks()

    def decode(self, kind: str, regs: dict[str, int]) -> TrapEvent:
        """Return the event at a hit of `kind`'s hook, from registers and guest RAM (VM stopped)."""
        ev = TrapEvent(kind, time.time())
        self.kernel.kernel.flush()  # the guest ran since the last event: page tables may have changed
        self.kernel.budget.reset()  # each event is its own bounded piece of work, however long the watch
        try:
            cur = self.events.task(regs["gs_base"])
            ev.pid, ev.tid, ev.ppid, ev.comm = cur.pid, cur.tid, cur.ppid, cur.comm
            arg = regs["rdi"]
            if kind == "exec":
                ev.detail = _exec_detail(self.events.exec(arg))
            elif kind == "exit":
                ev.detail = asdict(kevents.decode_exit(arg))
            elif kind == "module":
                ev.detail = _module_detail(self.events.module(arg))
        except Errors as exc:
            ev.error = f"{type(exc).__name__}: {exc}"
        return ev

    def task_mm(self, task: int, pid: int | None = None) -> int | None:
        """Return task->mm (None if unreadable, or if `pid` is given and the task is no longer that tgid)."""
        return kevents.task_mm(self.kernel, task, pid)


class Budget:
    """Allow at most `per_second` events in any one-second window."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self._window, self._count = 0.0, 0

    def spend(self, now: float) -> bool:
        """Count one event at `now`; return False once this second's budget is exceeded."""
        if now - self._window >= 1.0:
            self._window, self._count = now, 0
        self._count += 1
        return self._count <= self.per_second


class Watcher:
    """Trap kernel events of one VM for a while; always detach (guest running, no breakpoints left)."""

    tracker: ExecTracker | None = None  # identifies exec'd processes; their identity records follow later
    _seq = 0  # records delivered so far
    on_demand = False  # the VM has no gdbstub of its own: run() starts one through the monitor and removes it

    def __init__(self, vm: VmTarget, events: Iterable[str] = EVENTS, *, budget: int = 200, cooldown: float = 1.0,
                 guard: bool = True, skip_nops: bool = True, host: str = "127.0.0.1", identify: bool = True,
                 kb: Path | None = None) -> None:
        bad = sorted(set(events) - set(HOOKS))
        if bad:
            raise NephoscopeError(f"unknown trap event(s) {', '.join(bad)}; choose from {', '.join(EVENTS)}")
        if not vm.live or (vm.gdb_port is None and vm.qmp_socket is None and vm.domain is None):
            raise ConnectorError(f"trap needs a live VM with a gdbstub or a monitor to start one; {vm.name} has "
                                 f"gdb_port={vm.gdb_port}, monitor={vm.qmp_socket or vm.domain}")
        self.vm, self.events, self.host = vm, list(dict.fromkeys(events)), host
        self.budget, self.cooldown, self.use_guard = Budget(budget), cooldown, guard
        self.skip_nops = skip_nops
        self.on_demand = vm.gdb_port is None  # no gdbstub of its own: start one through the monitor in run()
        self.stats = WatchStats()
        self.phys = open_ram(vm, cache=False)  # read at stops, after the guest ran: never serve stale bytes
        try:
            self.kernel = LinuxKernel.open(self.phys)  # before attaching: detection must not stretch the pause
            self.decoder = HookDecoder(self.kernel, self.events)
            self.hooks = self.decoder.hooks
            self.tracker = self._tracker(kb) if identify and "exec" in self.events else None
        except BaseException:
            self.phys.close()
            raise

    def _tracker(self, kb: Path | None) -> ExecTracker:
        """Open the code-page DB now (not during a pause) and follow exec'd processes until identified."""
        db, why = open_kb(kb)
        ident = Identifier(self.phys, self.kernel.kernel.levels, db, why)
        return ExecTracker(ident, partial(kevents.pgd_gpa, self.kernel), eager="exit" not in self.events)

    def _track(self, ev: TrapEvent, regs: dict[str, int]) -> None:
        """Feed the exec tracker at a hit (VM stopped: the current mm is intact)."""
        if self.tracker is None:
            return
        self.tracker.on_stop(self.decoder.task_mm)
        if ev.kind not in ("exec", "exit"):
            return
        try:
            task = None if ev.error else self.decoder.events.current(regs["gs_base"])
        except Errors:
            task = None
        mm = self.decoder.task_mm(task) if task is not None else None
        if ev.kind == "exec":
            self.tracker.on_exec(ev, task, mm, self.decoder.events.exec_mm(regs["rdi"]))
        else:
            self.tracker.on_exit(ev, mm)

    def _deliver(self, ev: TrapEvent | None, on_event: Callable[[TrapEvent], None]) -> None:
        """Hand over `ev` at once, then the identity records of execs identified meanwhile."""
        self._emit(self.tracker.take(ev) if self.tracker is not None else [ev] if ev is not None else [], on_event)

    def _emit(self, records: Iterable[Any], on_event: Callable[[TrapEvent], None]) -> None:
        for e in records:
            if not e.seq:  # trapped events are numbered at their hit, identity records when delivered
                self._seq += 1
                e.seq = self._seq
            if e.kind == "identity":
                self.stats.identities += 1
            on_event(e)

    def run(self, on_event: Callable[[TrapEvent], None], duration: float | None = None,
            should_stop: Callable[[], bool] = lambda: False,
            on_ready: Callable[[], None] = lambda: None) -> WatchStats:
        """Watch until `duration` elapses or `should_stop()`; call `on_event` per event (pauses the VM briefly).

        `on_ready` is called once the breakpoints are in and the VM runs again. A VM without a gdbstub gets one
        on demand (HMP `gdbserver` on a loopback port), removed afterwards, also when this process dies."""
        port = start_stub(self.vm, self.host) if self.on_demand else self.vm.gdb_port
        assert port is not None
        self.stats.gdbstub = (f"on demand at {self.host}:{port}, removed afterwards" if self.on_demand
                              else f"the VM's own at {self.host}:{port}")
        try:
            guard = Guard(self.host, port, self.vm if self.on_demand else None) if self.use_guard else None
        except BaseException:
            if self.on_demand:
                remove_stub(self.vm)
            raise
        start = time.monotonic()
        t0 = time.perf_counter()
        try:
            stub = GdbStub(self.host, port)
        except BaseException:
            removed = remove_stub(self.vm) if self.on_demand else True
            if guard is not None:
                guard.release(True, removed)  # nothing was inserted: nothing to repair
            raise
        try:
            self._insert(stub)
            stub.cont()
            self.stats.attach_s = time.perf_counter() - t0
            on_ready()
            self._loop(stub, on_event, start, duration, should_stop)
        finally:
            t1 = time.perf_counter()
            detached, ev = False, None
            try:
                ev = self._event_at(stub, stub.interrupt().signal)[1] if stub.running else None
                stub.detach()
                detached = True
            except ConnectorError:
                pass  # the guard reconnects and detaches
            finally:
                stub.close()
                # an on-demand stub goes once detached; if detaching failed the guard repairs, then removes it
                removed = remove_stub(self.vm) if self.on_demand and (detached or guard is None) else \
                    not self.on_demand
                self.stats.detach_s = time.perf_counter() - t1
                self.stats.watched_s = time.monotonic() - start
                if guard is not None:
                    guard.release(detached, removed)
            self._deliver(ev, on_event)
            if self.tracker is not None:  # still-running processes: their page tables, read from RAM
                self._emit(self.tracker.finish(self.decoder.task_mm), on_event)
        return self.stats

    def _insert(self, stub: GdbStub) -> None:
        for gva in self.hooks:
            stub.insert_breakpoint(gva)

    def _loop(self, stub: GdbStub, on_event: Callable[[TrapEvent], None], start: float,
              duration: float | None, should_stop: Callable[[], bool]) -> None:
        gap: dict[str, Any] | None = None
        while not should_stop() and (duration is None or time.monotonic() - start < duration):
            if gap is not None and time.monotonic() >= gap["until"]:
                stub.interrupt()  # a stop reply that is a breakpoint cannot happen: none are inserted
                self._insert(stub)
                stub.cont()
                self._close_gap(gap)
                gap = None
            stop = stub.wait_stop(0.2)
            if stop is None:
                continue
            if stop.exited:
                raise ConnectorError(f"{self.vm.name} exited while being watched ({stop.raw})")
            t0 = time.perf_counter()
            rip, ev = self._event_at(stub, stop.signal)
            if rip in self.hooks and not self.budget.spend(time.monotonic()):
                for gva in self.hooks:
                    stub.remove_breakpoint(gva)
                gap = {"start": time.time(), "until": time.monotonic() + self.cooldown,
                       "forks_start": self.decoder.forks()}
            elif rip in self.hooks:
                self._resume_past(stub, rip)
            stub.cont()
            paused = time.perf_counter() - t0
            self.stats.paused_s += paused
            self.stats.max_paused_s = max(self.stats.max_paused_s, paused)
            if ev is not None:
                ev.paused_s = paused
            self._deliver(ev, on_event)  # after resuming: printing and storing must not stretch the pause
        if gap is not None:
            self._close_gap(gap)

    def _resume_past(self, stub: GdbStub, rip: int) -> None:
        """Get the stopped vCPU past the breakpoint at `rip` without losing the breakpoint (VM stopped)."""
        nop = self.decoder.nop_length(rip) if self.skip_nops else 0
        if nop:  # a no-op (ftrace's 5-byte nop, endbr64) is emulated by moving rip: one packet, no step
            stub.write_register("rip", rip + nop)
            self.stats.skipped_nops += 1
            return
        stub.remove_breakpoint(rip)  # QEMU would re-hit it: remove, single-step, re-insert
        stub.step()
        stub.insert_breakpoint(rip)

    def _event_at(self, stub: GdbStub, signal: int) -> tuple[int, TrapEvent | None]:
        """Return (rip, decoded event or None) of the stopped vCPU (VM stopped)."""
        regs = stub.registers()
        kind = self.hooks.get(regs["rip"]) if signal == 5 else None
        if kind is None:
            return regs["rip"], None
        ev = self.decoder.decode(kind, regs)
        self._seq += 1
        ev.seq = self._seq
        self._track(ev, regs)
        self.stats.events += 1
        self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
        self.stats.decode_errors += bool(ev.error)
        return regs["rip"], ev

    def _close_gap(self, gap: dict[str, Any]) -> None:
        end_forks = self.decoder.forks()
        forks = None if gap["forks_start"] is None or end_forks is None else end_forks - gap["forks_start"]
        self.stats.gaps.append({"start": gap["start"], "end": time.time(), "forks_missed": forks,
                                "reason": f"over {self.budget.per_second} events/s: breakpoints removed for "
                                          f"{self.cooldown:.1f}s"})

    def close(self) -> None:
        """Release the RAM mapping."""
        self.phys.close()


# --- the method ------------------------------------------------------------------------------------

def event_observation(vm: VmTarget, ev: TrapEvent, identity: dict[str, Any] | None = None) -> Observation:
    """Turn a trapped event into an observation (verified: seen by the vCPU, read from kernel memory).

    `identity` is an exec's code identity (from its identity record), kept in the exec's data."""
    kind = {"exec": "exec", "exit": "exit", "module": "module-load"}[ev.kind]
    # the detail dict is this module's own decoding (its JSON shape); the payload checks every field's type
    data = payloads.from_json(kind, {**ev.detail, "pid": ev.pid, "tid": ev.tid, "ppid": ev.ppid, "comm": ev.comm,
                                     "time": ev.time, **({"identity": identity} if identity is not None else {})})
    if ev.error:
        return observe(NAME, vm, kind, f"{kind}:{ev.time:.6f}", data, Verdict.UNVERIFIABLE,
                       f"trapped, but the event could not be read: {ev.error}")
    return observe(NAME, vm, kind, f"{kind}:{ev.pid}:{ev.time:.6f}", data, Verdict.VERIFIED)


class TrapMethod:
    """Watch exec, exit and module loads for a bounded window; yield what happened meanwhile."""

    name = NAME

    def __init__(self, window: float = 3.0, events: Iterable[str] = ("exec", "module"), budget: int = 200,
                 identify: bool = True) -> None:
        """With `identify`, `exit` is trapped too (not reported unless asked): a process is identified at its exit."""
        self.window, self.events, self.budget, self.identify = window, tuple(events), budget, identify
        self.last_stats: dict[str, Any] = {}

    def collect(self, vm: VmTarget) -> Iterator[Observation]:
        """Yield events trapped during `window` seconds, then the watch's overhead (pauses the VM per event)."""
        events: list[TrapEvent] = []
        try:
            extra = ("exit",) if self.identify and "exec" in self.events else ()
            watcher = Watcher(vm, (*self.events, *extra), budget=self.budget, identify=self.identify)
        except NephoscopeError as exc:
            yield unverifiable(NAME, vm, "events", str(exc))
            return
        try:
            stats = watcher.run(events.append, duration=self.window)
        except NephoscopeError as exc:
            yield unverifiable(NAME, vm, "events", f"watch failed after {len(events)} events: {exc}")
            stats = watcher.stats
        finally:
            watcher.close()
        self.last_stats = stats.to_dict()
        identities = {e.detail.get("exec_seq"): e.detail.get("identity") for e in events if e.kind == "identity"}
        for ev in events:
            if ev.kind in self.events:
                yield event_observation(vm, ev, identities.get(ev.seq) if ev.kind == "exec" else None)
        for gap in stats.gaps:
            yield unverifiable(NAME, vm, f"events {gap['start']:.3f}-{gap['end']:.3f}",
                               f"{gap['reason']}; {gap['forks_missed']} forks happened unseen")
        yield observe(NAME, vm, "trap-stats", "trap", payloads.Details(self.last_stats), Verdict.VERIFIED)
