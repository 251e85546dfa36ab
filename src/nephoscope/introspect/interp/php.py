"""Read what PHP (php-fpm / php-cli / php-cgi as Debian builds them) runs, from one process's user memory.

The reader finds the binary's mapping among the process's VMAs, reads its GNU build id from the ELF
notes in guest memory, and takes `executor_globals` / `sapi_globals` from the .dynsym of the Debian
binary with that build id (the package's .deb, downloaded into the cache like the KB does), relocated
by the load bias. Struct offsets come from `php_layout` (compiled against the headers), checked against
the build (symbol sizes, the build's own "API4<api>,NTS" string). Then: EG(current_execute_data) →
prev_execute_data chain (function, class, file, line from the opline) and EG(included_files).

Guest memory is hostile: every read is bounded and charged to the caller's read function, chains are
revisit-checked and capped, and anything that does not validate makes the result `complete=False` with
a `problem`, never a made-up frame. Addresses are user gvas of the process. Nothing here pauses the VM.
"""

from __future__ import annotations

import itertools
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from nephoscope.core.errors import GuestDataError, KnowledgeError, MemoryAccessError, NephoscopeError
from nephoscope.introspect.interp import php_opcache
from nephoscope.introspect.interp.php_layout import LAYOUTS

if TYPE_CHECKING:
    from nephoscope.introspect.interp import InterpResult, ProcessContext
    from nephoscope.os.linux.model import LinuxKernel
    from nephoscope.os.linux.walkers import Task

Read = Callable[[int, int], bytes]  # user gva, size -> bytes; MemoryAccessError / GuestDataError
_BAD = (MemoryAccessError, GuestDataError)

# the binaries Debian's PHP packages ship, and their package (php8.2-fpm: /usr/sbin/php-fpm8.2)
BINARY_RE = re.compile(r"^/usr/(?:s?bin)/(php-fpm|php-cgi|php)(\d+\.\d+)$")
PACKAGE_OF = {"php-fpm": "php{v}-fpm", "php": "php{v}-cli", "php-cgi": "php{v}-cgi"}
BUILD_ID_RE = re.compile(rb"API(\d{9}),(NTS|TS)")  # ZEND_EXTENSION_BUILD_ID: "API" ZEND_EXTENSION_API_NO ",NTS"
MAX_FRAMES = 256
MAX_STRING = 4096  # PATH_MAX: file names; function names are shorter
MAX_INCLUDED = 1 << 14
MAX_TABLE = 1 << 20  # a hash table's nTableSize cap (function_table holds a few thousand)
PT_LOAD, PT_NOTE, NT_GNU_BUILD_ID = 1, 4, 3
PAGE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class PhpBuild:
    """One Debian PHP binary: where its globals are (file vaddrs) and which layout it uses."""

    package: str
    version: str
    path: str
    build_id: str
    api: int
    thread_safety: str
    executor_globals: int
    executor_globals_size: int
    sapi_globals: int
    sapi_globals_size: int


@dataclass(frozen=True, slots=True)
class PhpFrame:
    """One PHP call frame: `function` is "{main}" for a script's top level; line 0 for internal functions."""

    function: str
    cls: str
    file: str
    line: int
    internal: bool = False

    def label(self) -> str:
        name = f"{self.cls}::{self.function}" if self.cls else self.function
        return f"{name} ({self.file}:{self.line})" if not self.internal else f"{name} <internal>"


@dataclass(slots=True)
class PhpState:
    """What one PHP process runs: frames innermost first, compiled files, the request being served."""

    build: PhpBuild | None = None
    frames: list[PhpFrame] = field(default_factory=list)
    included_files: list[str] = field(default_factory=list)
    request_uri: str = ""
    request_method: str = ""
    script: str = ""  # SG(request_info).path_translated
    activated: bool = True  # False: no request is active (EG(active) clear, or EG still zero: never started)
    opcache: php_opcache.OpcacheState | None = None  # the pool's shared script cache (None: not read)
    complete: bool = True
    problem: str = ""

    def fail(self, problem: str) -> PhpState:
        """Mark the state incomplete (keeping the first problem) and return it."""
        if self.complete:
            self.complete, self.problem = False, problem
        return self

    @property
    def busy(self) -> bool:
        return bool(self.frames)

    def to_json(self) -> dict[str, object]:
        """Return the state as JSON-ready data."""
        return {"build": asdict(self.build) if self.build else None, "frames": [asdict(f) for f in self.frames],
                "included_files": list(self.included_files), "request_uri": self.request_uri,
                "request_method": self.request_method, "script": self.script, "activated": self.activated,
                "opcache": ({**self.opcache.to_json(), "scripts": list(self.opcache.scripts)}
                            if self.opcache is not None and self.opcache.mapped else None),
                "complete": self.complete, "problem": self.problem}


# --- the binary: mapping, bias, build id ----------------------------------------------------------


def php_binary(exe: str) -> tuple[str, str] | None:
    """Return (Debian package, binary path) when `exe` is one of Debian's PHP binaries, else None."""
    m = BINARY_RE.match(exe or "")
    if not m:
        return None
    return PACKAGE_OF[m.group(1)].format(v=m.group(2)), exe


def image_base(vmas: Sequence[object], path: str) -> int | None:
    """Return the user gva of the file-offset-0 mapping of `path` (where its ELF header is), or None."""
    starts = [v.start for v in vmas if getattr(v, "path", "") == path and getattr(v, "offset", 1) == 0]
    return min(starts) if starts else None


def read_build_id(read: Read, base: int) -> tuple[str, int]:
    """Return (GNU build id hex, load delta) of the ELF image whose header is at user gva `base`.

    The load delta is `base` minus the load bias (a property of the file: any process mapping it has
    bias = its own base - delta), so a header read through another process serves this one too.
    """
    ehdr = read(base, 64)
    if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
        raise GuestDataError(f"no 64-bit little-endian ELF header at 0x{base:x}")
    phoff, = struct.unpack_from("<Q", ehdr, 32)
    phentsize, phnum = struct.unpack_from("<HH", ehdr, 54)
    if phentsize != 56 or not 0 < phnum <= 64 or phoff > 4096:
        raise GuestDataError(f"implausible program headers (phoff {phoff}, {phnum} of {phentsize} bytes)")
    phdrs = read(base + phoff, phnum * 56)
    loads, notes = [], []
    for i in range(phnum):
        p_type, _fl, p_offset, p_vaddr, _pa, p_filesz, _mem, _al = struct.unpack_from("<IIQQQQQQ", phdrs, i * 56)
        if p_type == PT_LOAD:
            loads.append((p_offset, p_vaddr))
        elif p_type == PT_NOTE and 0 < p_filesz <= 4096:
            notes.append((p_vaddr, p_filesz))
    if not loads:
        raise GuestDataError("the ELF image has no PT_LOAD")
    first_offset, first_vaddr = min(loads)
    bias = base - (first_vaddr - first_offset)
    for vaddr, size in notes:
        blob, pos = read(bias + vaddr, size), 0
        while pos + 12 <= len(blob):
            namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
            name_end = pos + 12 + (namesz + 3) // 4 * 4
            desc = blob[name_end:name_end + descsz]
            if ntype == NT_GNU_BUILD_ID and blob[pos + 12:pos + 12 + namesz] == b"GNU\0" and 8 <= descsz <= 64:
                return desc.hex(), base - bias
            pos = name_end + (descsz + 3) // 4 * 4
    raise GuestDataError("the ELF image has no GNU build id note")


def file_view(data: bytes, absent: Sequence[int], base: int) -> Read:
    """Return a Read over a file's first bytes (e.g. from the page cache) as if mapped at user gva `base`.

    Only the file's first page is addressed this way (header and notes of PHP binaries live there);
    pages listed in `absent` (not cached) read as unmapped.
    """
    def read(gva: int, size: int) -> bytes:
        off = gva - base
        if off < 0 or off + size > min(len(data), 4096) or any(p == 0 for p in absent):
            raise MemoryAccessError(f"0x{gva:x}+{size} is not in the cached first page of the file")
        return data[off:off + size]

    return read


def build_from_elf(path: Path, package: str, version: str, binary: str) -> PhpBuild:
    """Return the PhpBuild of a PHP binary file on the host (symbols from .dynsym, API from .rodata)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    from nephoscope.knowledge.elfpages import find_build_id

    try:
        with path.open("rb") as fh:
            elf = ELFFile(fh)
            build_id = find_build_id(elf) or ""
            syms = {}
            dynsym = elf.get_section_by_name(".dynsym")
            for sym in dynsym.iter_symbols() if dynsym is not None else ():
                if sym.name in ("executor_globals", "sapi_globals"):
                    syms[sym.name] = (int(sym["st_value"]), int(sym["st_size"]))
            rodata = elf.get_section_by_name(".rodata")
            m = BUILD_ID_RE.search(rodata.data()) if rodata is not None else None
    except (OSError, ELFError) as exc:
        raise KnowledgeError(f"{path}: not a readable ELF file ({exc})") from None
    if "executor_globals" not in syms or "sapi_globals" not in syms or m is None:
        raise KnowledgeError(f"{path}: no executor_globals/sapi_globals in .dynsym or no API build string")
    return PhpBuild(package, version, binary, build_id, int(m.group(1)), m.group(2).decode(),
                    *syms["executor_globals"], *syms["sapi_globals"])


def _valid_build(build_id: str, record: dict[str, object]) -> bool:
    """Return whether a cached record is a PhpBuild of `build_id`."""
    build = PhpBuild(**record)  # type: ignore[arg-type]
    return build.build_id == build_id and all(isinstance(getattr(build, f), int) for f in (
        "api", "executor_globals", "executor_globals_size", "sapi_globals", "sapi_globals_size"))


def find_build(build_id: str, package: str, binary: str, versions: Sequence[str] | None = None) -> PhpBuild | None:
    """Return the Debian build of `package` whose `binary` has `build_id` (cached; downloads .debs), or None.

    `versions`: the package versions to try (default: the KB's record of the file, then every version apt
    knows). Every build seen on the way is cached in <cache>/interp/php-builds.json, so an unknown build
    id costs no new downloads next time. Host only, no guest access.
    """
    from nephoscope.introspect.interp import builds

    cache = builds.BuildCache("php-builds.json", _valid_build)
    record = cache.get(build_id)
    if record is not None:
        return PhpBuild(**record)
    if builds.failure(cache, package, binary, build_id) is not None:
        return None  # tried in vain earlier in this run

    def identify(version: str, path: Path) -> str:
        build = build_from_elf(path, package, version, binary)
        cache.put(build.build_id, asdict(build))
        return build.build_id

    search = builds.find_debian_version(build_id, package, binary, versions=versions,
                                        skip=cache.versions(package), identify=identify)
    cache.save()
    if search.version is None:
        builds.remember_failure(cache, package, binary, build_id, search.why(build_id, package, binary))
        return None
    return PhpBuild(**cache.entries[build_id])


# --- the engine state --------------------------------------------------------------------------------


class Engine:
    """Bounded typed reads of one PHP process's memory with the build's layout."""

    def __init__(self, read: Read, layout: dict[str, int]) -> None:
        self.read, self.o = read, layout

    def u64(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 8), "little")

    def u32(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 4), "little")

    def zstr(self, gva: int, what: str) -> str:
        """Return the zend_string at gva (its len checked, at most MAX_STRING bytes, NUL-terminated)."""
        if not gva or gva % 8:
            raise GuestDataError(f"{what}: zend_string pointer 0x{gva:x} is null or misaligned")
        n = self.u64(gva + self.o["zend_string.len"])
        if n > MAX_STRING:
            raise GuestDataError(f"{what}: zend_string at 0x{gva:x} claims {n} bytes")
        raw = self.read(gva + self.o["zend_string.val"], n + 1)
        if raw[n:] != b"\0":
            raise GuestDataError(f"{what}: zend_string at 0x{gva:x} is not NUL-terminated at its length")
        return raw[:n].decode("utf-8", "backslashreplace")

    def table(self, gva: int, what: str) -> tuple[int, int, int, int]:
        """Return (flags, arData, nNumUsed, nNumOfElements) of the HashTable at gva after structural checks."""
        o = self.o
        blob = self.read(gva, o["sizeof.HashTable"])
        flags, = struct.unpack_from("<I", blob, o["HashTable.u.flags"])
        mask, = struct.unpack_from("<I", blob, o["HashTable.nTableMask"])
        ar, = struct.unpack_from("<Q", blob, o["HashTable.arData"])
        used, count, size = struct.unpack_from("<III", blob, o["HashTable.nNumUsed"])
        if flags & o["const.HASH_FLAG_UNINITIALIZED"]:
            return flags, 0, 0, 0
        if not 8 <= size <= MAX_TABLE or size & (size - 1) or not count <= used <= size or not ar or ar % 8:
            raise GuestDataError(f"{what}: hash table at 0x{gva:x} is not one (size {size}, used {used}, "
                                 f"elements {count}, data 0x{ar:x})")
        if not flags & o["const.HASH_FLAG_PACKED"] and mask != (-2 * size) & 0xFFFFFFFF:
            raise GuestDataError(f"{what}: hash table at 0x{gva:x} has mask 0x{mask:x} for size {size}")
        return flags, ar, used, count

    def keys(self, gva: int, what: str, cap: int) -> list[str]:
        """Return the string keys of the (non-packed) HashTable at gva, in insertion order."""
        o = self.o
        flags, ar, used, count = self.table(gva, what)
        if not used:
            return []
        if flags & o["const.HASH_FLAG_PACKED"]:
            raise GuestDataError(f"{what}: a packed array where a string-keyed table belongs")
        if used > cap:
            raise GuestDataError(f"{what}: {used} entries (cap {cap})")
        step = o["sizeof.Bucket"]
        blob = self.read(ar, used * step)
        out = []
        for i in range(used):
            ztype = blob[i * step + o["Bucket.val"] + o["zval.u1.type_info"]]
            if ztype == o["const.IS_UNDEF"]:
                continue
            key, = struct.unpack_from("<Q", blob, i * step + o["Bucket.key"])
            out.append(self.zstr(key, f"{what} key {i}"))
        if len(out) != count:
            raise GuestDataError(f"{what}: {len(out)} live entries where the table counts {count}")
        return out

    def frame(self, ex: int) -> tuple[PhpFrame, int]:
        """Return the frame of the zend_execute_data at gva `ex` and the previous execute_data."""
        o = self.o
        blob = self.read(ex, o["sizeof.zend_execute_data"])
        opline, = struct.unpack_from("<Q", blob, o["zend_execute_data.opline"])
        func, = struct.unpack_from("<Q", blob, o["zend_execute_data.func"])
        prev, = struct.unpack_from("<Q", blob, o["zend_execute_data.prev_execute_data"])
        if not func or func % 8:
            raise GuestDataError(f"execute_data 0x{ex:x}: func 0x{func:x} is null or misaligned")
        ftype = self.read(func + o["zend_function.type"], 1)[0]
        name_ptr = self.u64(func + o["zend_function.common.function_name"])
        scope = self.u64(func + o["zend_function.common.scope"])
        cls = self.zstr(self.u64(scope + o["zend_class_entry.name"]), "class name") if scope else ""
        if ftype == o["const.ZEND_INTERNAL_FUNCTION"]:
            return PhpFrame(self.zstr(name_ptr, "internal function name"), cls, "", 0, internal=True), prev
        if ftype not in (o["const.ZEND_USER_FUNCTION"], o["const.ZEND_EVAL_CODE"]):
            raise GuestDataError(f"execute_data 0x{ex:x}: function type {ftype} is not a PHP function")
        name = self.zstr(name_ptr, "function name") if name_ptr else "{main}"
        filename = self.zstr(self.u64(func + o["zend_function.op_array.filename"]), "file name")
        opcodes = self.u64(func + o["zend_function.op_array.opcodes"])
        last = self.u32(func + o["zend_function.op_array.last"])
        size = o["sizeof.zend_op"]
        if not opcodes or not opcodes <= opline < opcodes + last * size or (opline - opcodes) % size:
            raise GuestDataError(f"{name} ({filename}): opline 0x{opline:x} is outside its {last} opcodes "
                                 f"at 0x{opcodes:x}")
        line = self.u32(opline + o["zend_op.lineno"])
        start = self.u32(func + o["zend_function.op_array.line_start"])
        if line < start or line > 1 << 24:
            raise GuestDataError(f"{name} ({filename}): line {line} before the function's start {start}")
        return PhpFrame(name, cls, filename, line), prev


def _layout_for(build: PhpBuild) -> dict[str, int]:
    layout = LAYOUTS.get((build.api, build.thread_safety))
    if layout is None:
        raise KnowledgeError(f"no PHP struct layout for API {build.api} {build.thread_safety} ({build.package} "
                             f"{build.version}); derive one with php_layout.derive_layout from its -dev headers")
    if layout["sizeof.zend_executor_globals"] != build.executor_globals_size or \
            layout["sizeof.sapi_globals_struct"] != build.sapi_globals_size:
        raise KnowledgeError(f"the PHP layout for API {build.api} does not fit {build.package} {build.version}: "
                             f"executor_globals is {build.executor_globals_size} bytes, sapi_globals "
                             f"{build.sapi_globals_size}")
    return layout


def read_state(read: Read, build: PhpBuild, bias: int) -> PhpState:
    """Return the PHP state of one process (user gvas relocated by `bias`); never raises for guest data."""
    state = PhpState(build=build)
    try:
        layout = _layout_for(build)
    except KnowledgeError as exc:
        return state.fail(str(exc))
    eng, o = Engine(read, layout), layout
    eg = bias + build.executor_globals
    try:
        head = [eng.u64(eg + o[f"zend_executor_globals.{n}"])
                for n in ("function_table", "class_table", "current_execute_data")]
    except _BAD as exc:
        return state.fail(f"executor_globals at 0x{eg:x} unreadable: {exc}")
    if head == [0, 0, 0]:  # init_executor() never ran here: a php-fpm master, a worker before its first request
        state.activated = False
        return state
    try:
        for name in ("function_table", "class_table"):  # the engine's own tables prove the address
            _flags, _ar, _used, count = eng.table(eng.u64(eg + o[f"zend_executor_globals.{name}"]), name)
            if count < 8:
                raise GuestDataError(f"EG({name}) holds only {count} entries")
    except _BAD as exc:
        return state.fail(f"executor_globals at 0x{eg:x} does not validate: {exc}")
    try:
        active = eng.read(eg + o["zend_executor_globals.active"], 1)[0]
    except _BAD as exc:
        return state.fail(f"EG(active) unreadable: {exc}")
    if active > 1:
        return state.fail(f"EG(active) is {active}, not a bool")
    if not active:
        # between requests: zend_shutdown_executor_values() cleared EG(active) and zend_hash_destroy() freed
        # EG(included_files) without resetting it, so its (stale) contents belong to a finished request
        state.activated = False
        if head[2]:
            state.fail(f"EG(current_execute_data) is 0x{head[2]:x} while the executor is not active")
        return state
    sg = bias + build.sapi_globals
    try:
        ri = {k: eng.u64(sg + o[f"sapi_globals_struct.request_info.{k}"])
              for k in ("request_uri", "request_method", "path_translated")}
        state.request_uri = _cstr(read, ri["request_uri"])
        state.request_method = _cstr(read, ri["request_method"], 32)
        state.script = _cstr(read, ri["path_translated"])
    except _BAD as exc:
        state.fail(f"SG(request_info) unreadable: {exc}")
    try:
        ex = eng.u64(eg + o["zend_executor_globals.current_execute_data"])
        seen: set[int] = set()
        while ex:
            if ex in seen:
                raise GuestDataError(f"the execute_data chain loops at 0x{ex:x}")
            if len(seen) >= MAX_FRAMES:
                raise GuestDataError(f"more than {MAX_FRAMES} frames")
            if ex % 8:
                raise GuestDataError(f"execute_data 0x{ex:x} is misaligned")
            seen.add(ex)
            frame, ex = eng.frame(ex)
            state.frames.append(frame)
    except _BAD as exc:
        state.frames.clear()  # a partial stack would be a made-up one
        state.fail(f"the call stack does not validate: {exc}")
    try:
        state.included_files = eng.keys(eg + o["zend_executor_globals.included_files"], "EG(included_files)",
                                        MAX_INCLUDED)
    except _BAD as exc:
        state.included_files.clear()
        state.fail(f"the included files do not validate: {exc}")
    return state


def _cstr(read: Read, gva: int, limit: int = MAX_STRING) -> str:
    """Return the C string at user gva (empty for NULL), not crossing unmapped pages, at most `limit` bytes."""
    out = b""
    while gva and len(out) < limit:
        n = min(limit - len(out), 4096 - (gva + len(out)) % 4096)
        chunk = read(gva + len(out), n)
        nul = chunk.find(b"\0")
        if nul >= 0:
            return (out + chunk[:nul]).decode("utf-8", "backslashreplace")
        out += chunk
    if gva:
        raise GuestDataError(f"string at 0x{gva:x} longer than {limit} bytes")
    return ""


def inspect_process(read: Read, exe: str, vmas: Sequence[object],
                    lookup: Callable[[str, str, str], PhpBuild | None] = find_build,
                    headers: Iterable[tuple[Read, int]] = (), opcache_read: Read | None = None) -> PhpState | None:
    """Return the PHP state of a process running Debian's PHP binary `exe`, or None when it is not PHP.

    `read` reads the process's user memory, `vmas` are its mappings (walkers.Vma), `lookup(build_id,
    package, binary)` finds the build. `headers`: other (read, base) views of the same binary file, tried
    when this process's page tables do not map its ELF header page (fork does not copy the PTEs of
    untouched file pages, so php-fpm workers often lack it). `opcache_read` reads opcache's shared segment
    (default `read`; see php_opcache.segment_reader). Nothing here pauses the VM.
    """
    known = php_binary(exe)
    if known is None:
        return None
    package, binary = known
    base = image_base(vmas, binary)
    if base is None:
        return PhpState().fail(f"{binary} is not mapped at file offset 0")
    problems = []
    for view_read, view_base in itertools.chain([(read, base)], headers):
        try:
            build_id, delta = read_build_id(view_read, view_base)
            break
        except _BAD as exc:
            problems.append(str(exc))
    else:
        return PhpState().fail(f"{binary}: build id unreadable ({'; '.join(problems)})")
    bias = base - delta
    try:
        build = lookup(build_id, package, binary)
    except NephoscopeError as exc:  # a lookup that cannot run (no KB, no apt) is a reason, not a crash
        return PhpState().fail(f"{binary} build {build_id}: the build lookup failed ({exc})")
    if build is None:
        return PhpState().fail(f"{binary} build {build_id} is no Debian {package} build nephoscope can fetch")
    state = read_state(read, build, bias)
    layout = LAYOUTS.get((build.api, build.thread_safety))
    if layout is not None and "zend_accel_shared_globals.hits" in layout:
        state.opcache = php_opcache.read_cache(opcache_read or read, layout, vmas)
        if not state.opcache.complete:
            state.fail(f"opcache: {state.opcache.problem}")
    return state


def read_process(k: LinuxKernel, task: Task, peers: Iterable[Task] | None = None,
                 vmas: Sequence[object] | None = None) -> PhpState | None:
    """Return the PHP state of `task` (a process), None if it runs no Debian PHP binary.

    The binary's ELF header is read through the process, else from the page cache, else through `peers`
    (other processes mapping the same file, e.g. the php-fpm master; default: the guest's process list,
    walked only if needed). Reads user memory through the process's page tables (user gvas) and kernel
    structures; does not pause the VM.
    """
    exe = task.exe or ""
    if php_binary(exe) is None or not task.mm_gva:
        return None
    incomplete = ""
    if vmas is None:
        listing = k.vmas(task)
        vmas, incomplete = listing.items, listing.problem

    def reader(t: Task) -> Read:
        space = k.user_space(k.u64(t.mm_gva + k.off["mm_struct.pgd"]))
        return lambda gva, size: k.read_in(space, gva, size)

    def views() -> Iterator[tuple[Read, int]]:
        head = next((v for v in vmas if getattr(v, "path", "") == exe and getattr(v, "offset", 1) == 0), None)
        if head is not None and head.file_gva:  # type: ignore[attr-defined]
            try:
                from nephoscope.os.linux import pagecache

                cached = pagecache.read_cached_file(k, head.file_gva, max_bytes=PAGE_SIZE)  # type: ignore[attr-defined]
                yield file_view(cached.data, cached.absent, head.start), head.start  # type: ignore[attr-defined]
            except _BAD:
                pass
        for peer in peers if peers is not None else k.processes().items:
            if peer.pid == task.pid or peer.exe != exe or not peer.mm_gva:
                continue
            try:
                base = image_base(k.vmas(peer).items, exe)
                if base is not None:
                    yield reader(peer), base
            except _BAD:
                continue

    try:
        read = reader(task)
    except _BAD as exc:
        return PhpState().fail(f"the address space of pid {task.pid} is unreadable ({exc})")
    state = inspect_process(read, exe, vmas, headers=views(), opcache_read=php_opcache.segment_reader(k, read, vmas))
    if state is not None and incomplete:
        state.fail(f"the mapping walk stopped early: {incomplete}")
    return state


def read_php(ctx: ProcessContext) -> InterpResult | None:
    """Return what the PHP process of `ctx` runs as an interpreter result (the registry's reader; no pause)."""
    from nephoscope.core.records import Verdict
    from nephoscope.introspect.interp import Frame, InterpResult, InterpThread

    task = ctx.task
    state = read_process(ctx.kernel, task, vmas=ctx.vmas)
    if state is None:
        return None
    b = state.build
    runtime = f"PHP {b.version.split('-')[0]} ({b.package} {b.version})" if b else "PHP (unknown build)"
    frames = tuple(Frame(f.file or "<internal>", f"{f.cls}::{f.function}" if f.cls else f.function,
                         f.line if not f.internal else -1) for f in state.frames)
    details: dict[str, object] = {"binary": task.exe or "", "request_uri": state.request_uri,
                                  "request_method": state.request_method, "activated": state.activated,
                                  "busy": state.busy}
    if b:
        details.update(build_id=b.build_id, api=b.api, thread_safety=b.thread_safety)
    cached: list[str] = []
    if state.opcache is not None and state.opcache.mapped:
        details["opcache"] = state.opcache.to_json()
        cached = state.opcache.scripts
    if state.complete:
        verdict, reason = Verdict.VERIFIED, ("executor_globals validated against the build; "
                                             + ("serving a request" if state.busy else "idle (no request running)"))
        if state.opcache is not None and state.opcache.started:
            reason += f"; opcache's shared hash validated: {len(cached)} cached scripts"
    else:
        verdict, reason = Verdict.UNVERIFIABLE, state.problem
    return InterpResult(task.pid, task.comm, "php", runtime, verdict, reason,
                        entry=state.script or (state.frames[-1].file if state.frames else ""),
                        threads=[InterpThread(0, task.pid, frames)] if state.activated else [],
                        scripts=list(dict.fromkeys([*state.included_files, *cached])), details=details)
