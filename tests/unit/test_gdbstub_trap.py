"""The trap watcher's loop against the fake gdbstub: nop skipping, the event budget, clean detach, storage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_gdbstub import FakeStub  # same directory: pytest puts it on sys.path

from nephoscope.core.records import Verdict
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.trap import Budget, TrapEvent, Watcher, WatchStats, event_observation
from nephoscope.store.events import EventLog, recent_events
from nephoscope.store.sqlite import Store

HOOK = 0xFFFFFFFF81000000  # the fake's rip


class FakeKernel:
    """Stands in for the watcher's HookDecoder: every hit is an exec of /bin/true by pid 42."""

    def __init__(self, nop: int = 5) -> None:
        self.nop, self.fork_count = nop, 0

    def decode(self, kind: str, regs: dict[str, int]) -> TrapEvent:
        return TrapEvent(kind, 0.0, pid=42, tid=42, ppid=1, comm="sh", detail={"path": "/bin/true", "arg": regs["rdi"]})

    def nop_length(self, gva: int) -> int:
        return self.nop

    def forks(self) -> int:
        self.fork_count += 10
        return self.fork_count


def _watcher(port: int, kernel: FakeKernel, budget: int = 1000, cooldown: float = 0.3) -> Watcher:
    w = Watcher.__new__(Watcher)  # skip RAM and kernel detection: the loop is under test
    w.vm = VmTarget("fake", gdb_port=port)
    w.events, w.host, w.use_guard, w.skip_nops = ["exec"], "127.0.0.1", False, True
    w.budget, w.cooldown, w.stats = Budget(budget), cooldown, WatchStats()
    w.decoder, w.hooks = kernel, {HOOK: "exec"}  # type: ignore[assignment]
    return w


def test_budget_allows_per_second() -> None:
    b = Budget(3)
    assert [b.spend(10.0 + i * 0.1) for i in range(5)] == [True, True, True, False, False]
    assert b.spend(11.5)


def test_watch_skips_nops_by_moving_rip_and_detaches() -> None:
    fake = FakeStub(stop_after=0.01)
    try:
        seen: list[TrapEvent] = []
        ready: list[bool] = []
        stats = _watcher(fake.port, FakeKernel()).run(seen.append, duration=0.5, on_ready=lambda: ready.append(True))
        assert ready == [True] and len(seen) >= 5 and stats.events == len(seen)
        assert seen[0].detail == {"path": "/bin/true", "arg": 0x1234} and seen[0].paused_s > 0
        assert stats.skipped_nops == stats.events
        assert b"P10=05000081ffffffff" in fake.received  # rip moved past the 5-byte nop
        assert b"s" not in fake.received
        assert fake.received[-1] == b"D" and not fake.breakpoints
    finally:
        fake.close()


def test_watch_steps_over_other_instructions() -> None:
    fake = FakeStub(stop_after=0.01)
    try:
        stats = _watcher(fake.port, FakeKernel(nop=0)).run(lambda ev: None, duration=0.3)
        assert stats.events > 0 and stats.skipped_nops == 0
        i = fake.received.index(b"s")
        assert fake.received[i - 1].startswith(b"z0,") and fake.received[i + 1].startswith(b"Z0,")
    finally:
        fake.close()


def test_flood_removes_breakpoints_for_a_cooldown_and_reports_the_gap() -> None:
    fake = FakeStub(stop_after=0.001)
    try:
        stats = _watcher(fake.port, FakeKernel(), budget=5, cooldown=0.3).run(lambda ev: None, duration=1.0)
        assert stats.gaps and stats.gaps[0]["forks_missed"] == 10
        assert "events/s" in stats.gaps[0]["reason"]
        assert stats.events <= 5 * (len(stats.gaps) + 1) + 1  # the guest never traps beyond its budget
        assert fake.received[-1] == b"D" and not fake.breakpoints
    finally:
        fake.close()


def test_observations_and_store(tmp_path: Path) -> None:
    vm = VmTarget("g1")
    ok = event_observation(vm, TrapEvent("exec", 1.5, pid=7, ppid=1, comm="sh", detail={"path": "/bin/x"}))
    assert (ok.kind, ok.verdict, ok.data["path"]) == ("exec", Verdict.VERIFIED, "/bin/x")
    bad = event_observation(vm, TrapEvent("module", 2.0, error="TranslationError: not mapped"))
    assert bad.kind == "module-load" and bad.verdict == Verdict.UNVERIFIABLE and "not mapped" in bad.reason
    store: Any = Store(tmp_path / "s.db")
    log = EventLog(store, "g1")
    log.add(TrapEvent("exec", 1.5, pid=7, ppid=1, comm="sh", detail={"path": "/bin/x"}))
    log.add(TrapEvent("exit", 1.6, pid=7, ppid=1, comm="x", detail={"code": 0}))
    log.flush()
    rows = recent_events(store, "g1")
    assert [(r["kind"], r["pid"], r["detail"]) for r in rows] == [("exec", 7, {"path": "/bin/x"}),
                                                                   ("exit", 7, {"code": 0})]
    assert recent_events(store, "other") == []
