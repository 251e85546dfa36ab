"""Identify what a trapped process executes: hash its present user executable pages, look them up in the code-page DB.

The walk, hashing and grouping into images are the `arch` method's (`arch._scan_space`), applied to one address
space whose root comes from the kernel (`mm->pgd`) instead of a RAM-wide root scan. When a trapped process is
identified is `exectrack.ExecTracker`'s business.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from nephoscope.core.errors import GuestDataError, KnowledgeError, MemoryAccessError
from nephoscope.introspect.arch import (
    CodePageLookup,
    Image,
    ScanStats,
    SpaceReport,
    _DigestCache,
    _FileCache,
    _scan_space,
)
from nephoscope.knowledge.pagehash import PAGE_SIZE
from nephoscope.memory.paging import Budget
from nephoscope.memory.physical import PhysicalMemory
from nephoscope.memory.roots import Root, _pti_twin

MAX_PAGES = 2048  # pages hashed per identification: bounds the pause of one event
MAX_TABLES = 512
Errors = (MemoryAccessError, GuestDataError)


def open_kb(path: Path | None = None) -> tuple[CodePageLookup | None, str]:
    """Open and warm the code-page DB; return (db, "") or (None, why it cannot identify anything)."""
    from nephoscope.knowledge.binaries import CodePageDB

    try:
        db = CodePageDB.open(path)
        if db.stats().pages == 0:
            db.close()
            return None, f"no code-page DB (empty: {db.path}; run `nephoscope kb ingest`)"
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
        self.files = _FileCache(db)  # a file's pages do not change during a watch
        self.ram_end = max((e for _, e in phys.ranges), default=0)

    def identify(self, pgd_gpa: int, exec_path: str = "") -> dict[str, Any]:
        """Return the identity of the address space rooted at `pgd_gpa` (see `identity_dict`)."""
        if self.db is None:
            return {"unverifiable": self.reason}
        if not 0 <= pgd_gpa < self.ram_end:
            return {"unverifiable": f"mm->pgd {pgd_gpa:#x} is outside RAM"}
        t = time.perf_counter()
        stats = ScanStats()
        try:
            report = _scan_space(self.phys, self._root(pgd_gpa), self.levels, self.db, _DigestCache(self.phys, stats),
                                 self.files, stats, [], Budget(MAX_TABLES, self.max_pages))
        except Errors as exc:
            return {"unverifiable": f"page tables unreadable: {exc}"}
        out = identity_dict(report, exec_path)
        out["identify_ms"] = round(1000 * (time.perf_counter() - t), 3)
        return out

    def _root(self, gpa: int) -> Root:
        """Return the root user mode runs on: the PTI twin if there is one (the kernel copy maps user pages NX)."""
        twin = None
        if gpa % (2 * PAGE_SIZE) == 0:
            page = np.frombuffer(self.phys.read(gpa, PAGE_SIZE), dtype="<u8")
            twin = _pti_twin(self.phys, gpa, page, self.ram_end)
        return Root(gpa, twin or gpa, 0)


def _image_dict(im: Image) -> dict[str, Any]:
    c = im.candidates[0]
    return {"path": c.path, "package": c.package, "version": c.version, "pages": im.pages,
            "versions": sorted({v for _, v in im.versions}), "modified_pages": len(im.modified)}


def _is_main(im: Image, exec_path: str) -> bool:
    base = exec_path.rsplit("/", 1)[-1]
    return bool(base) and any(c.path == exec_path or c.path.rsplit("/", 1)[-1] == base for c in im.candidates)


def identity_dict(report: SpaceReport, exec_path: str = "") -> dict[str, Any]:
    """Summarise one address space: the main binary (path match, else most pages) and page counts."""
    images = sorted(report.images, key=lambda im: -im.pages)
    known = sum(im.pages for im in images)
    vdso = (report.vdso.gva_end - report.vdso.gva_start) // PAGE_SIZE if report.vdso else 0
    out: dict[str, Any] = {"identified_pages": known, "unknown_pages": report.exec_pages - known - vdso,
                           "exec_pages": report.exec_pages, "capped": bool(report.anomalies.get("work-cap")),
                           "images": [_image_dict(im) for im in images]}
    main = next((im for im in images if _is_main(im, exec_path)), images[0] if images else None)
    if main is None:
        out["unverifiable"] = "no executable page matches the code-page DB"
    else:
        out.update({k: v for k, v in _image_dict(main).items() if k in ("path", "package", "version", "versions")})
    return out
