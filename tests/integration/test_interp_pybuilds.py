"""A CPython build the shipped table lacks is read like a known one: offsets derived on demand, same stacks.

The clean 6.1 dump's `python3 -m http.server` runs the build the table holds; with the table emptied the
reader has to find that build's Debian version (KB record or apt's versions), fetch its python3.11-dbg and
read the offsets from its DWARF, and the result must equal the table's reading of the same process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nephoscope.core.records import Verdict
from nephoscope.introspect.interp import iter_contexts, pyoffsets
from nephoscope.introspect.interp.python import read_python
from nephoscope.memory.physical import open_memory
from nephoscope.os.linux.model import LinuxKernel

pytestmark = pytest.mark.guest


def test_the_dumps_python_read_with_offsets_derived_on_demand_equals_the_tables_reading(
        clean_dump: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k = LinuxKernel.open(open_memory(clean_dump))
    ctx = next(c for c in iter_contexts(k) if c.task.exe == "/usr/bin/python3.11")
    shipped = read_python(ctx)
    assert shipped is not None and shipped.verdict is Verdict.VERIFIED, shipped
    table = pyoffsets.load_table()
    monkeypatch.setattr(pyoffsets, "load_table", lambda: {})
    monkeypatch.setattr(pyoffsets, "builds_path", lambda: tmp_path / "py-builds.json")
    derived = read_python(ctx)
    assert derived is not None and derived.verdict is Verdict.VERIFIED, derived
    assert (derived.runtime, derived.entry, derived.threads, derived.scripts) == \
        (shipped.runtime, shipped.entry, shipped.threads, shipped.scripts)
    assert "derived on demand" in derived.details["offsets_source"]
    build_id = derived.details["build_id"]
    assert json.loads((tmp_path / "py-builds.json").read_text())[build_id]["offsets"] == table[build_id]["offsets"]
