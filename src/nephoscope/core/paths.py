"""Where nephoscope keeps its files on the host."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Return the cache directory (NEPHOSCOPE_CACHE, default ~/.cache/nephoscope)."""
    return Path(os.environ.get("NEPHOSCOPE_CACHE", Path.home() / ".cache" / "nephoscope"))


def store_path() -> Path:
    """Return the scan store database (NEPHOSCOPE_DB, default <cache>/nephoscope.sqlite)."""
    return Path(os.environ.get("NEPHOSCOPE_DB", cache_root() / "nephoscope.sqlite"))
