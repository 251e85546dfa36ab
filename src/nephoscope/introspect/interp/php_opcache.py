"""Read opcache's shared-memory script cache (PHP 8.2 as Debian builds it) from one PHP process's memory.

Every process of a php-fpm pool (the master and each worker, busy or idle) maps the same opcache shared
segment: an anonymous MAP_SHARED mapping made by the master before it forks, holding
`zend_accel_shared_globals` (ZCSG) and its script hash `ZCSG(hash)`. Debian's opcache.so exports no
symbol for it (`accel_shared_globals` is not in its .dynsym, and its debug file is in the debug archive
this project cannot reach), so the pointer is found py-spy's way: every aligned word of opcache.so's
writable data and .bss that points into a shared mapping is a candidate, and a candidate counts only when
the structure it points at proves itself:

- `hash.max_num_entries` is one of the primes `zend_accel_hash_init()` rounds to, `hash_entries` lies
  right after the `hash_table` array (zend_shared_alloc() is a bump allocator with no headers), counts are
  in order (direct <= entries <= max), the booleans are 0/1;
- walking every bucket chain like `opcache_get_status()` does: every entry lies inside the used part of
  `hash_entries` on an entry boundary, is reached once (a loop or a cross-link fails), sits in the bucket
  its `hash_value` names (`hash_value % max_num_entries`), has a bool `indirect`; a direct entry's key is
  a zend_string holding an absolute path (or a phar:// URL), its `data` a `zend_persistent_script` in the
  segment whose `script.filename` and `script.main_op_array.filename` equal the key and whose main op
  array is a user function; an indirect entry points at a direct entry; the direct entries reached equal
  `num_direct_entries`.

Exactly one distinct pointer may validate (several words holding the same value are fine). Struct offsets
come from `php_layout` (the opcache structs are transcribed there from php-src PHP-8.2 and compiled with
the php8.2-dev headers). A failing check makes the cache `complete=False` with the reason and no scripts:
never a made-up list. Addresses are user gvas of the process; nothing here pauses the VM.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nephoscope.core.errors import GuestDataError, MemoryAccessError

if TYPE_CHECKING:
    from nephoscope.os.linux.model import LinuxKernel

Read = Callable[[int, int], bytes]  # user gva, size -> bytes; MemoryAccessError / GuestDataError
_BAD = (MemoryAccessError, GuestDataError)

OPCACHE_RE = re.compile(r"^/usr/lib/php/\d{8}/opcache\.so$")
VM_SHARED = 0x8
PAGE = 4096
# zend_accel_hash_init(): opcache.max_accelerated_files rounded up to the first of these (ext/opcache/
# zend_accelerator_hash.c, unchanged since 5.5; the documented effective values start at 223)
PRIMES = frozenset((5, 11, 19, 53, 107, 223, 463, 983, 1979, 3907, 7963, 16229, 32531, 65407, 130987, 262237,
                    524521, 1048793))
MAX_SCAN = 1 << 20  # bytes of opcache.so data/.bss scanned for the pointer (Debian's: 0x1b1b8)
MAX_CANDIDATES = 4096  # distinct pointers into shared memory tried (each costs one header read)
MAX_ENTRIES = 1 << 17  # entries read (max_accelerated_files caps at 1000000; the lab uses 16229)
MAX_STRING = 4096


@dataclass(slots=True)
class OpcacheState:
    """What opcache's shared cache holds, as read through one process."""

    mapped: bool = False  # opcache.so is mapped in the process
    shared_globals: int = 0  # user gva of zend_accel_shared_globals
    scripts: list[str] = field(default_factory=list)  # full paths of the cached scripts, bucket order
    entries: int = 0  # hash.num_entries (keys, direct and indirect)
    direct: int = 0  # hash.num_direct_entries (scripts)
    max_entries: int = 0
    hits: int = 0
    misses: int = 0
    start_time: int = 0
    enabled: bool = False  # ZCSG(accelerator_enabled)
    restart_pending: bool = False
    restart_in_progress: bool = False
    started: bool = False  # a shared segment and a pointer into it exist (opcache runs for this SAPI)
    complete: bool = True
    problem: str = ""

    def fail(self, problem: str) -> OpcacheState:
        """Mark the state incomplete (keeping the first problem), drop the scripts, and return it."""
        if self.complete:
            self.complete, self.problem = False, problem
        self.scripts = []
        return self

    def to_json(self) -> dict[str, object]:
        """Return the counters and the verdict as JSON-ready data (the scripts are listed separately)."""
        return {"shared_globals": f"0x{self.shared_globals:x}", "cached_scripts": len(self.scripts),
                "num_entries": self.entries, "num_direct_entries": self.direct, "max_entries": self.max_entries,
                "hits": self.hits, "misses": self.misses, "start_time": self.start_time, "enabled": self.enabled,
                "restart_pending": self.restart_pending, "restart_in_progress": self.restart_in_progress,
                "started": self.started, "complete": self.complete, "problem": self.problem}


def opcache_path(vmas: Sequence[object]) -> str | None:
    """Return the path of Debian's opcache.so when the process maps it, else None."""
    return next((p for v in vmas if OPCACHE_RE.match(p := getattr(v, "path", "") or "")), None)


def shared_mappings(vmas: Sequence[object]) -> list[object]:
    """Return the process's writable shared mappings that are not regular files (opcache's segment is one).

    A MAP_SHARED|MAP_ANONYMOUS mapping is a shmem file named "dev/zero" ("/dev/zero (deleted)" in maps);
    System V segments are "SYSV<key>", a MAP_HUGETLB one (opcache tries huge pages first) "/anon_hugepage".
    """
    def anonymous(path: str) -> bool:
        return not path or path.lstrip("/").startswith(("dev/zero", "SYSV", "anon_hugepage"))

    return [v for v in vmas if getattr(v, "flags", 0) & VM_SHARED and "w" in getattr(v, "perms", "")
            and anonymous(getattr(v, "path", "") or "")]


def data_ranges(vmas: Sequence[object], so_path: str) -> list[tuple[int, int]]:
    """Return the user gva ranges of opcache.so's writable data: its rw-p mappings and the anonymous .bss after."""
    ordered = sorted(vmas, key=lambda v: getattr(v, "start", 0))
    out: list[tuple[int, int]] = []
    for i, v in enumerate(ordered):
        if getattr(v, "path", "") != so_path or getattr(v, "perms", "")[:2] != "rw":
            continue
        out.append((v.start, v.end))  # type: ignore[attr-defined]
        nxt = ordered[i + 1] if i + 1 < len(ordered) else None
        if nxt is not None and nxt.start == v.end and not getattr(nxt, "path", "") and \
                getattr(nxt, "perms", "")[:2] == "rw":  # type: ignore[attr-defined]
            out.append((nxt.start, nxt.end))  # type: ignore[attr-defined]
    return out


def candidates(read: Read, ranges: Sequence[tuple[int, int]], shm: Sequence[tuple[int, int]]) -> list[int]:
    """Return the distinct aligned words in `ranges` that point into a shared range (at most MAX_CANDIDATES)."""
    seen: dict[int, None] = {}
    budget = MAX_SCAN
    for start, end in ranges:
        for page in range(start, end, PAGE):
            if budget <= 0:
                return list(seen)
            budget -= PAGE
            try:
                blob = read(page, min(PAGE, end - page))
            except _BAD:
                continue  # a .bss page never touched is not mapped: it holds no pointer
            for (word,) in struct.iter_unpack("<Q", blob[:len(blob) // 8 * 8]):
                if word % 8 == 0 and any(lo <= word < hi - 128 for lo, hi in shm):
                    seen.setdefault(word)
                    if len(seen) >= MAX_CANDIDATES:
                        return list(seen)
    return list(seen)


class _Cache:
    """Bounded typed reads of the shared segment with the build's layout."""

    def __init__(self, read: Read, layout: dict[str, int], shm: tuple[int, int]) -> None:
        self.read, self.o, self.lo, self.hi = read, layout, shm[0], shm[1]

    def inside(self, gva: int, size: int = 8) -> bool:
        return self.lo <= gva and gva + size <= self.hi

    def u64(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 8), "little")

    def zstr(self, gva: int, what: str) -> str:
        """Return the zend_string at gva (length at most MAX_STRING, NUL-terminated at its length)."""
        if not gva or gva % 8:
            raise GuestDataError(f"{what}: zend_string pointer 0x{gva:x} is null or misaligned")
        n = self.u64(gva + self.o["zend_string.len"])
        if not 0 < n <= MAX_STRING:
            raise GuestDataError(f"{what}: zend_string at 0x{gva:x} has length {n}")
        raw = self.read(gva + self.o["zend_string.val"], n + 1)
        if raw[n:] != b"\0" or b"\0" in raw[:n]:
            raise GuestDataError(f"{what}: zend_string at 0x{gva:x} is not a string of its length")
        return raw[:n].decode("utf-8", "backslashreplace")

    def header(self, zcsg: int, state: OpcacheState) -> tuple[int, int]:
        """Fill the counters from ZCSG at gva `zcsg` after the header checks; return (hash_table, hash_entries)."""
        o = self.o
        g = "zend_accel_shared_globals."
        blob = self.read(zcsg, o[g + "restart_in_progress"] + 1)

        def q(name: str) -> int:
            return int.from_bytes(blob[o[g + name]:o[g + name] + 8], "little")

        table, entries = q("hash.hash_table"), q("hash.hash_entries")
        used, size, direct = struct.unpack_from("<III", blob, o[g + "hash.num_entries"])
        flags = [blob[o[g + n]] for n in ("accelerator_enabled", "restart_pending", "restart_in_progress")]
        if size not in PRIMES:
            raise GuestDataError(f"hash.max_num_entries {size} is not a size zend_accel_hash_init() makes")
        if not direct <= used <= size or used > MAX_ENTRIES:
            raise GuestDataError(f"hash counts out of order (direct {direct}, entries {used}, max {size})")
        if not self.inside(table, 8 * size) or entries != table + 8 * size or \
                not self.inside(entries, o["sizeof.zend_accel_hash_entry"] * size):
            raise GuestDataError(f"hash_table 0x{table:x} / hash_entries 0x{entries:x} are not the two arrays of "
                                 f"{size} the hash allocates in the segment")
        if any(f > 1 for f in flags):
            raise GuestDataError(f"ZCSG booleans are {flags}, not 0/1")
        state.entries, state.direct, state.max_entries = used, direct, size
        state.hits, state.misses, state.start_time = q("hits"), q("misses"), q("start_time")
        state.enabled, state.restart_pending, state.restart_in_progress = (bool(f) for f in flags)
        return table, entries

    def walk(self, zcsg: int, state: OpcacheState) -> None:
        """Walk every bucket chain of ZCSG(hash) into `state.scripts`; raise GuestDataError on any failed check."""
        o = self.o
        e = "zend_accel_hash_entry."
        table, entries = self.header(zcsg, state)
        step = o["sizeof.zend_accel_hash_entry"]
        heads = struct.unpack(f"<{state.max_entries}Q", self.read(table, 8 * state.max_entries))
        end = entries + step * state.entries
        seen: set[int] = set()
        scripts: list[str] = []
        for bucket, entry in enumerate(heads):
            while entry:
                if not entries <= entry < end or (entry - entries) % step:
                    raise GuestDataError(f"bucket {bucket}: entry 0x{entry:x} is not one of the "
                                         f"{state.entries} used entries at 0x{entries:x}")
                if entry in seen:
                    raise GuestDataError(f"bucket {bucket}: entry 0x{entry:x} reached twice (a loop)")
                seen.add(entry)
                blob = self.read(entry, step)
                hash_value, key, nxt, data = struct.unpack_from("<QQQQ", blob, o[e + "hash_value"])
                indirect = blob[o[e + "indirect"]]
                if hash_value % state.max_entries != bucket:
                    raise GuestDataError(f"entry 0x{entry:x} hashes to bucket {hash_value % state.max_entries}, "
                                         f"is in bucket {bucket}")
                if indirect > 1:
                    raise GuestDataError(f"entry 0x{entry:x}: indirect is {indirect}, not a bool")
                name = self.zstr(key, f"entry 0x{entry:x} key")
                if indirect:
                    # zend_accel_hash_update() follows indirect chains: an indirect entry names a direct one
                    if not entries <= data < end or (data - entries) % step or \
                            self.read(data + o[e + "indirect"], 1)[0] != 0:
                        raise GuestDataError(f"indirect entry {name!r} points at 0x{data:x}, not at a direct entry")
                else:
                    scripts.append(self.script(name, data))
                entry = nxt
        if len(scripts) != state.direct:
            raise GuestDataError(f"{len(scripts)} scripts reached where the hash counts {state.direct}")
        state.scripts = scripts

    def script(self, key: str, data: int) -> str:
        """Return the key of the direct entry whose zend_persistent_script is at `data`, after its checks."""
        o = self.o
        if not key.startswith(("/", "phar:///")):
            raise GuestDataError(f"cached script key {key!r} is not an absolute path")
        if not self.inside(data, 256) or data % 8:
            raise GuestDataError(f"{key}: persistent script 0x{data:x} is not in the shared segment")
        main = data + o["zend_script.main_op_array"]
        if self.read(main + o["zend_function.type"], 1)[0] != o["const.ZEND_USER_FUNCTION"]:
            raise GuestDataError(f"{key}: the persistent script's main op array is not a user function")
        for what, at in (("script.filename", data + o["zend_script.filename"]),
                         ("main_op_array.filename", main + o["zend_function.op_array.filename"])):
            if self.zstr(self.u64(at), f"{key}: {what}") != key:
                raise GuestDataError(f"{key}: the persistent script's {what} names another file")
        return key


def read_cache(read: Read, layout: dict[str, int], vmas: Sequence[object]) -> OpcacheState:
    """Return opcache's cached scripts as seen through one process (user gvas); never raises for guest data."""
    state = OpcacheState()
    so_path = opcache_path(vmas)
    if so_path is None:
        return state
    state.mapped = True
    shm = [(v.start, v.end) for v in shared_mappings(vmas)]  # type: ignore[attr-defined]
    ranges = data_ranges(vmas, so_path)
    if not ranges:
        return state.fail(f"{so_path} is mapped without its writable data")
    found = candidates(read, ranges, shm) if shm else []
    if not found:
        # opcache did not start here (php-cli with opcache.enable_cli=0 maps opcache.so but makes no segment):
        # nothing is cached, and nothing is claimed
        return state
    state.started = True
    valid: dict[int, OpcacheState] = {}
    rejected: list[str] = []
    for zcsg in found:
        seg = next((lo, hi) for lo, hi in shm if lo <= zcsg < hi)
        trial = OpcacheState(mapped=True, shared_globals=zcsg, started=True)
        try:
            _Cache(read, layout, seg).walk(zcsg, trial)
        except _BAD as exc:
            rejected.append(f"0x{zcsg:x}: {exc}")
            continue
        valid[zcsg] = trial
    if len(valid) == 1:
        return next(iter(valid.values()))
    if len(valid) > 1:
        return state.fail(f"{len(valid)} different words of {so_path} point at a valid opcache hash "
                          f"({', '.join(f'0x{v:x}' for v in valid)}): ambiguous")
    tried = "; ".join(rejected[:3]) + (f"; … {len(rejected) - 3} more" if len(rejected) > 3 else "")
    return state.fail(f"no word of {so_path}'s data points at a valid zend_accel_shared_globals "
                      f"({len(found)} pointers into shared memory tried{': ' + tried if tried else ''})")


def segment_reader(k: LinuxKernel, read: Read, vmas: Sequence[object]) -> Read:
    """Return a Read that falls back to the page cache of the shared mappings' files for unmapped pages.

    A php-fpm worker's page tables map only the segment pages it touched since fork (fork does not copy
    the PTEs of shared file pages), so the rest is read from the shmem file's pages (kernel structures,
    each page checked to belong to the mapping at its index). Nothing here pauses the VM.
    """
    from nephoscope.os.linux import pagecache

    segments = [v for v in shared_mappings(vmas) if getattr(v, "file_gva", 0)]
    index: dict[int, tuple[int, dict[int, int]]] = {}

    def page(gva: int) -> bytes:
        vma = next((v for v in segments if v.start <= gva < v.end), None)  # type: ignore[attr-defined]
        if vma is None:
            raise MemoryAccessError(f"0x{gva:x} is in no shared mapping")
        if vma.start not in index:  # type: ignore[attr-defined]
            pages = (vma.end - vma.start) // PAGE + vma.offset // PAGE  # type: ignore[attr-defined]
            index[vma.start] = pagecache.cached_page_index(k, vma.file_gva, max_pages=pages)  # type: ignore[attr-defined]
        mapping, pages_at = index[vma.start]  # type: ignore[attr-defined]
        i = (gva - vma.start + vma.offset) // PAGE  # type: ignore[attr-defined]
        data = pagecache.read_cached_page(k, mapping, pages_at[i], i) if i in pages_at else None
        if data is None:
            raise MemoryAccessError(f"page of 0x{gva:x} is neither mapped nor in the shared file's page cache")
        return data

    def combined(gva: int, size: int) -> bytes:
        try:
            return read(gva, size)
        except MemoryAccessError:
            if not segments or size > 64 << 20:
                raise
        out = bytearray()
        while len(out) < size:
            at = gva + len(out)
            n = min(size - len(out), PAGE - at % PAGE)
            try:
                out += read(at, n)
            except MemoryAccessError:
                out += page(at)[at % PAGE:at % PAGE + n]
        return bytes(out)

    return combined
