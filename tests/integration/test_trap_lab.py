"""The trap method on a real lab guest: short-lived execs, a module load, a killed watcher, a lost connection."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from nephoscope.hypervisor.gdbstub import GdbStub, repair
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.hypervisor.qmp import Qmp
from nephoscope.introspect.trap import KernelReader, TrapMethod
from nephoscope.knowledge.binaries import CodePageDB
from nephoscope.memory.physical import open_memory
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest
N = 20


def _start_watcher(name: str, *args: str) -> tuple[subprocess.Popen, dict[str, Any]]:
    """Start `nephoscope watch --json` and return it with its ready line (breakpoints are in)."""
    proc = subprocess.Popen([sys.executable, "-m", "nephoscope.cli.main", "watch", name, "--json", "--no-store",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"watcher exited: {proc.stderr.read() if proc.stderr else ''}")
    return proc, json.loads(line)["ready"]


def _guest_exec(guest: Any, script: str, timeout: float = 180) -> str:
    with GuestAgent(guest.qga_socket, timeout=timeout) as agent:
        rc, out, err = agent.exec(["/bin/sh", "-c", script], timeout=timeout)
    assert rc == 0, err
    return out.decode()


def _running(guest: Any) -> bool:
    with Qmp(guest.qmp_socket) as qmp:
        return bool(qmp.command("query-status")["running"])


def _busybox_in_kb(clean_guest: Any) -> str:
    """Return the guest's busybox-static version, ingesting the clean profile's packages if the KB lacks it."""
    version = clean_guest.manifest()["packages"]["busybox-static"]
    db = CodePageDB.open()
    try:
        if not any(v == version for _, _, _, v in db.find_files("/busybox", "busybox-static")):
            from nephoscope.knowledge.ingest import ingest_specs
            from nephoscope.lab.packages import lab_package_specs
            ingest_specs(db, lab_package_specs("clean"))
        if not any(v == version for _, _, _, v in db.find_files("/busybox", "busybox-static")):
            pytest.skip(f"the code-page DB {db.path} lacks busybox-static {version} even after ingesting")
    finally:
        db.close()
    return version


def test_watch_reports_every_short_lived_exec_with_pid_and_path(clean_guest) -> None:
    busybox = _busybox_in_kb(clean_guest)
    proc, ready = _start_watcher(clean_guest.name, "--events", "exec,exit")
    assert set(ready["events"]) == {"exec", "exit"}
    try:
        # each /bin/true lives for milliseconds; the shell prints the pid it forked for it
        out = _guest_exec(clean_guest, f"echo $$; for i in $(seq {N}); do /bin/true & echo $!; wait; done")
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: detach cleanly
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    shell, *pids = (int(x) for x in out.split())
    lines = [json.loads(line) for line in stdout.splitlines()]
    events = [x["event"] for x in lines if "event" in x]
    stats = lines[-1]["stats"]
    execs = {e["pid"]: e for e in events if e["kind"] == "exec" and e["detail"].get("path") == "/bin/true"}
    assert set(execs) == set(pids), (pids, sorted(execs))
    for pid in pids:
        e = execs[pid]
        assert e["ppid"] == shell and e["error"] == ""
        assert e["detail"]["argv"] == ["/bin/true"]
        assert e["detail"]["file"].endswith("/busybox")  # /bin/true is a link to busybox
        ident = e["detail"]["identity"]  # hashed from its page tables at its do_exit
        assert (ident["package"], ident["version"], ident["path"]) == ("busybox-static", busybox, "/bin/busybox")
        assert ident["identified_pages"] > 0 and not ident["capped"]
    exits = {e["pid"] for e in events if e["kind"] == "exit" and e["comm"] == "true"}
    assert exits == set(pids)
    ident_ms = [execs[p]["detail"]["identity"]["identify_ms"] for p in pids]
    exit_ms = [1000 * e["paused_s"] for e in events if e["kind"] == "exit" and e["pid"] in execs]
    print(f"identify ms: max {max(ident_ms):.2f} mean {sum(ident_ms) / N:.2f}; exit pause ms: max "
          f"{max(exit_ms):.2f} mean {sum(exit_ms) / N:.2f}; pages {execs[pids[0]]['detail']['identity']}")
    assert max(ident_ms) < 500
    assert stats["events"] == len(events) and stats["decode_errors"] == 0 and not stats["gaps"]
    assert _running(clean_guest)


def test_exec_only_watch_identifies_a_live_process_at_the_next_stop(clean_guest) -> None:
    busybox = _busybox_in_kb(clean_guest)
    proc, _ = _start_watcher(clean_guest.name, "--events", "exec", "--duration", "12")
    try:
        out = _guest_exec(clean_guest, "sleep 4 & echo $!; sleep 1; /bin/true & echo $!; wait")
    finally:
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    sleeper, short = (int(x) for x in out.split())
    execs = {x["event"]["pid"]: x["event"] for x in map(json.loads, stdout.splitlines()) if "event" in x}
    ident = execs[sleeper]["detail"]["identity"]  # identified at a later exec, while it slept
    assert (ident.get("package"), ident.get("version")) == ("busybox-static", busybox), ident
    assert "exited before" in execs[short]["detail"]["identity"]["unverifiable"]  # no exit trapped


def test_trap_method_sees_a_module_load_and_records_overhead(clean_guest, clean_image) -> None:
    kernel = clean_image.meta["kernel"]
    ko = Path(kernel["source"]).parent.parent / "lib" / "modules" / kernel["release"] / "kernel/lib/crc7.ko"
    if not ko.is_file():
        pytest.skip(f"{ko} is not unpacked here")
    # the lab image has only modules it loads at boot: bring a harmless one from the same kernel package
    with GuestAgent(clean_guest.qga_socket, timeout=60) as agent:
        handle = agent.call("guest-file-open", path="/tmp/crc7.ko", mode="w")
        agent.call("guest-file-write", handle=handle, **{"buf-b64": base64.b64encode(ko.read_bytes()).decode()})
        agent.call("guest-file-close", handle=handle)
    method = TrapMethod(window=12.0)
    worker = threading.Thread(target=lambda: (time.sleep(2.0), _guest_exec(
        clean_guest, "insmod /tmp/crc7.ko && rmmod crc7 && /bin/true")))
    worker.start()
    obs = list(method.collect(resolve_target(clean_guest.name)))
    worker.join()
    loads = [o for o in obs if o.kind == "module-load"]
    assert [o.data["name"] for o in loads] == ["crc7"]
    assert loads[0].data["core_size"] > 0 and str(loads[0].verdict) == "verified"
    true = [o for o in obs if o.kind == "exec" and o.data["path"] == "/bin/true"]
    assert true and true[0].data["identity"]["package"] == "busybox-static"
    assert not any(o.kind == "exit" for o in obs)  # trapped for identification, not reported
    stats = next(o for o in obs if o.kind == "trap-stats").data
    assert stats["events"] >= 3 and stats["attach_s"] < 5 and stats["mean_paused_ms"] < 500
    assert method.last_stats == stats
    assert _running(clean_guest)


def test_killed_watcher_leaves_the_guest_running_without_breakpoints(clean_guest) -> None:
    proc, ready = _start_watcher(clean_guest.name, "--events", "exec")
    proc.send_signal(signal.SIGKILL)  # no chance to detach: the guard process must repair
    proc.wait(timeout=10)
    assert _guest_exec(clean_guest, "/bin/echo alive", timeout=60).strip() == "alive"
    assert _running(clean_guest)
    _assert_no_breakpoint(clean_guest, int(ready["hooks"]["exec"], 16))


def _assert_no_breakpoint(guest: Any, hook: int) -> None:
    """Attach without inserting anything, exec in the guest, and expect no stop (and no stop at `hook`)."""
    stub = GdbStub("127.0.0.1", guest.gdb_port)
    try:
        stub.cont()
        done = threading.Thread(target=_guest_exec, args=(guest, "/bin/true"))
        done.start()
        stop = stub.wait_stop(8.0)
        assert stop is None or stub.registers()["rip"] != hook, "a breakpoint survived the watcher"
        done.join(timeout=60)
    finally:
        stub.detach()
        stub.close()


def test_qemu_keeps_breakpoints_after_a_dropped_connection_so_the_guard_is_needed(clean_guest) -> None:
    with open_memory(clean_guest.ram_path) as phys:
        hook = KernelReader(phys).syms.get("begin_new_exec")
    stub = GdbStub("127.0.0.1", clean_guest.gdb_port)
    stub.insert_breakpoint(hook)
    stub.cont()
    stub.close()  # dropped without `D`, like a crash with no guard
    worker = threading.Thread(target=_guest_exec, args=(clean_guest, "/bin/true"))
    try:
        time.sleep(0.5)
        worker.start()
        time.sleep(3.0)
        with Qmp(clean_guest.qmp_socket) as qmp:
            status = qmp.command("query-status")["status"]
    finally:
        assert repair("127.0.0.1", clean_guest.gdb_port)  # what the guard does
    worker.join(timeout=60)
    assert status == "debug", "QEMU no longer keeps breakpoints after a disconnect; the guard may be moot"
    assert _running(clean_guest)
    assert os.path.exists(clean_guest.qga_socket)
