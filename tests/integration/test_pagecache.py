"""The page-cache reader against real guest memory: files read from i_pages equal the packaged files.

Uses the shared dumps of the clean guest (kernel 6.1 and 6.12), or makes the 6.1 one (clean_dump boots
the clean guest). The python3.11 binary mapped by the guest's http.server process is read through its
VMA's vm_file and compared byte for byte with the same file of the Debian package the manifest names;
corrupted copies of the dump give a problem or an error, never other bytes.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from nephoscope.core.errors import GuestDataError, MemoryAccessError
from nephoscope.core.paths import cache_root
from nephoscope.knowledge.debian import archive
from nephoscope.memory.physical import open_memory
from nephoscope.os.linux import pagecache
from nephoscope.os.linux.model import LinuxKernel

pytestmark = pytest.mark.guest

SHARED = Path("/work/dumps")


def _packaged(path: str, manifest: dict) -> bytes:
    proc = next(p for p in manifest["processes"] if p.get("binary") == path)
    deb = archive.download(proc["package"], proc["version"], cache_root() / "debs")
    root = archive.unpack(deb, cache_root() / "unpacked") / "root"
    return (root / path.lstrip("/")).read_bytes()


def _python_vma(k: LinuxKernel):  # type: ignore[no-untyped-def]
    task = next(p for p in k.processes() if p.exe == "/usr/bin/python3.11")
    return task, next(v for v in k.vmas(task) if v.file_gva and v.path == "/usr/bin/python3.11")


def _check_dump(dump: Path, manifest: dict) -> None:
    k = LinuxKernel.open(open_memory(dump))
    task, vma = _python_vma(k)
    cached = pagecache.read_cached_file(k, vma.file_gva)
    want = _packaged("/usr/bin/python3.11", manifest)
    assert cached.size == len(want)
    assert cached.complete, cached.why_incomplete  # the initramfs lives in the page cache: every page is there
    assert cached.data == want
    # the same file through its inode and its address_space
    again = pagecache.read_cached_file(k, cached.inode_gva, "inode")
    assert again.data == want and again.mapping_gva == cached.mapping_gva
    # bounded: a 1-page cap gives the first page and says the rest is missing
    small = pagecache.read_cached_file(k, vma.file_gva, max_bytes=4096)
    assert small.truncated and not small.complete and small.data == want[:4096]
    # an open regular file (the log on fd 1) reads too, and is as long as its inode says
    log = next(f for f in k.files(task) if f.fd == 1)
    got = pagecache.read_cached_file(k, log.file_gva)
    assert got.size == len(got.data) and not got.problem


def test_python_binary_from_page_cache_61(clean_dump: Path) -> None:
    shared = SHARED / "clean-6.1.manifest.json"
    if not shared.exists():
        pytest.skip("no manifest of the 6.1 dump (the lab ground truth names the python3.11 package)")
    manifest = json.loads(shared.read_text())
    _check_dump(clean_dump, manifest)


def test_python_binary_from_page_cache_612() -> None:
    dump = SHARED / "clean-6.12.elf"
    if not dump.exists():
        pytest.skip("no shared 6.12 dump")
    _check_dump(dump, json.loads((SHARED / "clean-6.12.manifest.json").read_text()))


def test_corrupted_page_tree_is_a_problem_not_bytes(clean_dump: Path, tmp_path: Path) -> None:
    copy = tmp_path / "clean.elf"
    shutil.copyfile(clean_dump, copy)
    k = LinuxKernel.open(open_memory(copy))
    _task, vma = _python_vma(k)
    mapping, _inode = pagecache.mapping_of(k, vma.file_gva)
    lay = pagecache.layout(k)
    head = k.u64(mapping + lay.off["address_space.i_pages"] + lay.off["xarray.xa_head"])
    node = head - 2
    slots_gva = node + lay.off["xa_node.slots"]
    first_child = k.u64(slots_gva)
    segments = _elf_segments(copy)

    def poke(gva: int, value: int) -> None:
        gpa = k.kernel.translate(gva)
        with copy.open("r+b") as fh:
            fh.seek(_file_offset(segments, gpa))
            fh.write(struct.pack("<Q", value))

    # a cycle: the root's first slot points back at the root node
    poke(slots_gva, head)
    k2 = LinuxKernel.open(open_memory(copy))
    got = pagecache.read_cached_file(k2, vma.file_gva)
    assert got.problem and not got.complete
    assert not any(got.data[i * 4096:(i + 1) * 4096].strip(b"\0") for i in got.absent)
    # a pointer to a page of another file: mapping back-pointer fails
    poke(slots_gva, first_child)
    other = k2.u64(k2.symbols.get("init_task"))  # not a struct page at all
    poke(slots_gva, other & ~3)
    k3 = LinuxKernel.open(open_memory(copy))
    got = pagecache.read_cached_file(k3, vma.file_gva)
    assert got.problem and not got.complete


def _elf_segments(path: Path) -> list[tuple[int, int, int]]:
    from elftools.elf.elffile import ELFFile

    with path.open("rb") as fh:
        elf = ELFFile(fh)
        return [(s["p_paddr"], s["p_offset"], s["p_filesz"]) for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]


def _file_offset(segments: list[tuple[int, int, int]], gpa: int) -> int:
    for paddr, offset, size in segments:
        if paddr <= gpa < paddr + size:
            return offset + gpa - paddr
    raise MemoryAccessError(f"gpa 0x{gpa:x} not in the dump")


def test_garbage_file_pointer_raises_guest_data_error(clean_dump: Path) -> None:
    k = LinuxKernel.open(open_memory(clean_dump))
    init = k.symbols.get("init_task")
    with pytest.raises((GuestDataError, MemoryAccessError)):
        pagecache.read_cached_file(k, init)
