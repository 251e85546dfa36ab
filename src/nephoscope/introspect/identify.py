"""Identify what a trapped process executes: hash its present user executable pages, look them up in the code-page DB.

The walk, hashing and grouping into images are the arch algorithm's (`codepages.identify_space`), applied to one
address space whose root comes from the kernel (`mm->pgd`) instead of a RAM-wide root scan. When a trapped process is
identified is `exectrack.ExecTracker`'s business.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

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
