"""evaluate fills the KB (`kb sync`) of the guests it scores: disk profiles by default, all or none on request."""

from __future__ import annotations

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
