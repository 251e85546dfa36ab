"""opcache's shared script cache on a synthetic memory image laid out with the php8.2 layout, intact and corrupted."""

from __future__ import annotations

import struct

import pytest

from nephoscope.core.errors import MemoryAccessError
from nephoscope.introspect.interp import php_opcache
from nephoscope.introspect.interp.php_layout import PHP82_NTS as L
from nephoscope.os.linux.walkers import Vma

SO = "/usr/lib/php/20220829/opcache.so"
SO_DATA, BSS = 0x7F10_0000_0000, 0x7F10_0000_2000
SHM, SHM_SIZE = 0x7F20_0000_0000, 0x40_0000
ZCSG = SHM + 0x100
MAX = 223
G, E = "zend_accel_shared_globals.", "zend_accel_hash_entry."
STEP = L["sizeof.zend_accel_hash_entry"]
SCRIPTS = ["/var/www/php/slow.php", "/var/www/php/info.php", "/srv/app/lib.php"]


class Memory:
    """Sparse user memory in 4 KiB pages; reads of a page never written raise like an unmapped page."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.reads = 0
        self.top = SHM + 0x10000  # bump allocator for strings and scripts inside the segment

    def write(self, gva: int, blob: bytes) -> None:
        for i, b in enumerate(blob):
            self.pages.setdefault((gva + i) >> 12, bytearray(4096))[(gva + i) & 0xFFF] = b

    def u64(self, gva: int, value: int) -> None:
        self.write(gva, struct.pack("<Q", value))

    def alloc(self, size: int) -> int:
        gva = self.top
        self.top += (size + 7) // 8 * 8 + 8
        self.write(gva, bytes(size))
        return gva

    def read(self, gva: int, size: int) -> bytes:
        self.reads += 1
        assert self.reads < 100_000, "the reader does not stop"
        try:
            return bytes(self.pages[(gva + i) >> 12][(gva + i) & 0xFFF] for i in range(size))
        except KeyError:
            raise MemoryAccessError(f"guest-virtual 0x{gva:x} is not mapped") from None

    def zstr(self, text: str) -> int:
        raw = text.encode()
        gva = self.alloc(L["zend_string.val"] + len(raw) + 1)
        self.u64(gva + L["zend_string.len"], len(raw))
        self.write(gva + L["zend_string.val"], raw + b"\0")
        return gva


def vmas() -> list[Vma]:
    return [Vma(SO_DATA - 0x10000, SO_DATA, "r-xp", 0, SO, 0, 0x5),
            Vma(SO_DATA, BSS, "rw-p", 0x10000, SO, 0, 0x3),
            Vma(BSS, BSS + 0x3000, "rw-p", 0, "", 0, 0x3),
            Vma(SHM, SHM + SHM_SIZE, "rw-s", 0, "/dev/zero (deleted)", 0xFFFF_8880_0000_0000, 0xFB)]


def table() -> int:
    return ZCSG + 0x400


def entries() -> int:
    return table() + 8 * MAX


def build(mem: Memory, scripts: list[str] = SCRIPTS, indirect: bool = True) -> dict[str, int]:
    """Lay out ZCSG, its hash and one persistent script per path; return the entry gva of each key."""
    mem.write(ZCSG, bytes(0x100))
    mem.write(table(), bytes(8 * MAX + STEP * MAX))
    at: dict[str, int] = {}
    keys = [(s, False) for s in scripts] + ([("./slow.php", True)] if indirect else [])
    for i, (key, is_indirect) in enumerate(keys):
        entry = entries() + i * STEP
        hash_value = 1000 + 7 * i
        bucket = table() + 8 * (hash_value % MAX)
        head = int.from_bytes(mem.read(bucket, 8), "little")
        name = mem.zstr(key)
        if is_indirect:
            data = at[scripts[0]]
        else:
            data = mem.alloc(512)
            mem.u64(data + L["zend_script.filename"], name)
            main = data + L["zend_script.main_op_array"]
            mem.write(main + L["zend_function.type"], bytes([L["const.ZEND_USER_FUNCTION"]]))
            mem.u64(main + L["zend_function.op_array.filename"], mem.zstr(key))
        mem.write(entry, struct.pack("<QQQQ", hash_value, name, head, data) + bytes([is_indirect]))
        mem.u64(bucket, entry)  # zend_accel_hash_update() prepends to the bucket's chain
        at[key] = entry
    mem.u64(ZCSG + L[G + "hits"], 41)
    mem.u64(ZCSG + L[G + "misses"], 3)
    mem.u64(ZCSG + L[G + "hash.hash_table"], table())
    mem.u64(ZCSG + L[G + "hash.hash_entries"], entries())
    mem.write(ZCSG + L[G + "hash.num_entries"], struct.pack("<III", len(keys), MAX, len(scripts)))
    mem.u64(ZCSG + L[G + "start_time"], 1_764_600_000)
    mem.write(ZCSG + L[G + "accelerator_enabled"], b"\x01")
    mem.write(SO_DATA, bytes(0x2000))
    mem.u64(SO_DATA + 0x88, SHM + 0x20)  # another pointer into the segment (smm_shared_globals-like): rejected
    mem.u64(BSS + 0x10, ZCSG)  # accel_shared_globals
    mem.u64(BSS + 0x48, ZCSG)  # the same value twice is one candidate
    return at


def read(mem: Memory) -> php_opcache.OpcacheState:
    return php_opcache.read_cache(mem.read, L, vmas())


def test_the_cached_scripts_are_listed_with_their_counters() -> None:
    mem = Memory()
    build(mem)
    state = read(mem)
    assert state.complete, state.problem
    assert state.started and state.shared_globals == ZCSG
    assert sorted(state.scripts) == sorted(SCRIPTS)  # the indirect key ./slow.php is not a script
    assert (state.entries, state.direct, state.max_entries, state.hits, state.misses) == (4, 3, MAX, 41, 3)
    assert state.enabled and not state.restart_pending
    assert state.to_json()["cached_scripts"] == 3


def test_no_opcache_so_and_no_segment_claim_nothing() -> None:
    mem = Memory()
    build(mem)
    assert not php_opcache.read_cache(mem.read, L, vmas()[3:]).mapped
    cli = php_opcache.read_cache(mem.read, L, vmas()[:3])  # opcache.so mapped, no segment (enable_cli=0)
    assert cli.mapped and not cli.started and cli.complete and cli.scripts == []


def _patch(mem: Memory, at: int, blob: bytes) -> php_opcache.OpcacheState:
    mem.write(at, blob)
    state = read(mem)
    assert not state.complete and state.scripts == [], state
    return state


def test_a_looping_chain_is_unverifiable() -> None:
    mem = Memory()
    at = build(mem)
    entry = at[SCRIPTS[1]]
    state = _patch(mem, entry + L[E + "next"], struct.pack("<Q", entry))
    assert "reached twice" in state.problem


def test_absurd_counts_are_unverifiable() -> None:
    mem = Memory()
    build(mem)
    assert "counts out of order" in _patch(mem, ZCSG + L[G + "hash.num_entries"], struct.pack("<I", 10_000)).problem
    mem = Memory()
    build(mem)
    assert "not a size" in _patch(mem, ZCSG + L[G + "hash.max_num_entries"], struct.pack("<I", 224)).problem
    mem = Memory()
    build(mem)
    assert "reached where the hash counts" in _patch(mem, ZCSG + L[G + "hash.num_direct_entries"],
                                                     struct.pack("<I", 2)).problem


@pytest.mark.parametrize("what", ["length", "nul", "relative", "filename", "type"])
def test_bad_strings_and_scripts_are_unverifiable(what: str) -> None:
    mem = Memory()
    at = build(mem)
    entry = at[SCRIPTS[0]]
    key = int.from_bytes(mem.read(entry + L[E + "key"], 8), "little")
    data = int.from_bytes(mem.read(entry + L[E + "data"], 8), "little")
    if what == "length":
        state = _patch(mem, key + L["zend_string.len"], struct.pack("<Q", 1 << 40))
    elif what == "nul":
        state = _patch(mem, key + L["zend_string.val"] + len(SCRIPTS[0]), b"X")
    elif what == "relative":
        state = _patch(mem, key + L["zend_string.val"], b"v")
    elif what == "filename":
        state = _patch(mem, data + L["zend_script.filename"], struct.pack("<Q", mem.zstr("/etc/passwd")))
    else:
        state = _patch(mem, data + L["zend_script.main_op_array"] + L["zend_function.type"], b"\x01")
    assert "0x" in state.problem or SCRIPTS[0] in state.problem


def test_misplaced_and_foreign_entries_are_unverifiable() -> None:
    mem = Memory()
    at = build(mem)
    assert "hashes to bucket" in _patch(mem, at[SCRIPTS[2]] + L[E + "hash_value"], struct.pack("<Q", 5)).problem
    mem = Memory()
    at = build(mem)
    outside = entries() + STEP * 100  # beyond num_entries
    state = _patch(mem, at[SCRIPTS[1]] + L[E + "next"], struct.pack("<Q", outside))
    assert "not one of the" in state.problem
    mem = Memory()
    at = build(mem)
    assert "not a bool" in _patch(mem, at[SCRIPTS[1]] + L[E + "indirect"], b"\x07").problem
    mem = Memory()
    at = build(mem)
    state = _patch(mem, at["./slow.php"] + L[E + "data"], struct.pack("<Q", SHM + 0x20))
    assert "indirect entry" in state.problem


def test_arrays_not_where_the_hash_allocates_them_are_unverifiable() -> None:
    mem = Memory()
    build(mem)
    state = _patch(mem, ZCSG + L[G + "hash.hash_entries"], struct.pack("<Q", entries() + 8))
    assert "no word" in state.problem and "two arrays" in state.problem


def test_two_valid_caches_are_ambiguous() -> None:
    mem = Memory()
    build(mem)
    copy = ZCSG + 0x200  # a second header sharing the same arrays: both validate
    mem.write(copy, mem.read(ZCSG, 0x100))
    mem.u64(BSS + 0x80, copy)
    state = read(mem)
    assert not state.complete and "ambiguous" in state.problem and state.scripts == []


def test_a_garbage_bss_gives_a_bounded_refusal() -> None:
    mem = Memory()
    build(mem)
    for i in range(0, 0x3000, 8):  # every word of the .bss points into the segment at garbage
        mem.u64(BSS + i, SHM + 0x30000 + i * 16)
    state = read(mem)
    assert not state.complete and "no word" in state.problem
    assert mem.reads < 20_000


def test_an_indirect_entry_naming_an_indirect_one_is_unverifiable() -> None:
    mem = Memory()
    at = build(mem)
    state = _patch(mem, at["./slow.php"] + L[E + "data"], struct.pack("<Q", at["./slow.php"]))
    assert "not at a direct entry" in state.problem


def test_unmapped_segment_pages_come_from_the_shmem_page_cache(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A worker lacks the PTEs of segment pages it never touched: those pages are read from the page cache."""
    from nephoscope.os.linux import pagecache

    mem = Memory()
    build(mem)
    shm_pages = {p: bytes(b) for p, b in mem.pages.items() if SHM >> 12 <= p < (SHM + SHM_SIZE) >> 12}
    worker = Memory()
    worker.pages = {p: b for p, b in mem.pages.items() if p not in shm_pages or p == ZCSG >> 12}
    assert not read_worker(worker).complete  # without the page cache: the hash table is not mapped here
    calls: list[int] = []
    monkeypatch.setattr(pagecache, "cached_page_index", lambda k, gva, max_pages: (
        0xFFFF_8880_1234_0000, {p - (SHM >> 12): 0xFFFF_EA00_0000_0000 + 64 * p for p in shm_pages}))

    def page(k, mapping, page_gva, index):  # type: ignore[no-untyped-def]
        calls.append(index)
        assert mapping == 0xFFFF_8880_1234_0000 and page_gva == 0xFFFF_EA00_0000_0000 + 64 * (index + (SHM >> 12))
        return shm_pages[index + (SHM >> 12)]

    monkeypatch.setattr(pagecache, "read_cached_page", page)
    combined = php_opcache.segment_reader(None, worker.read, vmas())  # type: ignore[arg-type]
    state = php_opcache.read_cache(combined, L, vmas())
    assert state.complete, state.problem
    assert sorted(state.scripts) == sorted(SCRIPTS) and calls


def read_worker(mem: Memory) -> php_opcache.OpcacheState:
    return php_opcache.read_cache(mem.read, L, vmas())
