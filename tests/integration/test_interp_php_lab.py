"""PHP on the real `interp` guest: the php-fpm worker serving a slow request, read from the host.

Ground truth: the lab's own slow.php (the profile knows the function and the lines it sleeps at), the
request the test issues through the guest's forwarded HTTP port, and the workers' command lines read
inside the guest through the agent.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from nephoscope.hypervisor.qga import open_agent
from nephoscope.introspect.interp import php
from nephoscope.introspect.kernel import open_kernel
from nephoscope.lab.profile import load_profile
from nephoscope.service.targets import resolve_target

SLOW = "/var/www/php/slow.php"
SECONDS = 90  # long enough for the three tests on a TCG guest, short enough to wait for at the end
pytestmark = pytest.mark.guest


def _line(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.fixture(scope="module")
def slow_request(interp_guest) -> Iterator[dict[str, object]]:  # type: ignore[no-untyped-def]
    """Issue GET /slow.php?s=SECONDS through the forwarded port; wait for its answer when the module ends.

    Waiting leaves the session's guest as the module found it (no PHP request still running when the next
    module's tests look at the guest's scripts).
    """
    answer: dict[str, object] = {}

    def run() -> None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{interp_guest.http_port}/slow.php?s={SECONDS}",
                                        timeout=400) as reply:
                answer["body"] = reply.read()
        except OSError as exc:
            answer["error"] = str(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    yield answer
    worker.join(timeout=SECONDS + 120)


def _states(vm):  # type: ignore[no-untyped-def]
    with open_kernel(vm) as k, k.paused():
        procs = k.processes().items
        return {t.pid: (t, php.read_process(k, t, procs)) for t in procs if php.php_binary(t.exe or "")}


def test_the_busy_worker_sleeps_in_the_labs_function(interp_guest, slow_request) -> None:  # type: ignore[no-untyped-def]
    text = load_profile("interp").files[SLOW]
    want = [php.PhpFrame("sleep", "", "", 0, internal=True),
            php.PhpFrame("nph_slow_request", "", SLOW, _line(text, "sleep($seconds)")),
            php.PhpFrame("{main}", "", SLOW, _line(text, "echo nph_slow_request("))]
    vm = resolve_target(interp_guest.name)
    busy: list[tuple[int, php.PhpState]] = []
    for _ in range(60):  # the request reaches php-fpm a moment after the thread starts (TCG guest)
        states = _states(vm)
        busy = [(pid, s) for pid, (_t, s) in states.items() if s is not None and s.busy]
        if busy or "error" in slow_request:
            break
        time.sleep(2)
    assert "error" not in slow_request, slow_request
    assert busy, {pid: (s and s.problem) for pid, (_t, s) in states.items()}
    assert all(s.frames == busy[0][1].frames for _pid, s in busy)  # a re-run may find an older request too
    pid, state = busy[0]
    assert state.complete, state.problem
    assert state.frames == want
    assert state.included_files == [SLOW]
    assert (state.request_method, state.request_uri, state.script) == ("GET", "/slow.php", SLOW)
    assert state.build is not None and state.build.package == "php8.2-fpm"
    with open_agent(vm, timeout=60) as agent:
        rc, out, _err = agent.exec(["/bin/sh", "-c", "for p in $(pgrep -x php-fpm8.2); do echo \"$p $(tr '\\0' ' ' "
                                    "</proc/$p/cmdline)\"; done; dpkg-query -W -f '${Version}' php8.2-fpm"], timeout=60)
    assert rc == 0
    lines = out.decode().splitlines()
    inside = {int(line.split()[0]): line.split(" ", 1)[1].strip() for line in lines[:-1]}
    assert state.build.version == lines[-1].strip()  # the exact build the guest has installed
    assert "pool www" in inside[pid]
    for other, (task, s) in states.items():  # every php-fpm process was read; the idle ones have no frames
        assert s is not None and s.complete, (other, s and s.problem)
        assert other in inside and (other in dict(busy) or not s.frames)
        if "master" in inside[other]:
            assert not s.activated and task.ppid == 1


def _garbled(real: php.Read, patches: dict[int, bytes]) -> php.Read:
    """Return a read over a copy of `real` with bytes replaced at user gvas (the guest is left alone)."""
    def read(gva: int, n: int) -> bytes:
        blob = bytearray(real(gva, n))
        for at, value in patches.items():
            for i, b in enumerate(value):
                if 0 <= at + i - gva < n:
                    blob[at + i - gva] = b
        return bytes(blob)

    return read


def test_a_corrupted_copy_of_the_workers_memory_is_unverifiable(interp_guest, slow_request) -> None:  # type: ignore[no-untyped-def]
    """Read the busy worker through a copy of its memory with one execute_data garbled, then looped."""
    from nephoscope.introspect.interp.php_layout import PHP82_NTS as L

    vm = resolve_target(interp_guest.name)
    for _ in range(60):
        with open_kernel(vm) as k, k.paused():
            procs = k.processes().items
            found = [(t, s) for t in procs if (s := php.read_process(k, t, procs)) is not None and s.busy]
            if not found:
                time.sleep(2)
                continue
            task, state = found[0]
            assert state.build is not None
            space = k.user_space(k.u64(task.mm_gva + k.off["mm_struct.pgd"]))

            def real(gva: int, n: int, space=space) -> bytes:  # type: ignore[no-untyped-def]
                return k.read_in(space, gva, n)

            bias = _bias(k, task, procs)
            top = int.from_bytes(real(bias + state.build.executor_globals
                                      + L["zend_executor_globals.current_execute_data"], 8), "little")
            bad = php.read_state(_garbled(real, {top + L["zend_execute_data.func"]: b"A" * 8}), state.build, bias)
            assert not bad.complete and "call stack does not validate" in bad.problem
            assert bad.frames == [] and bad.included_files == state.included_files
            loop = {top + L["zend_execute_data.prev_execute_data"]: top.to_bytes(8, "little")}
            looped = php.read_state(_garbled(real, loop), state.build, bias)
            assert not looped.complete and "loops" in looped.problem and looped.frames == []
            return
        time.sleep(2)
    pytest.fail("no busy php-fpm worker seen")


def _bias(k, task, procs) -> int:  # type: ignore[no-untyped-def]
    """Return the PHP binary's load bias in `task` the way read_process finds it (header via a peer if needed)."""
    vmas = k.vmas(task).items
    base = php.image_base(vmas, task.exe)
    for t in [task, *procs]:
        if t.exe != task.exe:
            continue
        space = k.user_space(k.u64(t.mm_gva + k.off["mm_struct.pgd"]))
        try:
            _bid, delta = php.read_build_id(lambda g, n, s=space: k.read_in(s, g, n), php.image_base(k.vmas(t).items,
                                                                                                   t.exe))
            return base - delta
        except php.NephoscopeError:
            continue
    raise AssertionError("no process maps the PHP binary's header")


def test_the_registry_reports_php_workers(interp_guest, slow_request) -> None:  # type: ignore[no-untyped-def]
    from nephoscope.core.records import Verdict
    from nephoscope.introspect.interp import read_interpreters

    vm = resolve_target(interp_guest.name)
    with open_kernel(vm) as k, k.paused():
        results = read_interpreters(k, kinds=("php",))
    assert results and all(r.kind == "php" and r.verdict == Verdict.VERIFIED for r in results), results
    busy = [r for r in results if r.details["busy"]]
    assert busy and busy[0].entry == SLOW and busy[0].scripts == [SLOW]
    assert [f.function for f in busy[0].threads[0].frames] == ["sleep", "nph_slow_request", "{main}"]
    assert busy[0].runtime.startswith("PHP 8.2.")
