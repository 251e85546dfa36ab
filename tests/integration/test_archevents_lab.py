"""The archevents TCG plugin on a real lab guest: known binaries identified, a 50 ms unknown binary seen by the
stream and missed by a periodic arch scan, and a page written then executed reported as such.

The guest is this module's own (booted with `arch_events=True`); the unknown binary is compiled here, copied in
through the guest agent (guest-file-write) and run with guest-exec."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.archevents import ArchEventStream
from nephoscope.introspect.identify import open_kb
from nephoscope.introspect.ram import open_ram
from nephoscope.knowledge.elfpages import exec_pages
from nephoscope.lab import runner
from nephoscope.lab.build import build_image
from nephoscope.lab.profile import load_profile

pytestmark = pytest.mark.guest

PROGRAM = r"""
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
static volatile unsigned long sink;
static const char tag[] = "nephoscope-archevents-test-%s";
int main(int argc, char **argv) {
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do {  /* about 50 ms of work, then exit: a periodic scan almost never sees it */
        for (int i = 0; i < 1000; i++) sink += (unsigned long)i ^ (unsigned long)tag[i % 8];
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) < 50000000L);
    if (argc > 1) {  /* write code into a page, run it, overwrite it, run it again */
        unsigned char *p = mmap(0, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        unsigned char code[] = {0xb8, 0x01, 0x00, 0x00, 0x00, 0xc3};  /* mov eax, 1; ret */
        memcpy(p, code, sizeof code);
        int first = ((int (*)(void))p)();
        code[1] = 0x02;
        memcpy(p, code, sizeof code);
        int second = ((int (*)(void))p)();
        printf("%d %d\n", first, second);
    }
    return 0;
}
"""


def _jit_digest(value: int) -> str:
    return hashlib.sha256(bytes([0xB8, value, 0, 0, 0, 0xC3]) + bytes(4090)).hexdigest()


@pytest.fixture(scope="module")
def events_guest() -> Iterator[runner.Guest]:
    name = f"pt-archevents-{__import__('os').getpid() % 100000}"
    guest = runner.start(name, build_image(load_profile("clean")), arch_events=True)
    try:
        yield guest
    finally:
        runner.stop(name, quiet=True)


@pytest.fixture(scope="module")
def unknown_binary(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("archevents")
    (d / "p.c").write_text(PROGRAM.replace("%s", str(time.time_ns())))
    subprocess.run(["gcc", "-O1", "-static", "-o", str(d / "p"), str(d / "p.c")], check=True)
    return (d / "p").read_bytes()


def _copy_in(agent: GuestAgent, data: bytes, path: str) -> None:
    handle = agent.call("guest-file-open", path=path, mode="w")
    try:
        for off in range(0, len(data), 48 * 1024):
            chunk = base64.b64encode(data[off:off + 48 * 1024]).decode()
            agent.call("guest-file-write", handle=handle, **{"buf-b64": chunk})
    finally:
        agent.call("guest-file-close", handle=handle)
    code, _out, err = agent.exec(["/bin/busybox", "chmod", "755", path])
    assert code == 0, err


def _target(guest: runner.Guest) -> VmTarget:
    return VmTarget(name=guest.name, ram_path=guest.ram_path, qmp_socket=guest.qmp_socket,
                    qga_socket=guest.qga_socket, qemu_pid=guest.pid)


def test_stream_identifies_known_code_and_reports_a_50ms_binary_a_periodic_scan_misses(
        events_guest: runner.Guest, unknown_binary: bytes, default_kb: None) -> None:
    manifest = events_guest.manifest()
    target = _target(events_guest)
    phys = open_ram(target)
    db, why = open_kb()
    assert db is not None, why
    stream = ArchEventStream(events_guest.arch_events_socket, phys, db)
    stream.connect()
    done = threading.Event()
    results: list[object] = []

    def guest_work() -> None:  # runs while the main thread reads the stream (the KB is this thread's)
        try:
            deadline = time.monotonic() + 60
            while not stream.replay_done and time.monotonic() < deadline:
                time.sleep(0.1)
            with GuestAgent(events_guest.qga_socket, timeout=60) as agent:
                _copy_in(agent, unknown_binary, "/tmp/shortlived")
                results.append(agent.exec(["/tmp/shortlived", "jit"], timeout=60))
                results.append(agent.exec(["/usr/bin/sqlite3", "-version"], timeout=60))
            time.sleep(2)  # the plugin sends at once; let the reader drain
        except Exception as exc:  # reported by the assertions below
            results.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=guest_work)
    worker.start()
    try:
        events = list(stream.iter_events(duration=300, should_stop=done.is_set))
        # a periodic arch scan (every 10 s) runs now, after the 50 ms binary exited: it cannot see it
        from nephoscope.introspect.arch import scan_target

        report = scan_target(target)
    finally:
        done.set()
        worker.join(timeout=60)
        stream.close()
        phys.close()
        db.close()
    assert len(results) == 2 and all(isinstance(r, tuple) for r in results), results
    code, out, err = results[0]  # type: ignore[misc]
    assert code == 0 and out.split() == [b"1", b"2"], (code, out, err)
    assert results[1][0] == 0, results[1]  # type: ignore[index]
    assert not stream.ended, stream.ended
    # known binaries: every identified page names a package at the manifest's exact version
    known = [e for e in events if e.verdict == "known"]
    assert len(known) > 500
    packages = manifest["packages"]
    for e in known:
        for image in e.images:
            if image["package"] in packages and len(e.images) == 1:
                assert image["version"] == packages[image["package"]], (e.to_dict(), packages[image["package"]])
    assert any(i["package"] == "sqlite3" and i["version"] == packages["sqlite3"] for e in known for i in e.images)
    # the short-lived unknown binary: its executed pages are reported as unknown user code
    own = {p.digest.hex() for p in exec_pages(unknown_binary).pages}
    seen = [e for e in events if e.digest in own]
    assert seen and all(e.verdict == "unknown" and e.user for e in seen), [e.to_dict() for e in seen]
    # ... and the arch scan after it exited misses it: no address space maps any of its pages
    scanned = {gpa for space in report.spaces for region in space.unknown for gpa in region.gpas}
    assert report.spaces and not ({e.gpa for e in seen} & scanned)
    # a page written then executed: first the code "mov eax,1", then the same page rewritten and run again
    one = [e for e in events if e.digest == _jit_digest(1)]
    two = [e for e in events if e.digest == _jit_digest(2)]
    assert one and two, "the written code pages were not reported"
    assert two[0].kind == "written" and two[0].gpa == one[0].gpa, (one[0].to_dict(), two[0].to_dict())
    assert two[0].verdict == "unknown"


def test_plugin_build_is_cached(events_guest: runner.Guest) -> None:
    from nephoscope.lab.plugin import build_plugin

    first = build_plugin()
    assert first == build_plugin() and first.stat().st_size > 0
    assert str(first) in " ".join(Path(events_guest.directory / "qemu.argv").read_text().split())


def test_watch_arch_streams_pages_as_json(events_guest: runner.Guest, default_kb: None) -> None:
    import json

    from typer.testing import CliRunner

    from nephoscope.cli.main import app

    result = CliRunner().invoke(app, ["watch", "--arch", events_guest.name, "--all", "--json", "-d", "3"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert "TCG only" in lines[0]["ready"]["limit"]
    pages = [x["page"] for x in lines if "page" in x]
    assert {p["verdict"] for p in pages} >= {"known", "kernel"}
    stats = lines[-1]["stats"]
    assert stats["ended"] == "" and stats["records"] >= len(pages) and stats["counts"]["known"] > 500
