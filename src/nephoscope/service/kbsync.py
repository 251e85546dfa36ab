"""`kb sync` as a use case: scan a VM, fill the code-page KB from what it maps, scan again (CLI, scan, evaluate)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from nephoscope.knowledge.binaries import CodePageDB
from nephoscope.knowledge.debian.contents import ContentsIndex
from nephoscope.knowledge.sync import SyncReport, mark_unverifiable, sync
from nephoscope.service.scan import ScanResult, save_result, scan_vm
from nephoscope.store.sqlite import Store

SYNC_METHODS = "inspect,agent,arch"
SYNC_ROUNDS = 3


def sync_and_rescan(vm: str, methods: list[str] | None, jobs: int, log: Callable[[str], None], *,
                    save: bool = False, symbols: Path | None = None) -> tuple[ScanResult, SyncReport, ScanResult]:
    """Scan `vm`, ingest what it maps (kb sync), scan again with the unverifiable rule; return both and the sync.

    The KB is the default one (NEPHOSCOPE_KB, else the cache's). A guest that is still starting maps new
    files between scans: the sync repeats on the new scan's hints (at most SYNC_ROUNDS scans after the
    first) until a scan brings no package version the KB lacks. The methods pause the VM as in `scan`."""
    first = scan_vm(vm, methods, save=False, symbols=symbols, progress=log)
    log("reading the archive's Contents index")
    contents = ContentsIndex.open()
    db = CodePageDB.open()
    total = sync(db, first.observations, contents=contents, jobs=jobs, progress=log)
    result = first
    started = time.time()
    for _ in range(SYNC_ROUNDS):
        started = time.time()
        result = scan_vm(vm, methods, save=False, symbols=symbols, progress=log,
                         refine=lambda obs: mark_unverifiable(obs, db, contents))
        again = sync(db, result.observations, contents=contents, jobs=jobs, progress=log)
        total.merge(again)
        if not again.ingest.packages:
            break
        log(f"{len(again.ingest.packages)} more package versions mapped since the last scan; scanning again")
    if save:
        save_result(result, Store(), started)
    return first, total, result
