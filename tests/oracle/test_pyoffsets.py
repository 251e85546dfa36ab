"""Oracle: the shipped CPython offsets table equals what the exact build's DWARF says (python3.11-dbg from apt)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nephoscope.core.errors import KnowledgeError
from nephoscope.core.paths import cache_root
from nephoscope.introspect.interp.pyoffsets import load_table, offsets_from_dwarf
from nephoscope.knowledge.debian import archive


@pytest.mark.parametrize("build_id", sorted(load_table()))
def test_table_matches_the_builds_dwarf(build_id: str) -> None:
    entry = load_table()[build_id]
    try:
        deb = archive.download("python3.11-dbg", entry["version"], cache_root() / "debs")
    except KnowledgeError as exc:
        pytest.skip(f"python3.11-dbg {entry['version']} cannot be downloaded: {exc}")
    root = archive.unpack(deb, cache_root() / "unpacked") / "root"
    debug = root / "usr/lib/debug/.build-id" / build_id[:2] / f"{build_id[2:]}.debug"
    assert debug.is_file(), f"python3.11-dbg {entry['version']} has no debug file for build {build_id}"
    assert offsets_from_dwarf(Path(debug)) == entry["offsets"]
