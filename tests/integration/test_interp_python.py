"""The CPython reader on the real interp guest: stacks read from the host equal py-spy's in the guest.

The guest is paused while nephoscope reads all Python stacks, then resumed, then `py-spy dump` runs
inside it through the agent: the processes are idle (they sleep in known functions), so both views are
of the same instant. The lab's manifest says which processes are Python and what each started.
"""

from __future__ import annotations

import re

import pytest

from nephoscope.core.records import Verdict
from nephoscope.hypervisor.control import paused
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.hypervisor.qmp import Qmp
from nephoscope.introspect.interp import read_interpreters
from nephoscope.introspect.kernel import open_kernel
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest

PYSPY_THREAD = re.compile(r'^Thread (\d+) \(\w+\)(?:: "(.*)")?')
PYSPY_FRAME = re.compile(r"^\s+(\S+) \((.+):(\d+)\)$")


def pyspy_stacks(agent: GuestAgent, pid: int) -> dict[int, list[tuple[str, str, int]]]:
    """Return {native tid: [(function, file basename, line)]} from `py-spy dump` inside the guest; the thread's
    name (when py-spy prints one) is the first item, as ("name", NAME, 0)."""
    code, out, err = agent.exec(["/usr/local/bin/py-spy", "dump", "--pid", str(pid)], timeout=120)
    assert code == 0, err.decode(errors="replace")
    stacks: dict[int, list[tuple[str, str, int]]] = {}
    current: list[tuple[str, str, int]] = []
    for line in out.decode().splitlines():
        if m := PYSPY_THREAD.match(line):
            current = stacks.setdefault(int(m.group(1)), [("name", m.group(2) or "", 0)])
        elif m := PYSPY_FRAME.match(line):
            current.append((m.group(1), m.group(2).rsplit("/", 1)[-1], int(m.group(3))))
    return stacks


@pytest.fixture(scope="module")
def python_views(interp_guest):  # type: ignore[no-untyped-def]
    vm = resolve_target(interp_guest.name)
    with open_kernel(vm) as k, Qmp(vm.qmp_socket) as qmp:
        with paused(qmp):
            k.kernel.flush()
            results = read_interpreters(k, kinds=("python",))
        assert qmp.command("query-status")["running"]  # resumed
    with GuestAgent(vm.qga_socket, timeout=120) as agent:
        spy = {r.pid: pyspy_stacks(agent, r.pid) for r in results}
    return interp_guest.manifest(), results, spy


def test_every_python_process_is_read_and_verified(python_views) -> None:  # type: ignore[no-untyped-def]
    manifest, results, _spy = python_views
    want = {p["pid"] for p in manifest["processes"] if p["binary"] == "/usr/bin/python3.11"}
    got = {r.pid: r for r in results}
    assert want and want <= set(got), (want, set(got))
    for pid in want:
        assert got[pid].verdict is Verdict.VERIFIED, got[pid].reason
        assert got[pid].runtime.startswith("CPython 3.11 (python3.11-minimal ")


def test_entry_scripts_are_what_the_lab_started(python_views) -> None:  # type: ignore[no-untyped-def]
    manifest, results, _spy = python_views
    got = {r.pid: r for r in results}
    for proc in manifest["processes"]:
        if proc["tag"] == "orphan":
            assert got[proc["pid"]].entry == "/opt/orphan/worker.py"
            assert "/opt/orphan/worker.py" in got[proc["pid"]].scripts
        if proc["tag"] == "webapp":
            assert got[proc["pid"]].entry == "/usr/bin/gunicorn"
    orphan = next(got[p["pid"]] for p in manifest["processes"] if p["tag"] == "orphan")
    stacks = {th.frames[0].function: th.frames[0].line for th in orphan.threads}
    assert stacks == {"wait_for_work": 16, "heartbeat": 11}  # the profile's ground truth
    workers = [r for r in results if r.entry == "/usr/bin/gunicorn" and
               any(f.function == "SyncWorker.wait" for th in r.threads for f in th.frames)]
    assert len(workers) == 2  # --workers 2
    assert any("/opt/webapp/app.py" in r.scripts for r in workers)  # the Flask app module is loaded


def test_stacks_equal_pyspy_in_the_guest(python_views) -> None:  # type: ignore[no-untyped-def]
    _manifest, results, spy = python_views
    for r in results:
        ours = {th.native_id: [("name", th.name, 0)] + [(f.function.rsplit(".", 1)[-1], f.file.rsplit("/", 1)[-1],
                                                         f.line) for f in th.frames] for th in r.threads}
        assert ours == spy[r.pid], (r.pid, ours, spy[r.pid])


def test_scripts_identified_by_page_cache_hash(interp_guest, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nephoscope.analysis.scripts import UNKNOWN_SCRIPT
    from nephoscope.knowledge.scripts import ScriptDB, ingest_package
    from nephoscope.lab.build import build_image
    from nephoscope.lab.profile import load_profile
    from nephoscope.service.scripts import scripts_report

    packages = build_image(load_profile("interp")).meta["packages"]
    with ScriptDB(tmp_path / "scripts.sqlite") as db:
        for name, version in packages.items():
            if name.startswith(("python3", "libpython3")) or name == "gunicorn":
                ingest_package(db, name, version)
        report = scripts_report(resolve_target(interp_guest.name), db=db)
    assert report.paused
    by_path = {f.path: f for p in report.processes for f in p.files}
    flask = by_path["/usr/lib/python3/dist-packages/flask/__init__.py"]
    assert flask.verdict is Verdict.VERIFIED
    version = packages["python3-flask"]
    assert flask.label == f"flask {version.rsplit('-', 1)[0]} (python3-flask {version})"
    unknown = {f.evidence[0]["path"]: f for f in report.findings if f.kind == UNKNOWN_SCRIPT}
    # the script of no package, and the Flask app of the lab (also in no package): nothing else (the lab's
    # Java service jar, of no package either, is the JVM reader's: an unknown script when all its pages are cached;
    # the lab's PHP files, of no package either, are listed by every php-fpm process once the pool has cached them)
    php_lab = {p for p in load_profile("interp").files if p.endswith(".php")}
    assert set(unknown) - {"/opt/javasvc/nph-service.jar"} - php_lab == {"/opt/orphan/worker.py",
                                                                         "/opt/webapp/app.py"}, set(unknown)
    head = unknown["/opt/orphan/worker.py"].evidence[0]["head"]
    assert head[0] == "# nephoscope lab: a Python script that belongs to no package"
    unverifiable = [f for f in by_path.values() if f.verdict is Verdict.UNVERIFIABLE]
    assert all(f.reason for f in unverifiable)


def test_scan_and_report_show_what_interpreters_run(interp_guest) -> None:  # type: ignore[no-untyped-def]
    from nephoscope.service.report import report_from_result
    from nephoscope.service.report_render import render_markdown
    from nephoscope.service.scan import run_scan

    manifest = interp_guest.manifest()
    orphan = next(p["pid"] for p in manifest["processes"] if p["tag"] == "orphan")
    result = run_scan(resolve_target(interp_guest.name), ["inspect"])
    view = result.view.processes[orphan].interpreter
    assert view is not None and view["entry"] == "/opt/orphan/worker.py"
    assert view["unknown"] == ["/opt/orphan/worker.py"]
    assert any(f.kind == "unknown-script" and f.evidence[0]["path"] == "/opt/orphan/worker.py"
               for f in result.view.findings)
    workers = [p for p in result.view.processes.values() if p.interpreter and p.interpreter["entry"] ==
               "/usr/bin/gunicorn"]
    assert len(workers) == 3  # the master and its 2 workers
    text = render_markdown(report_from_result(result))
    assert "## What interpreters run" in text and "/opt/orphan/worker.py" in text
