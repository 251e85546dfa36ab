"""The `trap` method: breakpoints on kernel functions (QEMU gdbstub), decoded from guest RAM at each hit.

Symbols come from the kallsyms tables recovered from RAM and struct offsets from the kernel's own BTF
(never from the guest agent). At a hit the VM is stopped; the event is read from the shared RAM file
through the kernel page tables, and the VM resumes (remove → single-step → re-insert → continue).
A guest that traps faster than `budget` events per second loses its breakpoints for `cooldown` seconds;
the gap is reported as unverifiable, with the number of forks the kernel counted meanwhile.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nephoscope.core.errors import ConnectorError, DetectionError, GuestDataError, MemoryAccessError, NephoscopeError
from nephoscope.core.records import Observation, Verdict
from nephoscope.hypervisor.gdbstub import GdbStub, Guard
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.base import observe, unverifiable
from nephoscope.introspect.identify import ExecTracker, Identifier, open_kb
from nephoscope.memory.paging import AddressSpace
from nephoscope.memory.physical import PhysicalMemory, open_memory
from nephoscope.os.btf.layout import member_offsets
from nephoscope.os.linux.detect import detect

NAME = "trap"
# event → kernel function whose entry is trapped; its first argument (rdi) is what we decode
HOOKS = {"exec": "begin_new_exec", "exit": "do_exit", "module": "do_init_module"}
EVENTS = tuple(HOOKS)
MEMBERS = {
    "task_struct": ["pid", "tgid", "real_parent", "comm", "mm"],
    "linux_binprm": ["filename", "interp", "file", "mm", "p", "argc"],
    "file": ["f_path.dentry"], "dentry": ["d_name.name", "d_parent"], "mm_struct": ["pgd"],
    "module": ["name", "core_layout.size?", "core_layout.base?"],
}
# instructions that do nothing but advance rip: ftrace's patched-out call, endbr64 (no CET in TCG), nops
NOPS = (b"\x0f\x1f\x44\x00\x00", b"\xf3\x0f\x1e\xfa", b"\x66\x90", b"\x90")
MAX_PATH, MAX_ARGS, MAX_ARGV_BYTES, MAX_DEPTH = 4096, 64, 4096, 64
Errors = (MemoryAccessError, GuestDataError)


@dataclass(slots=True)
class TrapEvent:
    """One trapped kernel event: who (current task) and what (path, exit code, module)."""

    kind: str
    time: float
    pid: int | None = None  # tgid, what users call the pid
    tid: int | None = None
    ppid: int | None = None
    comm: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    paused_s: float = 0.0  # how long the guest stood still for this event
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


@dataclass(slots=True)
class WatchStats:
    """What a watch cost and what it could not see."""

    events: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    decode_errors: int = 0
    skipped_nops: int = 0  # resumed by moving rip past a no-op instead of remove/step/re-insert
    attach_s: float = 0.0  # VM paused while breakpoints went in
    detach_s: float = 0.0
    paused_s: float = 0.0  # total guest stand-still over all events
    max_paused_s: float = 0.0
    watched_s: float = 0.0
    gaps: list[dict[str, Any]] = field(default_factory=list)  # budget cool-downs: start, end, forks missed

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (with mean per-event pause)."""
        d = asdict(self)
        d["mean_paused_ms"] = 1000 * self.paused_s / self.events if self.events else 0.0
        return d


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


class KernelReader:
    """Decode trapped events from guest RAM with kallsyms and BTF recovered from that RAM (no pause)."""

    def __init__(self, phys: PhysicalMemory) -> None:
        """Detect the kernel in `phys`; raise DetectionError naming the stage or member that failed."""
        self.phys = phys
        det = detect(phys)
        det.report.require("kallsyms", "phys/virt base", "page-table root", "btf")
        assert det.kallsyms is not None and det.kernel_space is not None and det.btf is not None
        self.syms = det.kallsyms
        self.space: AddressSpace = det.kernel_space
        self.release = det.info.release if det.info else "?"
        try:
            self.m = {s: {k: v.offset for k, v in ms.items()}
                      for s, ms in member_offsets(det.btf, MEMBERS, self.release).items()}
        except GuestDataError as exc:
            raise DetectionError(f"stage btf: {exc}") from exc
        self.current_task = self.syms.get("current_task")  # per-CPU offset, added to the kernel GS base
        self.page_offset = self.space.read_u64(self.syms.get("page_offset_base"))
        self.total_forks = self.syms.find("total_forks")

    def nop_length(self, gva: int) -> int:
        """Return the length of the no-op instruction at kernel `gva`, or 0 if it is anything else."""
        try:
            code = self.space.read(gva, 5)
        except Errors:
            return 0
        return next((len(n) for n in NOPS if code.startswith(n)), 0)

    def hooks(self, events: Iterable[str]) -> dict[int, str]:
        """Return {kernel gva: event} for `events`; DetectionError if the kernel lacks a hook."""
        return {self.syms.get(HOOKS[e]): e for e in events}

    def forks(self) -> int | None:
        """Return the kernel's fork counter (None if unknown)."""
        try:
            return self.space.read_u64(self.total_forks) if self.total_forks else None
        except Errors:
            return None

    def _str(self, gva: int, limit: int, space: AddressSpace | None = None) -> str:
        sp = space or self.space
        out = b""
        while len(out) < limit:  # page by page: a string may end right before an unmapped page
            n = min(limit - len(out), 4096 - (gva & 4095))
            chunk = sp.read(gva, n)
            out += chunk
            if b"\0" in chunk:
                break
            gva += n
        return _cstr(out)

    def _u(self, gva: int, size: int = 8) -> int:
        return int.from_bytes(self.space.read(gva, size), "little")

    def current(self, gs_base: int) -> int:
        """Return the task_struct gva of the stopped vCPU's current task."""
        return self._u(gs_base + self.current_task)

    def task_mm(self, task: int, pid: int | None = None) -> int | None:
        """Return task->mm (None if unreadable, or if `pid` is given and the task is no longer that tgid)."""
        t = self.m["task_struct"]
        try:
            return None if pid is not None and self._u(task + t["tgid"], 4) != pid else self._u(task + t["mm"])
        except Errors:
            return None

    def exec_mm(self, bprm: int) -> int | None:
        """Return the new mm of an exec (bprm->mm)."""
        try:
            return self._u(bprm + self.m["linux_binprm"]["mm"])
        except Errors:
            return None

    def pgd_gpa(self, mm: int) -> int:
        """Return the gpa of mm->pgd (direct map: gva - page_offset_base)."""
        return self._u(mm + self.m["mm_struct"]["pgd"]) - self.page_offset

    def fill_task(self, ev: TrapEvent, gs_base: int) -> None:
        """Fill pid, tid, ppid, comm of the current task of the stopped vCPU (kernel GS base `gs_base`)."""
        t = self.m["task_struct"]
        task = self.current(gs_base)
        ev.tid, ev.pid = self._u(task + t["pid"], 4), self._u(task + t["tgid"], 4)
        ev.comm = _cstr(self.space.read(task + t["comm"], 16))
        parent = self._u(task + t["real_parent"])
        ev.ppid = self._u(parent + t["tgid"], 4)

    def decode(self, kind: str, regs: dict[str, int]) -> TrapEvent:
        """Return the event at a hit of `kind`'s hook, from registers and guest RAM (VM stopped)."""
        ev = TrapEvent(kind, time.time())
        self.space.flush()  # the guest ran since the last event: page tables may have changed
        try:
            self.fill_task(ev, regs["gs_base"])
            arg = regs["rdi"]
            if kind == "exec":
                ev.detail = self._exec(arg)
            elif kind == "exit":
                ev.detail = {"code": arg & 0xFFFFFFFF, "status": (arg >> 8) & 0xFF, "signal": arg & 0x7F}
            elif kind == "module":
                ev.detail = self._module(arg)
        except (*Errors, KeyError) as exc:
            ev.error = f"{type(exc).__name__}: {exc}"
        return ev

    def _exec(self, bprm: int) -> dict[str, Any]:
        b = self.m["linux_binprm"]
        d: dict[str, Any] = {"path": self._str(self._u(bprm + b["filename"]), MAX_PATH)}
        interp = self._u(bprm + b["interp"])
        d["interp"] = self._str(interp, MAX_PATH) if interp else ""
        try:
            d["file"] = self._dentry_path(self._u(self._u(bprm + b["file"]) + self.m["file"]["f_path.dentry"]))
        except Errors as exc:
            d["file_error"] = str(exc)
        try:
            d["argv"] = self._argv(bprm)
        except Errors as exc:
            d["argv_error"] = str(exc)
        return d

    def _dentry_path(self, dentry: int) -> str:
        """Return the path of `dentry` up to its mount's root (mount points are not crossed)."""
        dm = self.m["dentry"]
        parts: list[str] = []
        for _ in range(MAX_DEPTH):
            parent = self._u(dentry + dm["d_parent"])
            if parent == dentry:
                break
            parts.append(self._str(self._u(dentry + dm["d_name.name"]), 256))
            dentry = parent
        return "/" + "/".join(reversed(parts))

    def _argv(self, bprm: int) -> list[str]:
        """Return the new program's arguments from its stack in the new mm (bprm->mm, bprm->p)."""
        b = self.m["linux_binprm"]
        argc = min(self._u(bprm + b["argc"], 4), MAX_ARGS)
        space = AddressSpace(self.phys, self.pgd_gpa(self._u(bprm + b["mm"])), self.space.levels)
        p, raw = self._u(bprm + b["p"]), b""
        while raw.count(b"\0") < argc and len(raw) < MAX_ARGV_BYTES:
            n = 4096 - (p & 4095)
            raw += space.read(p, n)
            p += n
        return [a.decode("utf-8", "backslashreplace") for a in raw.split(b"\0")[:argc]]

    def _module(self, mod: int) -> dict[str, Any]:
        m = self.m["module"]
        d: dict[str, Any] = {"name": _cstr(self.space.read(mod + m["name"], 56)), "struct_gva": mod}
        if "core_layout.size" in m:
            d["core_size"] = self._u(mod + m["core_layout.size"], 4)
            d["core_base"] = self._u(mod + m["core_layout.base"])
        return d


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

    tracker: ExecTracker | None = None  # holds exec events until their process is identified

    def __init__(self, vm: VmTarget, events: Iterable[str] = EVENTS, *, budget: int = 200, cooldown: float = 1.0,
                 guard: bool = True, skip_nops: bool = True, host: str = "127.0.0.1", identify: bool = True,
                 kb: Path | None = None) -> None:
        bad = sorted(set(events) - set(HOOKS))
        if bad:
            raise NephoscopeError(f"unknown trap event(s) {', '.join(bad)}; choose from {', '.join(EVENTS)}")
        if vm.gdb_port is None or vm.ram_path is None or not vm.live:
            raise ConnectorError(f"trap needs a live VM with a gdbstub and a shared RAM file; {vm.name} has "
                                 f"gdb_port={vm.gdb_port}, ram={vm.ram_path}")
        self.vm, self.events, self.host = vm, list(dict.fromkeys(events)), host
        self.budget, self.cooldown, self.use_guard = Budget(budget), cooldown, guard
        self.skip_nops = skip_nops
        self.stats = WatchStats()
        self.phys = open_memory(vm.ram_path)
        try:
            self.kernel = KernelReader(self.phys)  # before attaching: detection must not stretch the pause
            self.hooks = self.kernel.hooks(self.events)
            self.tracker = self._tracker(kb) if identify and "exec" in self.events else None
        except BaseException:
            self.phys.close()
            raise

    def _tracker(self, kb: Path | None) -> ExecTracker:
        """Open the code-page DB now (not during a pause) and track exec events until identified."""
        db, why = open_kb(kb)
        ident = Identifier(self.phys, self.kernel.space.levels, db, why)
        return ExecTracker(ident, self.kernel.pgd_gpa, eager="exit" not in self.events)

    def _track(self, ev: TrapEvent, regs: dict[str, int]) -> None:
        """Feed the exec tracker at a hit (VM stopped: the current mm is intact)."""
        if self.tracker is None:
            return
        self.tracker.on_stop(self.kernel.task_mm)
        if ev.kind not in ("exec", "exit"):
            return
        task = None if ev.error else self.kernel.current(regs["gs_base"])
        mm = self.kernel.task_mm(task) if task is not None else None
        if ev.kind == "exec":
            self.tracker.on_exec(ev, task, mm, self.kernel.exec_mm(regs["rdi"]))
        else:
            self.tracker.on_exit(ev, mm)

    def _deliver(self, ev: TrapEvent | None, on_event: Callable[[TrapEvent], None]) -> None:
        """Hand over `ev` and the exec events identified meanwhile (an exec waits for its identity)."""
        for e in self.tracker.take(ev) if self.tracker is not None else [ev] if ev is not None else []:
            on_event(e)  # type: ignore[arg-type]

    def run(self, on_event: Callable[[TrapEvent], None], duration: float | None = None,
            should_stop: Callable[[], bool] = lambda: False,
            on_ready: Callable[[], None] = lambda: None) -> WatchStats:
        """Watch until `duration` elapses or `should_stop()`; call `on_event` per event (pauses the VM briefly).

        `on_ready` is called once the breakpoints are in and the VM runs again."""
        guard = Guard(self.host, self.vm.gdb_port) if self.use_guard else None  # type: ignore[arg-type]
        start = time.monotonic()
        t0 = time.perf_counter()
        try:
            stub = GdbStub(self.host, self.vm.gdb_port)  # type: ignore[arg-type]
        except BaseException:
            if guard is not None:
                guard.release()  # nothing was inserted: nothing to repair
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
                self.stats.detach_s = time.perf_counter() - t1
                self.stats.watched_s = time.monotonic() - start
                if guard is not None:
                    guard.release(detached)
            self._deliver(ev, on_event)
            if self.tracker is not None:  # still-running processes: their page tables, read from RAM
                for e in self.tracker.finish(self.kernel.task_mm):
                    on_event(e)  # type: ignore[arg-type]
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
                       "forks_start": self.kernel.forks()}
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
        nop = self.kernel.nop_length(rip) if self.skip_nops else 0
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
        ev = self.kernel.decode(kind, regs)
        self._track(ev, regs)
        self.stats.events += 1
        self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
        self.stats.decode_errors += bool(ev.error)
        return regs["rip"], ev

    def _close_gap(self, gap: dict[str, Any]) -> None:
        end_forks = self.kernel.forks()
        forks = None if gap["forks_start"] is None or end_forks is None else end_forks - gap["forks_start"]
        self.stats.gaps.append({"start": gap["start"], "end": time.time(), "forks_missed": forks,
                                "reason": f"over {self.budget.per_second} events/s: breakpoints removed for "
                                          f"{self.cooldown:.1f}s"})

    def close(self) -> None:
        """Release the RAM mapping."""
        self.phys.close()


# --- storage ---------------------------------------------------------------------------------------

TABLE = """CREATE TABLE IF NOT EXISTS trap_events (
  id INTEGER PRIMARY KEY, vm TEXT NOT NULL, time REAL NOT NULL, kind TEXT NOT NULL, pid INTEGER,
  ppid INTEGER, comm TEXT NOT NULL, detail TEXT NOT NULL, error TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS trap_events_vm ON trap_events(vm, time);"""


class EventLog:
    """Append trapped events to the `trap_events` table of the SQLite store (batched commits)."""

    def __init__(self, store: Any, vm: str) -> None:
        self.db, self.vm, self._last = store.db, vm, time.monotonic()
        self.db.executescript(TABLE)

    def add(self, ev: TrapEvent) -> None:
        """Insert one event; commit at most once a second."""
        self.db.execute("INSERT INTO trap_events (vm, time, kind, pid, ppid, comm, detail, error) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (self.vm, ev.time, ev.kind, ev.pid, ev.ppid, ev.comm,
                                                             json.dumps(ev.detail), ev.error))
        if time.monotonic() - self._last > 1.0:
            self.flush()

    def flush(self) -> None:
        """Commit pending inserts."""
        self.db.commit()
        self._last = time.monotonic()


def recent_events(store: Any, vm: str, limit: int = 1000) -> list[dict[str, Any]]:
    """Return the newest `limit` stored events of `vm`, oldest first."""
    store.db.executescript(TABLE)
    rows = store.db.execute("SELECT time, kind, pid, ppid, comm, detail, error FROM trap_events WHERE vm = ? "
                            "ORDER BY id DESC LIMIT ?", (vm, limit)).fetchall()
    return [{"time": t, "kind": k, "pid": p, "ppid": pp, "comm": c, "detail": json.loads(d), "error": e}
            for t, k, p, pp, c, d, e in reversed(rows)]


# --- the method ------------------------------------------------------------------------------------

def event_observation(vm: VmTarget, ev: TrapEvent) -> Observation:
    """Turn a trapped event into an observation (verified: seen by the vCPU, read from kernel memory)."""
    data = {"pid": ev.pid, "tid": ev.tid, "ppid": ev.ppid, "comm": ev.comm, "time": ev.time, **ev.detail}
    kind = {"exec": "exec", "exit": "exit", "module": "module-load"}[ev.kind]
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
        for ev in events:
            if ev.kind in self.events:
                yield event_observation(vm, ev)
        for gap in stats.gaps:
            yield unverifiable(NAME, vm, f"events {gap['start']:.3f}-{gap['end']:.3f}",
                               f"{gap['reason']}; {gap['forks_missed']} forks happened unseen")
        yield observe(NAME, vm, "trap-stats", "trap", self.last_stats, Verdict.VERIFIED)
