"""Identifying trapped processes: a synthetic address space against a fake code-page DB, and the exec tracker."""

from __future__ import annotations

from test_arch import BIN, _guest

from nephoscope.introspect.exectrack import ExecTracker
from nephoscope.introspect.identify import Identifier
from nephoscope.introspect.trap import TrapEvent


def _identifier(max_pages: int = 2048) -> tuple[Identifier, dict[str, int]]:
    g, db, roots = _guest()
    return Identifier(g.s.phys(), 4, db, max_pages=max_pages), roots


def test_identity_names_the_exec_path_image_with_every_version() -> None:
    ident, roots = _identifier()
    got = ident.identify(roots["clean"], "/usr/bin/prog")
    assert (got["path"], got["package"], got["versions"]) == ("/usr/bin/prog", "prog", ["1.0", "1.0+b1"])
    assert got["identified_pages"] == len(BIN) + 3 and got["unknown_pages"] == 0 and not got["capped"]
    assert ident.identify(roots["clean"], "/usr/lib/libx.so")["package"] == "libx"  # path match beats size


def test_identity_through_a_pti_kernel_pgd_and_unknown_code() -> None:
    ident, roots = _identifier()
    assert ident.identify(roots["pti"])["package"] == "prog"  # user pages are NX in the kernel copy
    got = ident.identify(roots["injected"], "/usr/bin/prog")
    assert got["package"] == "prog" and got["unknown_pages"] == 3


def test_identity_is_capped_and_reports_it() -> None:
    ident, roots = _identifier(max_pages=2)
    assert ident.identify(roots["clean"])["capped"]


def test_no_kb_is_unverifiable_not_a_crash() -> None:
    g, _, roots = _guest()
    got = Identifier(g.s.phys(), 4, None, "no code-page DB").identify(roots["clean"])
    assert got == {"unverifiable": "no code-page DB"}


def test_tracker_delivers_an_exec_at_once_and_its_identity_after_its_exit() -> None:
    ident, roots = _identifier()
    tracker = ExecTracker(ident, lambda mm: roots["clean"] if mm == 0x1000 else roots["injected"])
    ex = TrapEvent("exec", 1.0, pid=7, detail={"path": "/usr/bin/prog"}, seq=3)
    tracker.on_exec(ex, task=0xAA, old_mm=0x900, new_mm=0x1000)
    assert tracker.take(ex) == [ex]  # not held (defect 1): printed before its process is identified
    other = TrapEvent("exit", 1.5, pid=8)
    tracker.on_exit(other, 0x2000)
    assert tracker.take(other) == [other]
    done = TrapEvent("exit", 2.0, pid=7)
    tracker.on_exit(done, 0x1000)
    out = tracker.take(done)
    assert [e.kind for e in out] == ["exit", "identity"]
    record = out[1]
    assert (record.pid, record.detail["exec_seq"], record.detail["exec_time"]) == (7, 3, 1.0)
    assert record.detail["identity"]["package"] == "prog"
    assert "identity" not in ex.detail  # the exec record, already delivered, is not changed afterwards


def test_tracker_end_of_window_identifies_live_processes_only() -> None:
    ident, roots = _identifier()
    tracker = ExecTracker(ident, lambda mm: roots["clean"])
    alive, gone = TrapEvent("exec", 1.0, pid=7), TrapEvent("exec", 1.0, pid=9)
    tracker.on_exec(alive, 0xA, None, 0x1000)
    tracker.on_exec(gone, 0xB, None, 0x3000)
    out = {e.pid: e for e in tracker.finish(lambda task, pid: 0x1000 if task == 0xA else None)}
    assert set(out) == {7, 9} and {e.kind for e in out.values()} == {"identity"}
    assert out[7].detail["identity"]["package"] == "prog"
    assert "exited before" in out[9].detail["identity"]["unverifiable"]


def test_eager_tracker_identifies_at_the_next_stop_when_exit_is_not_trapped() -> None:
    ident, roots = _identifier()
    tracker = ExecTracker(ident, lambda mm: roots["clean"], eager=True)
    first, second = TrapEvent("exec", 1.0, pid=7), TrapEvent("exec", 2.0, pid=8)
    tracker.on_exec(first, 0xA, None, 0x1000)
    tracker.on_stop(lambda task, pid: 0x1000)  # the next hit: pid 7 still runs
    tracker.on_exec(second, 0xB, None, 0x2000)
    out = tracker.take(second)
    assert [(e.kind, e.pid) for e in out] == [("exec", 8), ("identity", 7)]
    assert out[1].detail["identity"]["package"] == "prog"


def test_eager_tracker_waits_while_the_new_image_has_no_code_mapped() -> None:
    g, db, roots = _guest()
    empty = g.process()  # exec'd but not yet scheduled: no user page present
    tracker = ExecTracker(Identifier(g.s.phys(), 4, db), lambda mm: empty if mm == 1 else roots["clean"], eager=True)
    ev = TrapEvent("exec", 1.0, pid=7)
    tracker.on_exec(ev, 0xA, None, 1)
    tracker.on_stop(lambda task, pid: 1)
    assert tracker.pending and tracker.take(None) == []
