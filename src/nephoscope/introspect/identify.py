"""Identify what a trapped process executes: hash its present user executable pages, look them up in the code-page DB.

The walk, hashing and grouping into images are the arch algorithm's (`codepages.identify_space`), applied to one
address space whose root comes from the kernel (`mm->pgd`) instead of a RAM-wide root scan. `ExecTracker` holds each
exec event until its process can be identified: at its `do_exit` (the mm is still intact, the VM is stopped),
when it execs again, or at the end of the watch if it is still alive.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nephoscope.core.errors import GuestDataError, KnowledgeError, MemoryAccessError
from nephoscope.introspect.codepages import (
    CodePageLookup,
    DigestCache,
    FileCache,
    Image,
    ScanStats,
    SpaceReport,
    identify_space,
    main_image,
)
from nephoscope.memory.paging import Budget
from nephoscope.memory.physical import PhysicalMemory
from nephoscope.memory.roots import Root, pti_twin

MAX_PAGES = 2048  # pages hashed per identification: bounds the pause of one event
MAX_TABLES = 512
Errors = (MemoryAccessError, GuestDataError)
KB_HINT = "fill it with `nephoscope kb add-lab` (the lab's packages) or `nephoscope kb add PACKAGE.deb`"


class Event(Protocol):
    """What the tracker needs of a trapped event (nephoscope.introspect.trap.TrapEvent)."""

    kind: str
    pid: int | None
    detail: dict[str, Any]
    error: str


def open_kb(path: Path | None = None) -> tuple[CodePageLookup | None, str]:
    """Open and warm the code-page DB; return (db, "") or (None, why it cannot identify anything)."""
    from nephoscope.knowledge.binaries import CodePageDB

    try:
        db = CodePageDB.open(path)
        if db.stats().pages == 0:
            db.close()
            return None, f"no code-page DB (empty: {db.path}; {KB_HINT})"
        db.lookup_digests([bytes(32)])  # builds the in-memory index now, not during the first pause
    except (KnowledgeError, OSError) as exc:
        return None, f"no code-page DB ({exc})"
    return db, ""


class Identifier:
    """Identify the code mapped in one address space (reads the RAM file only, no gdb packets)."""

    def __init__(self, phys: PhysicalMemory, levels: int, db: CodePageLookup | None, reason: str = "",
                 max_pages: int = MAX_PAGES) -> None:
        self.phys, self.levels, self.db, self.max_pages = phys, levels, db, max_pages
        self.reason = reason or "no code-page DB"
        self.files = FileCache(db)  # a file's pages do not change during a watch
        self.ram_end = max((e for _, e in phys.ranges), default=0)

    def identify(self, pgd_gpa: int, exec_path: str = "") -> dict[str, Any]:
        """Return the identity of the address space rooted at guest-physical `pgd_gpa` (see `identity_dict`)."""
        if self.db is None:
            return {"unverifiable": self.reason}
        if not 0 <= pgd_gpa < self.ram_end:
            return {"unverifiable": f"mm->pgd {pgd_gpa:#x} is outside RAM"}
        t = time.perf_counter()
        stats = ScanStats()
        try:
            report = identify_space(self.phys, self._root(pgd_gpa), self.levels, self.db,
                                    Budget(MAX_TABLES, self.max_pages), digests=DigestCache(self.phys, stats),
                                    files=self.files, stats=stats)
        except Errors as exc:
            return {"unverifiable": f"page tables unreadable: {exc}"}
        out = identity_dict(report, exec_path)
        out["identify_ms"] = round(1000 * (time.perf_counter() - t), 3)
        return out

    def _root(self, gpa: int) -> Root:
        """Return the root user mode runs on: the PTI twin if there is one (the kernel copy maps user pages NX)."""
        twin = pti_twin(self.phys, gpa, ram_end=self.ram_end)
        return Root(gpa, twin or gpa, 0)


def _image_dict(im: Image) -> dict[str, Any]:
    c = im.candidates[0]
    return {"path": c.path, "package": c.package, "version": c.version, "pages": im.pages,
            "versions": sorted({v for _, v in im.versions}), "modified_pages": len(im.modified)}


def identity_dict(report: SpaceReport, exec_path: str = "") -> dict[str, Any]:
    """Summarise one address space: its main binary (`codepages.main_image`) and page counts."""
    images = sorted(report.images, key=lambda im: -im.pages)
    known = sum(im.pages for im in images)
    vdso = report.vdso.pages if report.vdso else 0
    out: dict[str, Any] = {"identified_pages": known, "unknown_pages": report.exec_pages - known - vdso,
                           "exec_pages": report.exec_pages, "capped": bool(report.anomalies.get("work-cap")),
                           "images": [_image_dict(im) for im in images]}
    main = main_image(report.images, report.unknown, exec_path)
    if main is None:
        out["unverifiable"] = "no executable page matches the code-page DB"
    elif not isinstance(main, Image):
        out["unverifiable"] = (f"the main program ({main.pages} page(s) at {main.gva_start:#x}) matches no file in "
                               "the code-page DB: unknown code")
    else:
        out.update({k: v for k, v in _image_dict(main).items() if k in ("path", "package", "version", "versions")})
    return out


@dataclass(slots=True)
class _Pending:
    ev: Event
    task: int
    mm: int


@dataclass(slots=True)
class ExecTracker:
    """Hold exec events until their process is identified; hand them back in order for delivery."""

    ident: Identifier
    pgd_of: Callable[[int], int]  # mm_struct gva → gpa of its pgd (raises on unreadable memory)
    eager: bool = False  # `exit` is not trapped: identify at the next stop instead of waiting for the exit
    pending: dict[int, _Pending] = field(default_factory=dict)
    ready: list[Event] = field(default_factory=list)

    def _resolve(self, p: _Pending, mm: int | None, why: str = "", *, need_code: bool = False) -> bool:
        """Identify `p` in `mm` and queue it; with `need_code`, leave it pending (False) while nothing runs yet."""
        if mm is None:
            ident: dict[str, Any] = {"unverifiable": why}
        else:
            try:
                ident = self.ident.identify(self.pgd_of(mm), p.ev.detail.get("file") or p.ev.detail.get("path", ""))
            except Errors as exc:
                ident = {"unverifiable": f"mm unreadable: {exc}"}
            if need_code and ident.get("exec_pages") == 0:  # not scheduled since the exec: nothing mapped yet
                return False
        p.ev.detail["identity"] = ident
        self.ready.append(p.ev)
        return True

    def on_exec(self, ev: Event, task: int | None, old_mm: int | None, new_mm: int | None) -> None:
        """At begin_new_exec (VM stopped): identify the previous image of this pid (its mm is still current)."""
        old = self.pending.pop(ev.pid or 0, None)
        if old is not None:
            self._resolve(old, old_mm if old_mm == old.mm else None, "exec'd again; old mm not current")
        if ev.error or task is None or not new_mm:
            ev.detail["identity"] = {"unverifiable": ev.error or "the new mm could not be read"}
            self.ready.append(ev)
        else:
            self.pending[ev.pid or 0] = _Pending(ev, task, new_mm)

    def on_exit(self, ev: Event, mm: int | None) -> None:
        """At do_exit (VM stopped, mm intact): identify the pending exec of this pid."""
        p = self.pending.get(ev.pid or 0)
        if p is not None and mm == p.mm:
            del self.pending[ev.pid or 0]
            self._resolve(p, mm)

    def take(self, ev: Event | None) -> list[Event]:
        """Return the events to deliver now (after resuming): resolved execs, then `ev` unless it is held."""
        out, self.ready = self.ready, []
        held = ev is not None and ev.pid in self.pending and self.pending[ev.pid or 0].ev is ev
        if ev is not None and not held and all(e is not ev for e in out):
            out.append(ev)
        return out

    def on_stop(self, alive_mm: Callable[[int, int], int | None]) -> None:
        """At any hit when `eager` (VM stopped): identify pending processes now, while they may still live."""
        if self.eager:
            self.finish(alive_mm, keep=True)

    def finish(self, alive_mm: Callable[[int, int], int | None], keep: bool = False) -> list[Event]:
        """At the end of the watch (guest running): identify still-alive processes, give up on the others.

        `alive_mm(task, pid)` returns the task's current mm if it still is that pid, else None.
        With `keep`, the resolved events stay queued for the next `take`."""
        for pid, p in list(self.pending.items()):
            try:
                mm = alive_mm(p.task, pid)
            except Errors:
                mm = None
            if self._resolve(p, mm if mm == p.mm else None,
                             "exited before it could be identified (watch `exit` events too)", need_code=keep):
                del self.pending[pid]
        return [] if keep else self.take(None)
