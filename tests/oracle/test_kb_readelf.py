"""Our executable segments, page layout and build-ids against binutils' `readelf` on real binaries."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nephoscope.knowledge.elfpages import exec_pages
from nephoscope.knowledge.pagehash import PAGE_SIZE

BINARIES = ["/usr/bin/bash", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2",
            "/usr/lib/x86_64-linux-gnu/libz.so.1", "/usr/bin/python3"]
_LOAD = re.compile(r"^\s*LOAD\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+0x[0-9a-f]+\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)"
                   r"\s+([RWE ]+?)\s+0x[0-9a-f]+\s*$")


def _readelf(*args: str) -> str:
    if shutil.which("readelf") is None:
        pytest.skip("binutils readelf is not installed")
    return subprocess.run(["readelf", "-W", *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("name", BINARIES)
def test_exec_segments_and_pages_match_readelf(name: str) -> None:
    path = Path(name).resolve()
    if not path.is_file():
        pytest.skip(f"{name} is not on this host")
    want = []
    for line in _readelf("-l", str(path)).splitlines():
        m = _LOAD.match(line)
        if m and "E" in m.group(5):
            want.append(tuple(int(m.group(i), 16) for i in range(1, 5)))
    assert want, "readelf shows no executable LOAD segment; the regex or the binary is off"
    elf = exec_pages(path.read_bytes())
    assert [(s.file_offset, s.vaddr, s.filesz, s.memsz) for s in elf.segments] == want
    expected_pages = []
    for offset, vaddr, filesz, _memsz in want:
        first = offset - offset % PAGE_SIZE
        for page in range(first, offset + filesz, PAGE_SIZE):
            expected_pages.append((page, vaddr - offset + page))
    assert [(p.file_offset, p.vaddr) for p in elf.pages] == expected_pages

    notes = _readelf("-n", str(path))
    m = re.search(r"Build ID:\s*([0-9a-f]+)", notes)
    assert elf.build_id == (m.group(1) if m else None)
