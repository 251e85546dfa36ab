"""The `driver` method: the guest agent plus nephoscope's own kernel module (nphdrv) inside the guest.

nphdrv (src/nephoscope/lab/driver/nphdrv.c) records exec, exit and module-load events in a ring buffer
with their kernel cost and exposes them, with the process table, under /proc/nephoscope/; this method
reads those files through the guest agent (guest-file-open/read, no shell). Everything it says is the
guest kernel's own account, so every observation is `reported`, and anything that is missing,
malformed, truncated or silent is `unverifiable` with the reason, never an empty all-clear.

Liveness: before reading the event log the method runs /bin/true through guest-exec (the agent gives
its guest pid) and requires the driver to have recorded that exec; a driver whose hooks were removed
(or one that lies about new processes) fails this canary and its events become `unverifiable`.

The files are hostile input: each is read up to a byte limit, has a header, a strict line grammar and
an `end <count>` trailer that must match, and string fields are `=` plus printable bytes with `\\xHH`
escapes. Nothing here pauses the VM.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from nephoscope.core import payloads
from nephoscope.core.errors import ConnectorError
from nephoscope.core.records import Observation, Verdict
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.agent import through_agent
from nephoscope.introspect.base import observe, unverifiable

NAME = "driver"
PROC_DIR = "/proc/nephoscope"
MODULE = "nphdrv"
CANARY = "/bin/true"
MAX_FILE = 8 * 2**20  # the ring holds 2048 events (~200 KB of text); a task table of 32768 ~4 MB
MAX_LINES = 40_000
MAX_STRING = 4096 * 4 + 1  # PATH_MAX bytes, each possibly \xHH, plus '='
STR_RE = re.compile(r"=(?:[\x21-\x5b\x5d-\x7e]|\\x[0-9a-f]{2})*")
INT_RE = re.compile(r"-?\d{1,20}")
EVENT_KINDS = {"exec": "exec", "exit": "exit", "module": "module-load"}


class DriverOutputError(ValueError):
    """A /proc/nephoscope file does not follow nphdrv's grammar (the message says where)."""


@dataclass(frozen=True, slots=True)
class DriverTask:
    """One process of nphdrv's table (for_each_process in the guest kernel)."""

    pid: int
    ppid: int
    uid: int
    kernel_thread: bool
    start_boottime_ns: int
    comm: str
    exe: str


@dataclass(frozen=True, slots=True)
class DriverEvent:
    """One event of nphdrv's ring: kind exec/exit/module, guest monotonic ns, the task, and the file or module."""

    seq: int
    ns: int
    kind: str
    pid: int
    tgid: int
    ppid: int
    code: int
    comm: str
    file: str


@dataclass(frozen=True, slots=True)
class DriverStats:
    """nphdrv's counters: events recorded, ring capacity and drops, hooks in place, cost per event kind."""

    loaded_ns: int
    now_ns: int
    now_boot_ns: int
    events: int
    capacity: int
    dropped: int
    hooks: dict[str, bool]
    cost: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # kind -> (count, total ns, max ns)

    def to_json(self) -> dict[str, object]:
        """Return the counters as JSON, with the mean kernel ns per event of each kind."""
        return {"loaded_ns": self.loaded_ns, "now_ns": self.now_ns, "now_boot_ns": self.now_boot_ns,
                "events": self.events, "capacity": self.capacity, "dropped": self.dropped, "hooks": self.hooks,
                "cost": {k: {"count": c, "total_ns": t, "max_ns": x, "mean_ns": t / c if c else None}
                         for k, (c, t, x) in self.cost.items()}}


def decode_string(field_text: str) -> str:
    """Return the text of one nphdrv string field (`=` then printable bytes and \\xHH escapes)."""
    if len(field_text) > MAX_STRING or not STR_RE.fullmatch(field_text):
        raise DriverOutputError(f"bad string field {field_text[:40]!r}")
    raw = bytearray()
    i, s = 1, field_text
    while i < len(s):
        if s[i] == "\\":
            raw.append(int(s[i + 2:i + 4], 16))
            i += 4
        else:
            raw.append(ord(s[i]))
            i += 1
    return raw.decode("utf-8", "replace")


def _int(text: str, what: str) -> int:
    if not INT_RE.fullmatch(text):
        raise DriverOutputError(f"{what} is not an integer: {text[:30]!r}")
    return int(text)


def _lines(data: bytes, header: str) -> tuple[list[str], list[str]]:
    """Return (header fields, body lines) of one file, checking the header and the `end` trailer."""
    if len(data) >= MAX_FILE:
        raise DriverOutputError(f"the file reaches the {MAX_FILE} byte limit (truncated)")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DriverOutputError("the file is not ASCII") from exc
    if not text.endswith("\n"):
        raise DriverOutputError("the file does not end with a newline (truncated)")
    lines = text[:-1].split("\n")
    if len(lines) > MAX_LINES:
        raise DriverOutputError(f"more than {MAX_LINES} lines")
    head = lines[0].split(" ")
    if head[:2] != [header, "1"]:
        raise DriverOutputError(f"header {lines[0][:40]!r} is not {header} version 1")
    tail = lines[-1].split(" ") if len(lines) > 1 else []
    if len(tail) < 2 or tail[0] != "end" or len(tail) > 3:
        raise DriverOutputError("no `end` trailer (truncated)")
    if len(tail) == 3:
        raise DriverOutputError(f"the driver says its output is {tail[2][:20]}")
    body = lines[1:-1]
    if _int(tail[1], "end count") != len(body):
        raise DriverOutputError(f"`end {tail[1]}` but {len(body)} records")
    return head[2:], body


def parse_tasks(data: bytes) -> list[DriverTask]:
    """Parse /proc/nephoscope/tasks; raise DriverOutputError on any deviation from the grammar."""
    _, body = _lines(data, "nphdrv-tasks")
    tasks: list[DriverTask] = []
    seen: set[int] = set()
    for n, line in enumerate(body, 2):
        f = line.split(" ")
        if len(f) != 8 or f[0] != "T" or f[4] not in ("k", "u"):
            raise DriverOutputError(f"tasks line {n} is malformed: {line[:60]!r}")
        pid = _int(f[1], "pid")
        if pid < 0 or pid in seen:
            raise DriverOutputError(f"tasks line {n}: pid {pid} is negative or repeated")
        seen.add(pid)
        tasks.append(DriverTask(pid, _int(f[2], "ppid"), _int(f[3], "uid"), f[4] == "k", _int(f[5], "start"),
                                decode_string(f[6]), decode_string(f[7])))
    return tasks


def parse_events(data: bytes) -> list[DriverEvent]:
    """Parse /proc/nephoscope/events (oldest first); raise DriverOutputError on any deviation."""
    head, body = _lines(data, "nphdrv-events")
    if len(head) != 2:
        raise DriverOutputError("the events header lacks the first/next sequence numbers")
    first, following = _int(head[0], "first seq"), _int(head[1], "next seq")
    events: list[DriverEvent] = []
    last = first - 1
    for n, line in enumerate(body, 2):
        f = line.split(" ")
        if len(f) != 10 or f[0] != "E" or f[3] not in EVENT_KINDS:
            raise DriverOutputError(f"events line {n} is malformed: {line[:60]!r}")
        seq = _int(f[1], "seq")
        if not last < seq < following:
            raise DriverOutputError(f"events line {n}: seq {seq} out of order ({first}..{following})")
        last = seq
        events.append(DriverEvent(seq, _int(f[2], "ns"), f[3], _int(f[4], "pid"), _int(f[5], "tgid"),
                                  _int(f[6], "ppid"), _int(f[7], "code"), decode_string(f[8]), decode_string(f[9])))
    return events


def parse_stats(data: bytes) -> DriverStats:
    """Parse /proc/nephoscope/stats; raise DriverOutputError on any deviation."""
    _, body = _lines(data, "nphdrv-stats")
    values: dict[str, int] = {}
    hooks: dict[str, bool] = {}
    cost: dict[str, tuple[int, int, int]] = {}
    for n, line in enumerate(body, 2):
        f = line.split(" ")
        if f[0] == "hooks" and len(f) >= 2:
            for item in f[1:]:
                k, eq, v = item.partition("=")
                if not eq or v not in ("0", "1"):
                    raise DriverOutputError(f"stats line {n}: bad hook {item[:30]!r}")
                hooks[k] = v == "1"
        elif f[0] == "cost" and len(f) == 5 and f[1] in EVENT_KINDS:
            cost[f[1]] = (_int(f[2], "count"), _int(f[3], "total ns"), _int(f[4], "max ns"))
        elif len(f) == 2 and f[0] in ("loaded_ns", "now_ns", "now_boot_ns", "events", "capacity", "dropped"):
            values[f[0]] = _int(f[1], f[0])
        else:
            raise DriverOutputError(f"stats line {n} is malformed: {line[:60]!r}")
    missing = [k for k in ("loaded_ns", "now_ns", "now_boot_ns", "events", "capacity", "dropped") if k not in values]
    if missing or set(cost) != set(EVENT_KINDS):
        raise DriverOutputError(f"stats lack {', '.join(missing) or 'a cost line per event kind'}")
    return DriverStats(values["loaded_ns"], values["now_ns"], values["now_boot_ns"], values["events"],
                       values["capacity"], values["dropped"], hooks, cost)


def run_canary(agent: GuestAgent, timeout: float) -> int:
    """Run /bin/true in the guest through guest-exec, wait until it is reaped, and return its guest pid."""
    started = agent.call("guest-exec", path=CANARY, arg=[], **{"capture-output": False})
    pid = started.get("pid") if isinstance(started, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise ConnectorError(f"guest-exec gave no pid for {CANARY}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = agent.call("guest-exec-status", pid=pid)
        if isinstance(status, dict) and status.get("exited"):
            return pid
        time.sleep(0.05)
    raise ConnectorError(f"{CANARY} (guest pid {pid}) did not finish within {timeout:.0f}s")


class DriverMethod:
    """The driver method: nphdrv's process table and event log, read through the guest agent."""

    name = NAME

    def __init__(self, timeout: float = 60.0, canary: bool = True) -> None:
        self.timeout = timeout
        self.canary = canary

    def collect(self, vm: VmTarget) -> Iterator[Observation]:
        """Yield the driver's processes, events and counters (all `reported`), or `unverifiable` with why."""
        yield from through_agent(NAME, vm, self.timeout, self.collect_from, why=" (the driver is read through it)")

    def collect_from(self, agent: GuestAgent, vm: VmTarget) -> Iterator[Observation]:
        """Yield what the driver reports through an open agent session (reads /proc/nephoscope, runs the canary)."""
        try:
            before = parse_stats(agent.read_file(f"{PROC_DIR}/stats", limit=MAX_FILE))
        except ConnectorError as exc:
            yield unverifiable(NAME, vm, "processes", f"the {MODULE} module is not loaded or not readable "
                                                      f"({PROC_DIR}/stats: {exc})")
            return
        except DriverOutputError as exc:
            yield unverifiable(NAME, vm, "processes", f"{PROC_DIR}/stats is malformed: {exc}")
            return
        canary_pid, canary_problem = None, ""
        if self.canary:
            try:
                canary_pid = run_canary(agent, self.timeout)
            except ConnectorError as exc:
                canary_problem = f"the canary exec could not run: {exc}"
        read_wall = time.time()
        files: dict[str, bytes] = {}
        for name in ("tasks", "events", "stats"):
            try:
                files[name] = agent.read_file(f"{PROC_DIR}/{name}", limit=MAX_FILE)
            except ConnectorError as exc:
                yield unverifiable(NAME, vm, "processes", f"{PROC_DIR}/{name} vanished while reading ({exc}): "
                                                          "the module was unloaded or hidden")
                return
        try:
            stats = parse_stats(files["stats"])
        except DriverOutputError as exc:
            yield unverifiable(NAME, vm, "processes", f"{PROC_DIR}/stats is malformed: {exc}")
            return
        if stats.loaded_ns != before.loaded_ns or stats.events < before.events:
            yield unverifiable(NAME, vm, "processes", "the driver was reloaded while reading (its load time or "
                                                      "event counter went back)")
            return
        yield observe(NAME, vm, "driver-stats", MODULE, payloads.Details(
            {**stats.to_json(), "canary_pid": canary_pid, "read_time": read_wall}), Verdict.REPORTED)
        yield from self._tasks(files["tasks"], vm)
        yield from self._events(files["events"], stats, canary_pid, canary_problem, read_wall, vm)

    @staticmethod
    def _tasks(data: bytes, vm: VmTarget) -> Iterator[Observation]:
        try:
            tasks = parse_tasks(data)
        except DriverOutputError as exc:
            yield unverifiable(NAME, vm, "processes", f"{PROC_DIR}/tasks is malformed: {exc}")
            return
        if not any(t.exe.endswith("/qemu-ga") for t in tasks) or not any(t.pid == 1 for t in tasks):
            yield unverifiable(NAME, vm, "processes", f"the driver's task table is not credible ({len(tasks)} "
                                                      "tasks, without init or the agent that reads it)")
            return
        for t in tasks:
            yield observe(NAME, vm, "process", f"pid:{t.pid}", payloads.Process(
                pid=t.pid, tgid=t.pid, ppid=t.ppid, comm=t.comm, exe=t.exe, uid=t.uid,
                start_boottime_ns=t.start_boottime_ns, kernel_thread=t.kernel_thread), Verdict.REPORTED)

    @staticmethod
    def _events(data: bytes, stats: DriverStats, canary_pid: int | None, canary_problem: str, read_wall: float,
                vm: VmTarget) -> Iterator[Observation]:
        try:
            events = parse_events(data)
        except DriverOutputError as exc:
            yield unverifiable(NAME, vm, "events", f"{PROC_DIR}/events is malformed: {exc}")
            return
        if not stats.hooks.get("exec") or not stats.hooks.get("exit"):
            yield unverifiable(NAME, vm, "events", f"the driver says its hooks are not in place: {stats.hooks}")
        if canary_problem:
            yield unverifiable(NAME, vm, "events", canary_problem)
        elif canary_pid is not None and not any(e.kind == "exec" and e.pid == canary_pid and e.file == CANARY
                                                for e in events):
            yield unverifiable(NAME, vm, "events", f"the driver did not record the canary exec of {CANARY} "
                                                   f"(guest pid {canary_pid}): its hooks are gone or it lies "
                                                   f"(event counter {stats.events})")
        if stats.dropped:
            yield unverifiable(NAME, vm, "events", f"the ring overflowed: {stats.dropped} older events were "
                                                   "overwritten before this read")
        for e in events:
            # guest monotonic ns -> host wall time, through the stats' own clock reading
            when = read_wall - (stats.now_ns - e.ns) / 1e9
            base = {"pid": e.tgid, "tid": e.pid, "ppid": e.ppid, "comm": e.comm, "time": when}
            payload: payloads.Payload
            if e.kind == "exec":
                payload = payloads.Exec(**base, path=e.file)
            elif e.kind == "exit":
                payload = payloads.Exit(**base, code=e.code, status=(e.code >> 8) & 0xFF, signal=e.code & 0x7F)
            else:
                payload = payloads.ModuleLoad(**base, name=e.file)
            yield observe(NAME, vm, EVENT_KINDS[e.kind], f"event:{e.seq}", payload, Verdict.REPORTED)
