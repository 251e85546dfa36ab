"""Follow each trapped exec until its process can be identified, and emit the identity as a second record.

An exec event is delivered at once (at `begin_new_exec` the new image is not mapped yet, so nothing can be
identified then). Its process is identified later — at its `do_exit` (the mm is still intact, the VM is
stopped), when it execs again (the old mm is still current), at the next stop of any kind when `exit` is not
trapped, or at the end of the watch if it is still alive — and the identity follows as an `identity` record
that names its exec (`Event.identity_record`). Identification itself is `identify.Identifier`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nephoscope.core.errors import GuestDataError, MemoryAccessError
from nephoscope.introspect.identify import Identifier

Errors = (MemoryAccessError, GuestDataError)


class Event(Protocol):
    """What the tracker needs of a trapped event (nephoscope.introspect.trap.TrapEvent)."""

    kind: str
    pid: int | None
    detail: dict[str, Any]
    error: str

    def identity_record(self, identity: dict[str, Any]) -> Event:
        """Return the record that carries `identity` for this exec event."""
        ...


@dataclass(slots=True)
class _Pending:
    ev: Event
    task: int
    mm: int


@dataclass(slots=True)
class ExecTracker:
    """Identify the process of each exec once its code runs; queue one identity record per exec."""

    ident: Identifier
    pgd_of: Callable[[int], int]  # mm_struct gva → gpa of its pgd (raises on unreadable memory)
    eager: bool = False  # `exit` is not trapped: identify at the next stop instead of waiting for the exit
    pending: dict[int, _Pending] = field(default_factory=dict)
    ready: list[Event] = field(default_factory=list)  # identity records not yet delivered

    def _resolve(self, p: _Pending, mm: int | None, why: str = "", *, need_code: bool = False) -> bool:
        """Identify `p` in `mm` and queue its record; with `need_code`, leave it pending (False) while nothing runs."""
        if mm is None:
            ident: dict[str, Any] = {"unverifiable": why}
        else:
            try:
                ident = self.ident.identify(self.pgd_of(mm), p.ev.detail.get("file") or p.ev.detail.get("path", ""))
            except Errors as exc:
                ident = {"unverifiable": f"mm unreadable: {exc}"}
            if need_code and ident.get("exec_pages") == 0:  # not scheduled since the exec: nothing mapped yet
                return False
        self.ready.append(p.ev.identity_record(ident))
        return True

    def on_exec(self, ev: Event, task: int | None, old_mm: int | None, new_mm: int | None) -> None:
        """At begin_new_exec (VM stopped): identify the previous image of this pid (its mm is still current)."""
        old = self.pending.pop(ev.pid or 0, None)
        if old is not None:
            self._resolve(old, old_mm if old_mm == old.mm else None, "exec'd again; old mm not current")
        if ev.error or task is None or not new_mm:
            self.ready.append(ev.identity_record({"unverifiable": ev.error or "the new mm could not be read"}))
        else:
            self.pending[ev.pid or 0] = _Pending(ev, task, new_mm)

    def on_exit(self, ev: Event, mm: int | None) -> None:
        """At do_exit (VM stopped, mm intact): identify the pending exec of this pid."""
        p = self.pending.get(ev.pid or 0)
        if p is not None and mm == p.mm:
            del self.pending[ev.pid or 0]
            self._resolve(p, mm)

    def take(self, ev: Event | None) -> list[Event]:
        """Return the records to deliver now (after resuming): `ev` itself, then the identities found meanwhile."""
        out, self.ready = ([ev] if ev is not None else []) + self.ready, []
        return out

    def on_stop(self, alive_mm: Callable[[int, int], int | None]) -> None:
        """At any hit when `eager` (VM stopped): identify pending processes now, while they may still live."""
        if self.eager:
            self.finish(alive_mm, keep=True)

    def finish(self, alive_mm: Callable[[int, int], int | None], keep: bool = False) -> list[Event]:
        """At the end of the watch (guest running): identify still-alive processes, give up on the others.

        `alive_mm(task, pid)` returns the task's current mm if it still is that pid, else None.
        With `keep`, the records stay queued for the next `take`."""
        for pid, p in list(self.pending.items()):
            try:
                mm = alive_mm(p.task, pid)
            except Errors:
                mm = None
            if self._resolve(p, mm if mm == p.mm else None,
                             "exited before it could be identified (watch `exit` events too)", need_code=keep):
                del self.pending[pid]
        return [] if keep else self.take(None)
