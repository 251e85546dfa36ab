"""Oracle: the shipped CPython offsets table equals what the exact build's DWARF says (python3.11-dbg from apt)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from nephoscope.core.errors import KnowledgeError, MemoryAccessError
from nephoscope.core.paths import cache_root
from nephoscope.core.records import Verdict
from nephoscope.introspect.interp import builds, pyoffsets, python
from nephoscope.introspect.interp.pyoffsets import load_table, offsets_from_dwarf
from nephoscope.knowledge.debian import archive
from nephoscope.os.linux import pagecache


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


# --- a build the table lacks, derived on demand -------------------------------------------------------

BINARY = "/usr/bin/python3.11"


def _other_build(monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, Path]:
    """Return (version, build id, unpacked binary) of a python3.11-minimal build the table does not hold.

    apt offers the point release and the security update: the one the table lacks; when apt offers only
    the table's, the table is emptied for the test so that build has to be derived like any other.
    """
    table = load_table()
    shipped = {e["version"] for e in table.values()}
    versions = archive.available_versions("python3.11-minimal")
    others = [v for v in versions if v not in shipped]
    if not others:
        monkeypatch.setattr(pyoffsets, "load_table", lambda: {})
        others = list(versions)
    if not others:
        pytest.skip("apt offers no python3.11-minimal")
    version = others[0]
    try:
        deb = archive.download("python3.11-minimal", version, cache_root() / "debs")
    except KnowledgeError as exc:
        pytest.skip(f"python3.11-minimal {version} cannot be downloaded: {exc}")
    binary = archive.unpack(deb, cache_root() / "unpacked") / "root" / BINARY.lstrip("/")
    build_id = builds.elf_build_id(binary)
    assert build_id and build_id not in pyoffsets.load_table()
    return version, build_id, binary


def _gdb_offsets(debug: Path, struct: str, members: list[str]) -> dict[str, int]:
    """Return {member: byte offset} of `struct` as gdb's `ptype/o` prints them (an independent DWARF reader)."""
    out = subprocess.run(["gdb", "-nx", "-batch", "-ex", f"ptype/o struct {struct}", str(debug)],
                         capture_output=True, text=True, timeout=120, check=False).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"/\*\s+(\d+)\s*(?::\s*\d+)?\s*\|\s*\d+\s*\*/\s+.*?\b(\w+)(?:\[\d+\])*;", line)
        if m and m.group(2) in members:
            found.setdefault(m.group(2), int(m.group(1)))
    return found


def _context(binary: Path):  # type: ignore[no-untyped-def]
    """Return a ProcessContext whose only mapping is `binary` at file offset 0 (its bytes as user memory)."""
    data = binary.read_bytes()[:1 << 16]
    base = 0x400000  # Debian's /usr/bin/python3.11 is ET_EXEC, linked at 0x400000: load bias 0
    vma = SimpleNamespace(start=base, end=base + len(data), path=BINARY, offset=0, file_gva=0xFFFF_8880_0000_1000)

    def read(gva: int, size: int) -> bytes:
        if not base <= gva <= gva + size <= base + len(data):
            raise MemoryAccessError(f"0x{gva:x} is not mapped")
        return data[gva - base:gva - base + size]

    task = SimpleNamespace(pid=4242, comm="python3.11")
    return SimpleNamespace(kernel=None, task=task, vmas=[vma], user=None, read=read,
                           u64=lambda gva: int.from_bytes(read(gva, 8), "little")), base


def test_another_build_is_derived_from_its_dbg_package_and_the_reader_takes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    version, build_id, binary = _other_build(monkeypatch)
    monkeypatch.setattr(pyoffsets, "builds_path", lambda: tmp_path / "py-builds.json")
    entry, why = pyoffsets.find_offsets(build_id, BINARY)
    assert entry is not None, why
    assert (entry["package"], entry["version"], entry["build_id"]) == ("python3.11-minimal", version, build_id)
    # the oracle: the dbg package's debug file of this very build, read by pyelftools and by gdb
    root = archive.unpack(archive.download("python3.11-dbg", version, cache_root() / "debs"),
                          cache_root() / "unpacked") / "root"
    debug = root / "usr/lib/debug/.build-id" / build_id[:2] / f"{build_id[2:]}.debug"
    assert entry["offsets"] == offsets_from_dwarf(debug)
    gdb = _gdb_offsets(debug, "_ts", ["prev", "next", "interp", "cframe", "thread_id", "native_thread_id"])
    assert len(gdb) == 6 and gdb == {m: entry["offsets"][f"_ts.{m}"] for m in gdb}
    # cached: the next run reads the file, and it holds exactly this entry
    assert json.loads((tmp_path / "py-builds.json").read_text())[build_id]["offsets"] == entry["offsets"]
    with monkeypatch.context() as m:
        m.setattr(archive, "download", _no_download)
        assert pyoffsets.find_offsets(build_id, BINARY) == (entry, "")
    # the reader names and uses the build: symbols from that version's binary, offsets from its DWARF
    monkeypatch.setattr(pagecache, "read_cached_file", _uncached)
    ctx, base = _context(binary)
    build, bias, path = python.find_build(ctx)  # type: ignore[misc]
    assert (build.build_id, build.version, build.offsets, path) == (build_id, version, entry["offsets"], BINARY)
    assert bias == base - 0x400000 and "derived on demand" in build.source and version in build.label


def _no_download(*args: object, **kwargs: object) -> Path:
    raise AssertionError(f"downloaded {args}")


def _uncached(*args: object, **kwargs: object) -> object:
    raise MemoryAccessError("not in the page cache (test)")


def test_a_corrupt_cache_is_ignored_and_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _version, build_id, _binary = _other_build(monkeypatch)
    cache = tmp_path / "py-builds.json"
    monkeypatch.setattr(pyoffsets, "builds_path", lambda: cache)
    good, why = pyoffsets.find_offsets(build_id, BINARY)
    assert good is not None, why
    for broken in ("{not json", json.dumps([1, 2]),
                   json.dumps({build_id: {**good, "offsets": {**good["offsets"], "_ts.cframe": "56"}}}),
                   json.dumps({build_id: {**good, "offsets": {k: v for k, v in good["offsets"].items()
                                                              if k != "_is.modules"}}})):
        cache.write_text(broken)
        assert pyoffsets.find_offsets(build_id, BINARY) == (good, "")
        assert json.loads(cache.read_text())[build_id]["offsets"] == good["offsets"]


def test_an_unknown_build_id_is_unverifiable_with_what_was_tried_once_per_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _version, _build_id, binary = _other_build(monkeypatch)
    monkeypatch.setattr(pyoffsets, "builds_path", lambda: tmp_path / "py-builds.json")
    unknown = "0b" * 20
    entry, why = pyoffsets.find_offsets(unknown, BINARY)
    assert entry is None and unknown in why and "python3.11-minimal" in why
    for version in archive.available_versions("python3.11-minimal"):
        assert version in why  # every version apt offers was tried (or known) and is named
    monkeypatch.setattr(archive, "download", _no_download)
    assert pyoffsets.find_offsets(unknown, BINARY) == (None, why)
    # through the reader: a CPython whose ELF note carries that build id
    monkeypatch.setattr(pagecache, "read_cached_file", _uncached)
    ctx, _base = _context(binary)
    real = builds.elf_build_id(binary)
    assert real is not None
    head = ctx.read(_base, 1 << 16)
    assert head.count(bytes.fromhex(real)) == 1
    patched = head.replace(bytes.fromhex(real), bytes.fromhex(unknown))
    ctx.read = lambda gva, size: patched[gva - _base:gva - _base + size]
    result = python.read_python(ctx)  # type: ignore[arg-type]
    assert result is not None and result.verdict is Verdict.UNVERIFIABLE and not result.threads
    assert unknown in result.reason and "tried" in result.reason
