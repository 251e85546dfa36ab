"""evaluate fills the KB (`kb sync`) of the guests it scores: disk profiles by default, all or none on request."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from nephoscope.service import evaluate as ev


@pytest.mark.parametrize(("sync_kb", "synced"), [(None, ["server"]), (True, ["clean", "server"]), (False, [])])
def test_which_guests_are_synced_before_scoring(monkeypatch: pytest.MonkeyPatch, sync_kb: bool | None,
                                                synced: list[str]) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(ev, "_guest", lambda profile, keep, progress: (SimpleNamespace(profile=profile,
                                                                                       name=f"eval-{profile}"), False))
    monkeypatch.setattr(ev, "sync_guest_kb", lambda guest, progress: calls.append(("sync", guest.profile)))
    monkeypatch.setattr(ev, "score_guest", lambda guest, methods, **_kw: calls.append(("score", guest.profile)) or [])
    assert ev.evaluate(["agent"], ("clean", "server"), slowdown=False, sync_kb=sync_kb) == []
    assert [p for what, p in calls if what == "sync"] == synced
    for profile in synced:  # the sync comes before that guest's scores
        assert calls.index(("sync", profile)) < calls.index(("score", profile))


def test_a_second_evaluation_gets_its_own_guest_name(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holding eval-clean (a running evaluation) makes this one use eval-clean-PID."""
    import subprocess
    import sys

    monkeypatch.setenv("NEPHOSCOPE_RUN", str(tmp_path))
    monkeypatch.setattr(ev, "_CLAIMS", {})
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"os.makedirs({str(tmp_path / 'eval-locks')!r}, exist_ok=True)\n"
        f"fd = os.open({str(tmp_path / 'eval-locks' / 'eval-clean.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        import os

        assert ev.claim_name("eval-clean") == f"eval-clean-{os.getpid()}"
        assert ev.claim_name("eval-clean") == f"eval-clean-{os.getpid()}"  # the same process keeps its claim
        assert ev.claim_name("eval-tampered") == "eval-tampered"  # nobody holds that one
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.setattr(ev, "_CLAIMS", {})
    assert ev.claim_name("eval-clean") == "eval-clean"  # released when its holder exited
