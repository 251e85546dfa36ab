"""The driver method's parsing and verdicts without a VM: a fake agent serves /proc/nephoscope files.

Guest output is hostile: every malformed, truncated or silent answer must become `unverifiable`, never a
crash and never an empty all-clear. The analysis side: a task inspect sees that the driver's table lacks is
a `driver-view-mismatch`; nothing is claimed when the driver is unsound or the process exited or is newer.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest

from nephoscope.analysis.driver import driver_findings
from nephoscope.analysis.merge import merge
from nephoscope.core import payloads
from nephoscope.core.errors import ConnectorError
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.driver import (
    DriverMethod,
    DriverOutputError,
    decode_string,
    parse_events,
    parse_stats,
    parse_tasks,
)
from nephoscope.service.methods import available_methods, default_methods, get_method

VM = VmTarget("synth", qga_socket=None, live=True)
CANARY_PID = 900


def tasks_file(extra: str = "", drop: int | None = None) -> bytes:
    rows = ["T 1 0 0 u 100 =init =/usr/bin/busybox", "T 2 0 0 k 100 =kthreadd =",
            "T 131 1 0 u 200 =qemu-ga =/usr/sbin/qemu-ga", "T 135 114 33 u 300 =nginx =/usr/sbin/nginx",
            "T 140 1 0 u 400 =we\\x20ird\\x0aname =/tmp/a\\x20b\\x20(deleted)"]
    if drop is not None:
        rows = [r for r in rows if not r.startswith(f"T {drop} ")]
    body = "".join(r + "\n" for r in rows) + extra
    return f"nphdrv-tasks 1\n{body}end {body.count(chr(10))}\n".encode()


def events_file(canary: int | None = CANARY_PID) -> bytes:
    rows = ["E 7 1000 exec 376 376 371 0 =true =/bin/true", "E 8 2000 exit 376 376 371 256 =true =",
            "E 9 3000 module 377 377 1 0 =insmod =nph_own"]
    if canary is not None:
        rows.append(f"E 10 4000 exec {canary} {canary} 131 0 =true =/bin/true")
    return ("nphdrv-events 1 7 11\n" + "".join(r + "\n" for r in rows) + f"end {len(rows)}\n").encode()


def stats_file(events: int = 11, hooks: str = "exec=1 exit=1 module=1", dropped: int = 0) -> bytes:
    return (f"nphdrv-stats 1\nloaded_ns 10\nnow_ns 5000\nevents {events}\ncapacity 2048\ndropped {dropped}\n"
            f"now_boot_ns 5000\nhooks {hooks}\ncost exec 2 9000 6000\ncost exit 1 4000 4000\n"
            "cost module 1 1000 1000\nend 10\n").encode()


class FakeAgent:
    """Serves /proc/nephoscope/<name> from a dict; guest-exec answers with CANARY_PID."""

    def __init__(self, files: dict[str, bytes | None], exec_pid: Any = CANARY_PID) -> None:
        self.files = files
        self.exec_pid = exec_pid

    def call(self, name: str, **args: Any) -> Any:
        if name == "guest-exec":
            return {"pid": self.exec_pid}
        if name == "guest-exec-status":
            return {"exited": True, "exitcode": 0}
        raise ConnectorError(f"unexpected {name}")

    def read_file(self, path: str, limit: int = 0) -> bytes:
        data = self.files.get(path.rsplit("/", 1)[1])
        if data is None:
            raise ConnectorError(f"guest agent guest-file-open failed: {path}: No such file or directory")
        return data


def collect(**files: bytes | None) -> list[Observation]:
    base = {"tasks": tasks_file(), "events": events_file(), "stats": stats_file()}
    base.update(files)
    return list(DriverMethod(timeout=5).collect_from(FakeAgent(base), VM))  # type: ignore[arg-type]


def unverifiable(obs: list[Observation]) -> dict[str, str]:
    return {o.key: o.reason for o in obs if o.verdict == Verdict.UNVERIFIABLE}


def test_registered_but_not_a_default_method() -> None:
    assert "driver" in available_methods() and "driver" not in default_methods()
    assert get_method("driver").name == "driver"


def test_a_good_answer_is_reported() -> None:
    obs = collect()
    assert not unverifiable(obs)
    assert {o.verdict for o in obs} == {Verdict.REPORTED}
    procs = {o.payload.pid: o.payload for o in obs if isinstance(o.payload, payloads.Process)}
    assert sorted(procs) == [1, 2, 131, 135, 140]
    assert procs[2].kernel_thread and not procs[1].kernel_thread
    assert procs[140].comm == "we ird\nname" and procs[140].exe == "/tmp/a b (deleted)"
    assert procs[135].uid == 33 and procs[135].ppid == 114
    kinds = [o.kind for o in obs if o.key.startswith("event:")]
    assert kinds == ["exec", "exit", "module-load", "exec"]
    exit_ = next(o.payload for o in obs if o.kind == "exit")
    assert isinstance(exit_, payloads.Exit) and exit_.status == 1 and exit_.signal == 0
    module = next(o.payload for o in obs if o.kind == "module-load")
    assert isinstance(module, payloads.ModuleLoad) and module.name == "nph_own"
    stats = next(o for o in obs if o.kind == "driver-stats")
    assert stats.payload.data["cost"]["exec"]["mean_ns"] == 4500
    # stored and read back: the event kinds keep their typed payloads, driver-stats is a Details
    for o in obs:
        assert payloads.parse(o.kind, o.payload.to_json()) == o.payload


def test_module_absent_is_unverifiable() -> None:
    obs = collect(stats=None)
    assert len(obs) == 1 and "not loaded" in unverifiable(obs)["processes"]


def test_no_agent_is_unverifiable() -> None:
    [obs] = DriverMethod().collect(VmTarget("x", live=False))
    assert obs.verdict == Verdict.UNVERIFIABLE and obs.key == "processes"


def test_missing_canary_makes_events_unverifiable() -> None:
    obs = collect(events=events_file(canary=None))
    assert "canary" in unverifiable(obs)["events"]
    assert [o for o in obs if o.kind == "process"]  # the table is still the kernel's own account


def test_hooks_off_and_overflow_are_said() -> None:
    obs = collect(stats=stats_file(hooks="exec=0 exit=1 module=1", dropped=3))
    reasons = [o.reason for o in obs if o.verdict == Verdict.UNVERIFIABLE]
    assert any("hooks are not in place" in r for r in reasons) and any("overflowed" in r for r in reasons)


@pytest.mark.parametrize("data", [
    b"", b"garbage\n", b"nphdrv-tasks 2\nend 0\n", tasks_file()[:-3], tasks_file().replace(b"end 5", b"end 4"),
    tasks_file("T 141 1 0 u 1 =x\n"), tasks_file("T 1 1 0 u 1 =dup =\n"), tasks_file("T x 1 0 u 1 =a =b\n"),
    tasks_file("T 9 1 0 z 1 =a =b\n"), tasks_file("T 9 1 0 u 1 =a\x01 =b\n"), tasks_file("T 9 1 0 u 1 =a\\x4 =b\n"),
    tasks_file("T 9 1 0 u 1 a =b\n"), "nphdrv-tasks 1\nT 1 0 0 u 1 =é =\nend 1\n".encode(),
    b"nphdrv-tasks 1\nend 0 truncated\n",
    b"nphdrv-tasks 1\n" + b"T 1 0 0 u 1 =a =\n" * 3 + b"end 99999999999999999999999\n",
    b"\xff\xfe", b"nphdrv-tasks 1\n" + b"x" * (9 << 20) + b"\nend 1\n",
])
def test_malformed_tasks_are_unverifiable(data: bytes) -> None:
    with pytest.raises(DriverOutputError):
        parse_tasks(data)
    obs = collect(tasks=data)
    assert "processes" in unverifiable(obs) and not [o for o in obs if o.kind == "process"]


@pytest.mark.parametrize("data", [
    b"nphdrv-events 1\nend 0\n", events_file().replace(b"E 9 ", b"E 6 "), events_file().replace(b"module", b"fork"),
    events_file().replace(b"E 10 ", b"E 12 "), events_file().replace(b" 256 ", b" x "),
])
def test_malformed_events_are_unverifiable(data: bytes) -> None:
    with pytest.raises(DriverOutputError):
        parse_events(data)
    obs = collect(events=data)
    assert "events" in unverifiable(obs) and not [o for o in obs if o.key.startswith("event:")]


@pytest.mark.parametrize("data", [
    stats_file().replace(b"hooks exec=1", b"hooks exec=yes"), stats_file().replace(b"cost module 1 1000 1000\n", b""),
    stats_file().replace(b"now_boot_ns 5000\n", b"now_boot_ns 5000\nnow_boot_ns 5000\n"),
    stats_file().replace(b"capacity 2048", b"capacity -"),
])
def test_malformed_stats_are_unverifiable(data: bytes) -> None:
    with pytest.raises(DriverOutputError):
        parse_stats(data)
    obs = collect(stats=data)
    assert [o.key for o in obs] == ["processes"] and obs[0].verdict == Verdict.UNVERIFIABLE


def test_a_table_without_init_or_agent_is_not_credible() -> None:
    obs = collect(tasks=tasks_file(drop=131))
    assert "not credible" in unverifiable(obs)["processes"]


def test_decode_string() -> None:
    assert decode_string("=") == "" and decode_string("=a\\x5cb") == "a\\b"
    for bad in ("", "a", "= ", "=\\", "=\\x", "=\\xZZ", "=" + "a" * 20000):
        with pytest.raises(DriverOutputError):
            decode_string(bad)


# --- analysis: the driver's table against inspect ---------------------------------------------------------

def _obs(method: str, payload: payloads.Payload, kind: str, verdict: Verdict = Verdict.VERIFIED) -> Observation:
    key = f"pid:{getattr(payload, 'pid', 0)}"
    return Observation(kind, key, payload, Provenance(method, "synth", time.time()), verdict)


def _inspect(pid: int, start: int = 100) -> Observation:
    return _obs("inspect", payloads.Process(pid=pid, comm=f"p{pid}", exe="/bin/x", start_boottime_ns=start), "process")


def _scene(driver_has: list[int]) -> list[Observation]:
    obs = collect()
    obs = [o for o in obs if o.kind != "process"]
    obs += [_obs("driver", payloads.Process(pid=p, exe="/bin/x"), "process", Verdict.REPORTED) for p in driver_has]
    return obs


def test_a_task_inspect_sees_and_the_driver_lacks_is_a_mismatch() -> None:
    obs = [*_scene([1, 131]), _inspect(1), _inspect(131), _inspect(555)]
    [f] = driver_findings(obs, set(), "synth")
    assert f.kind == "driver-view-mismatch" and "pid 555" in f.title
    view = merge(obs, ["driver", "inspect"], "synth")
    assert [x.kind for x in view.findings if x.kind == "driver-view-mismatch"] == ["driver-view-mismatch"]


def test_a_dkom_hidden_task_is_a_mismatch_too() -> None:
    tamper = _obs("inspect", payloads.KernelTamper("hidden-task", "address-space", "task", pid=777), "kernel-tamper")
    [f] = driver_findings([*_scene([1, 131]), tamper], set(), "synth")
    assert "pid 777" in f.title and "address-space" in f.title


def test_no_mismatch_claim_without_grounds() -> None:
    # exited per the driver's own log (pid 376), started after the driver read (now_boot_ns 5000), unsound views
    later = [_inspect(376), _inspect(600, start=9999), _inspect(601, start=None)]  # type: ignore[arg-type]
    obs = [*_scene([1, 131]), *later]
    assert driver_findings(obs, set(), "synth") == []
    assert driver_findings([*_scene([1]), _inspect(555)], {"driver"}, "synth") == []
    assert driver_findings([*_scene([1]), _inspect(555)], {"inspect"}, "synth") == []
    no_driver = [_inspect(555)]
    assert driver_findings(no_driver, set(), "synth") == []


def test_the_listing_stream_is_bounded_base64_free() -> None:
    # the driver files are plain text read by guest-file-read (no shell): a base64 reply is not a listing
    obs = collect(tasks=base64.b64encode(tasks_file()))
    assert "processes" in unverifiable(obs)


def test_evaluate_renders_the_drivers_event_power_and_cost() -> None:
    from nephoscope.core.records import Finding
    from nephoscope.service.driver_eval import own_hook
    from nephoscope.service.evaluate import MethodScore
    from nephoscope.service.evaluate_render import markdown

    score = MethodScore("driver", "clean", 13, 13, 0, short_lived="seen (exec+exit of pid 9)",
                        event_cost_ns={"exec": 10481, "exit": 18641}, guest_slowdown=1.01)
    text = markdown([MethodScore("inspect", "clean", 13, 13), score])
    assert "| clean | driver | seen (exec+exit of pid 9) | exec 10481, exit 18641 |" in text
    assert "| clean | inspect |" in text.split("## Event-driven")[0]
    assert own_hook(Finding("inline-hook", "critical", "__SCT__tp_func_sched_process_exec+0x0 is hooked: ... of "
                            "module nphdrv, which ...", "vm", []))
    assert not own_hook(Finding("inline-hook", "critical", "__x64_sys_acct+0x0 is hooked: jmp into nphrk", "vm", []))


def test_a_lying_agent_cannot_crash_the_canary() -> None:
    for pid in (None, "12", True, {"x": 1}):
        agent = FakeAgent({"tasks": tasks_file(), "events": events_file(), "stats": stats_file()}, exec_pid=pid)
        obs = list(DriverMethod(timeout=5).collect_from(agent, VM))  # type: ignore[arg-type]
        assert "canary" in unverifiable(obs)["events"]


def test_random_damage_is_an_error_or_a_parse_never_a_crash() -> None:
    import contextlib
    import random

    rng = random.Random(18)
    for parse, good in ((parse_tasks, tasks_file()), (parse_events, events_file()), (parse_stats, stats_file())):
        for _ in range(400):
            data = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                op, at = rng.randrange(3), rng.randrange(len(data))
                if op == 0:
                    data[at] = rng.randrange(256)
                elif op == 1:
                    del data[at:at + rng.randint(1, 20)]
                else:
                    data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            with contextlib.suppress(DriverOutputError):
                parse(bytes(data))  # type: ignore[operator]
