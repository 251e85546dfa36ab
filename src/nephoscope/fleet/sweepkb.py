"""One code-page KB for a whole sensor sweep: each distinct page digest is identified once per sweep.

The VMs of a host mostly run the same kernels, libc, ld.so and daemons, so their executable pages carry
the same digests. What is shared, honestly: the KB is opened and its index loaded once per sweep instead
of once per VM, each distinct digest's hits are looked up once (later VMs get the cached tuple), and each
packaged file's page list is read once. What is not: every VM's pages are still read from its own RAM and
hashed (a guest's memory is its own; that a page equals another VM's can only be known by hashing it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nephoscope.knowledge.binaries import PageHit, PageInfo

MAX_DIGESTS = 2_000_000  # per-sweep cache bound (~150 MiB at worst); past it lookups go to the KB uncached


class SweepKb:
    """Wrap an open CodePageDB (anything with lookup_digests/file_pages) with a per-sweep digest cache."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self._hits: dict[bytes, tuple[PageHit, ...]] = {}
        self._files: dict[int, list[PageInfo]] = {}
        self.digests_asked = 0
        self.digests_looked_up = 0
        self.files_asked = 0
        self.files_loaded = 0

    def lookup_shared(self, digests: Sequence[bytes]) -> list[tuple[PageHit, ...]]:
        """Return, per digest, every place the KB knows it (cached for the rest of the sweep)."""
        self.digests_asked += len(digests)
        missing = list(dict.fromkeys(d for d in digests if d not in self._hits))
        if missing:
            inner = getattr(self.db, "lookup_shared", None) or self.db.lookup_digests
            got = [tuple(h) for h in inner(missing)]
            self.digests_looked_up += len(missing)
            if len(self._hits) + len(missing) > MAX_DIGESTS:
                fresh = dict(zip(missing, got, strict=True))
                return [self._hits[d] if d in self._hits else fresh[d] for d in digests]
            self._hits.update(zip(missing, got, strict=True))
        return [self._hits[d] for d in digests]

    def lookup_digests(self, digests: list[bytes]) -> list[list[PageHit]]:
        """Return `lookup_shared` as fresh lists."""
        return [list(h) for h in self.lookup_shared(digests)]

    def file_pages(self, file_id: int) -> list[PageInfo]:
        """Return a packaged file's executable pages (read from the KB once per sweep)."""
        self.files_asked += 1
        got = self._files.get(file_id)
        if got is None:
            got = self._files[file_id] = self.db.file_pages(file_id)
            self.files_loaded += 1
        return got

    def __getattr__(self, name: str) -> Any:  # kernel_store, stats, ...: the KB's own
        return getattr(self.db, name)

    def close(self) -> None:
        """Close the KB (at the end of the sweep)."""
        self.db.close()

    def sharing(self) -> dict[str, int]:
        """Return what the sweep asked for and what reached the KB (`stats` is the KB's own, as codepages wants)."""
        return {"digests_asked": self.digests_asked, "digests_looked_up": self.digests_looked_up,
                "digests_shared": self.digests_asked - self.digests_looked_up, "files_asked": self.files_asked,
                "files_loaded": self.files_loaded}
