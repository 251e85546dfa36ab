"""CPython from outside: `_PyRuntime` → interpreters → thread states → frames → code objects, and modules.

A process is a known CPython when one of its file mappings is a `pythonX.Y` ELF whose GNU build id (read
from the mapped ELF header in the process's memory) names a Debian build with known offsets: one in
`py_offsets.json`, or one derived on demand from that build's python3.11-dbg (pyoffsets.find_offsets);
the entry names the Debian package and version of that exact build and holds the struct offsets read
from that build's DWARF. Symbols (`_PyRuntime`, `PyCode_Type`, ...) come from the same
build's symbol table in the packaged binary (the .deb from the KB's download cache, pyelftools), relocated
by the load bias (the start of the file's offset-0 mapping). Every object is proved before use: the
interpreter points back at the runtime, every thread state at its interpreter, every code object,
string, bytes and dict has the exact type object of this build; every read, string, table and walk is
bounded and cycles are detected. Anything else gives `unverifiable` with the reason, never a guess.

3.11 only for now (Debian 12): frames are `_PyInterpreterFrame`s reached through `tstate->cframe->
current_frame`, lines come from `co_linetable` (PEP 657's format) and `prev_instr`. 3.12 moved the
frame pointer into the thread state (`tstate->cframe` still) and 3.13 ships `_Py_DebugOffsets` in
`_PyRuntime`: a `Layout` per minor version is where they plug in. Addresses are user gvas of the
process. Nothing here pauses the VM.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from nephoscope.core.errors import GuestDataError, KnowledgeError
from nephoscope.core.records import Verdict
from nephoscope.introspect.interp import GUEST_ERRORS, Frame, InterpResult, InterpThread, ProcessContext
from nephoscope.introspect.interp.pyoffsets import SYMBOLS_311, find_offsets

SUPPORTED_MINORS = ("3.11",)
PYTHON_RE = re.compile(r"/(?:lib)?python(3\.\d+)[a-z]*(?:\.so[.\d]*)?$")
MAX_INTERPRETERS = 64
MAX_THREADS = 4096
MAX_FRAMES = 2048
MAX_STRING = 4096
MAX_LINETABLE = 1 << 16
MAX_DICT_ENTRIES = 1 << 16
MAX_MODULES = 1 << 14
ELF_HEADER = 64
MAX_LONG_DIGITS = 4  # thread idents are pthread_t values: at most 64 bits, three 30-bit digits
# Include/object.h (3.11): Py_TPFLAGS_MANAGED_DICT; such an instance keeps its dict pointer 3 words and its
# inline values pointer 4 words before the object (_PyObject_ManagedDictPointer, _PyObject_ValuesPointer)
MANAGED_DICT = 1 << 4
MANAGED_DICT_OFFSET, VALUES_OFFSET = -24, -32
ELF_PREFIX = 16 << 10  # the ELF header, program headers and notes of a CPython binary


@dataclass(frozen=True, slots=True)
class Build:
    """One known CPython build: package, version, offsets and symbol values (link-time)."""

    build_id: str
    package: str
    version: str
    python: str
    offsets: dict[str, int]
    symbols: dict[str, int]
    source: str = ""  # where the offsets come from (the DWARF of which dbg package; shipped or derived)

    @property
    def label(self) -> str:
        return f"CPython {self.python} ({self.package} {self.version})"


def _elf_identity(ctx: ProcessContext, vma: Any) -> tuple[str | None, int]:
    """Return (GNU build id or None, link-time vaddr of file offset 0) of the ELF file a VMA maps.

    The file's first pages are read from the guest page cache (the mapping's pages need not be faulted in
    the process); user memory at the mapping is the fallback.
    """
    from nephoscope.os.linux import pagecache

    try:
        cached = pagecache.read_cached_file(ctx.kernel, vma.file_gva, max_bytes=ELF_PREFIX)
        head = cached.data if not cached.problem and 0 not in cached.absent else ctx.read(vma.start, 4096)
    except GUEST_ERRORS:
        head = ctx.read(vma.start, 4096)
    if len(head) < ELF_HEADER or head[:4] != b"\x7fELF" or head[4] != 2:
        raise GuestDataError(f"{vma.path} is not mapped from a 64-bit ELF file")
    phoff, = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    if phentsize != 56 or not 0 < phnum <= 64 or phoff + phentsize * phnum > len(head):
        raise GuestDataError(f"{vma.path}: impossible ELF program headers")
    build_id, first_vaddr = None, None
    for i in range(phnum):
        p_type, _f, offset, vaddr, _pa, filesz = struct.unpack_from("<IIQQQQ", head, phoff + i * phentsize)
        if p_type == 1 and offset == 0 and first_vaddr is None:  # PT_LOAD of file offset 0
            first_vaddr = vaddr
        if p_type != 4 or offset + filesz > len(head):  # PT_NOTE
            continue
        notes, pos = head[offset:offset + filesz], 0
        while pos + 12 <= len(notes):
            namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
            name_end = pos + 12 + ((namesz + 3) & ~3)
            if ntype == 3 and notes[pos + 12:pos + 12 + namesz].rstrip(b"\0") == b"GNU":
                build_id = notes[name_end:name_end + descsz].hex()
            pos = name_end + ((descsz + 3) & ~3)
    if first_vaddr is None:
        raise GuestDataError(f"{vma.path}: no PT_LOAD of file offset 0")
    return build_id, first_vaddr & ~0xFFF


@lru_cache(maxsize=16)
def _packaged_symbols(package: str, version: str, binary: str, build_id: str) -> tuple[tuple[str, int], ...]:
    """Return the wanted symbols' link-time values from the packaged binary of this exact build."""
    from elftools.elf.elffile import ELFFile

    from nephoscope.core.paths import cache_root
    from nephoscope.knowledge.debian import archive
    from nephoscope.knowledge.elfpages import find_build_id

    deb = archive.download(package, version, cache_root() / "debs")
    root = archive.unpack(deb, cache_root() / "unpacked") / "root"
    path = root / binary.lstrip("/")
    if not path.is_file():
        raise KnowledgeError(f"{package} {version} has no {binary}")
    with path.open("rb") as fh:
        elf = ELFFile(fh)
        if find_build_id(elf) != build_id:
            raise KnowledgeError(f"{binary} of {package} {version} is another build than {build_id}")
        symtab = elf.get_section_by_name(".symtab") or elf.get_section_by_name(".dynsym")
        if symtab is None:
            raise KnowledgeError(f"{binary} of {package} {version} has no symbol table")
        found = {}
        for name in SYMBOLS_311:
            syms = symtab.get_symbol_by_name(name)
            if syms:
                found[name] = int(syms[0]["st_value"])
    missing = [s for s in SYMBOLS_311 if s not in found]
    if missing:
        raise KnowledgeError(f"{binary} of {package} {version} lacks {', '.join(missing)}")
    return tuple(sorted(found.items()))


def find_build(ctx: ProcessContext) -> tuple[Build, int, str] | str | None:
    """Return (build, load bias, binary path) of the CPython mapped in this process, None if it runs none,
    or a string saying why a CPython it maps is not known."""
    images: dict[str, Any] = {}
    for vma in ctx.vmas:
        if vma.file_gva and PYTHON_RE.search(vma.path) and vma.offset == 0:
            images.setdefault(vma.path, vma)
    if not images:
        return None
    why = []
    for path, vma in images.items():
        match = PYTHON_RE.search(path)
        if match and match.group(1) not in SUPPORTED_MINORS:
            why.append(f"{path}: CPython {match.group(1)} is not read yet (nephoscope walks "
                       f"{', '.join(SUPPORTED_MINORS)}; its frame layout differs)")
            continue
        try:
            build_id, first_vaddr = _elf_identity(ctx, vma)
        except GUEST_ERRORS as exc:
            why.append(f"{path}: ELF header unreadable ({exc})")
            continue
        binary = path.removesuffix(" (deleted)")
        if not build_id:
            why.append(f"{path}: the ELF file has no GNU build id, so its build cannot be named")
            continue
        entry, problem = find_offsets(build_id, binary)  # the shipped table, else derived from the dbg package
        if entry is None:
            why.append(f"{path}: {problem}")
            continue
        try:
            symbols = dict(_packaged_symbols(entry["package"], entry["version"], binary, build_id))
        except KnowledgeError as exc:
            why.append(f"{path}: {exc}")
            continue
        build = Build(build_id, entry["package"], entry["version"], entry["python"], dict(entry["offsets"]),
                      symbols, str(entry.get("source", "")))
        return build, vma.start - first_vaddr, binary
    return "; ".join(why)


class _Reader:
    """The walk of one CPython 3.11 process; every read bounded, every object type-checked."""

    def __init__(self, ctx: ProcessContext, build: Build, bias: int) -> None:
        self.ctx, self.o, self.bias = ctx, build.offsets, bias
        self.types = {name: bias + value for name, value in build.symbols.items() if name.endswith("_Type")}
        self.runtime = bias + build.symbols["_PyRuntime"]
        self._strings: dict[int, str] = {}
        self._file_key = 0  # the interned "__file__" str object, once seen
        self._other_keys: set[int] = set()  # str objects known not to be "__file__"

    def u64(self, gva: int) -> int:
        return self.ctx.u64(gva)

    def is_type(self, obj: int, name: str) -> bool:
        return bool(obj) and self.u64(obj + self.o["_object.ob_type"]) == self.types[name]

    def string(self, obj: int) -> str:
        """Return a str object's text; GuestDataError unless it is a compact str of this build."""
        if obj in self._strings:
            return self._strings[obj]
        o = self.o
        if not self.is_type(obj, "PyUnicode_Type"):
            raise GuestDataError(f"0x{obj:x} is not a str object")
        length = self.u64(obj + o["PyASCIIObject.length"])
        state = int.from_bytes(self.ctx.read(obj + o["PyASCIIObject.state"], 4), "little")
        base_bit = o["PyASCIIObject.state"] * 8
        kind = (state >> (o["PyASCIIObject.state.kind@bit"] - base_bit)) & 7
        compact = (state >> (o["PyASCIIObject.state.compact@bit"] - base_bit)) & 1
        ascii_ = (state >> (o["PyASCIIObject.state.ascii@bit"] - base_bit)) & 1
        if not compact or kind not in (1, 2, 4) or length > MAX_STRING or (ascii_ and kind != 1):
            raise GuestDataError(f"str 0x{obj:x} has an impossible state (kind {kind}, compact {compact}, "
                                 f"length {length})")
        if ascii_:
            raw = self.ctx.read(obj + o["sizeof.PyASCIIObject"], length)
            text = raw.decode("ascii", "backslashreplace")
        else:
            raw = self.ctx.read(obj + o["sizeof.PyCompactUnicodeObject"], length * kind)
            text = raw.decode({1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind], "backslashreplace")
        self._strings[obj] = text
        return text

    def bytes_of(self, obj: int, limit: int) -> bytes:
        if not self.is_type(obj, "PyBytes_Type"):
            raise GuestDataError(f"0x{obj:x} is not a bytes object")
        size = self.u64(obj + self.o["PyVarObject.ob_size"])
        if size > limit:
            raise GuestDataError(f"bytes 0x{obj:x} of {size} bytes (cap {limit})")
        return self.ctx.read(obj + self.o["PyBytesObject.ob_sval"], size)

    # --- interpreters, threads, frames ------------------------------------------------------------

    def interpreters(self) -> list[int]:
        o = self.o
        out: list[int] = []
        interp = self.u64(self.runtime + o["pyruntimestate.interpreters.head"])
        main = self.u64(self.runtime + o["pyruntimestate.interpreters.main"])
        while interp:
            if interp in out or len(out) >= MAX_INTERPRETERS:
                raise GuestDataError("the interpreter list loops or is absurdly long")
            if self.u64(interp + o["_is.runtime"]) != self.runtime:
                raise GuestDataError(f"interpreter 0x{interp:x} does not point back at _PyRuntime")
            out.append(interp)
            interp = self.u64(interp + o["_is.next"])
        if not out or main not in out:
            raise GuestDataError("_PyRuntime has no interpreter (or its main one is not on the list); "
                                 "the runtime is not initialised or not this build's")
        return out

    def thread_states(self, interp: int) -> list[int]:
        o = self.o
        out: list[int] = []
        ts, prev = self.u64(interp + o["_is.threads.head"]), 0
        while ts:
            if ts in out or len(out) >= MAX_THREADS:
                raise GuestDataError(f"the thread list of interpreter 0x{interp:x} loops")
            if self.u64(ts + o["_ts.interp"]) != interp or self.u64(ts + o["_ts.prev"]) != prev:
                raise GuestDataError(f"thread state 0x{ts:x} does not point back at its interpreter and neighbour")
            out.append(ts)
            prev, ts = ts, self.u64(ts + o["_ts.next"])
        return out

    def frames(self, ts: int) -> list[Frame]:
        o = self.o
        cframe = self.u64(ts + o["_ts.cframe"])
        frame = self.u64(cframe + o["_PyCFrame.current_frame"]) if cframe else 0
        out: list[Frame] = []
        seen: set[int] = set()
        while frame:
            if frame in seen or len(out) >= MAX_FRAMES:
                raise GuestDataError(f"the frame chain of thread state 0x{ts:x} loops or exceeds {MAX_FRAMES}")
            seen.add(frame)
            code = self.u64(frame + o["_PyInterpreterFrame.f_code"])
            if not self.is_type(code, "PyCode_Type"):
                raise GuestDataError(f"frame 0x{frame:x} has no code object (0x{code:x})")
            prev_instr = self.u64(frame + o["_PyInterpreterFrame.prev_instr"])
            out.append(self.frame(code, prev_instr))
            frame = self.u64(frame + o["_PyInterpreterFrame.previous"])
        return out

    def frame(self, code: int, prev_instr: int) -> Frame:
        o = self.o
        filename = self.string(self.u64(code + o["PyCodeObject.co_filename"]))
        name = self.string(self.u64(code + o["PyCodeObject.co_qualname"]))
        first = int.from_bytes(self.ctx.read(code + o["PyCodeObject.co_firstlineno"], 4), "little", signed=True)
        units = self.u64(code + o["PyCodeObject.ob_base.ob_size"])  # code units (_Py_CODEUNIT) in co_code_adaptive
        start = code + o["PyCodeObject.co_code_adaptive"]
        if units > 1 << 24:
            raise GuestDataError(f"code object 0x{code:x} claims {units} instructions")
        lasti = (prev_instr - start) // 2 if prev_instr >= start - 2 else -2
        if not -1 <= lasti < units:
            raise GuestDataError(f"frame's instruction pointer 0x{prev_instr:x} is outside its code object")
        table = self.bytes_of(self.u64(code + o["PyCodeObject.co_linetable"]), MAX_LINETABLE)
        return Frame(filename, name, addr2line(table, first, lasti * 2))

    # --- modules ----------------------------------------------------------------------------------

    def dict_items(self, obj: int, limit: int = MAX_DICT_ENTRIES) -> list[tuple[int, int]]:
        """Return (key object, value object) of a dict (combined or split table)."""
        o = self.o
        if not self.is_type(obj, "PyDict_Type"):
            raise GuestDataError(f"0x{obj:x} is not a dict")
        keys = self.u64(obj + o["PyDictObject.ma_keys"])
        values = self.u64(obj + o["PyDictObject.ma_values"])
        head = self.ctx.read(keys, o["sizeof._dictkeysobject"])
        log2_size, log2_index, kind = (head[o["_dictkeysobject.dk_log2_size"]],
                                       head[o["_dictkeysobject.dk_log2_index_bytes"]],
                                       head[o["_dictkeysobject.dk_kind"]])
        nentries, = struct.unpack_from("<q", head, o["_dictkeysobject.dk_nentries"])
        if log2_size > 20 or log2_index > 23 or kind > 2 or not 0 <= nentries <= min(limit, 1 << log2_size):
            raise GuestDataError(f"dict 0x{obj:x} has impossible keys (size 2^{log2_size}, {nentries} entries)")
        entry_size = o["sizeof.PyDictKeyEntry"] if kind == 0 else o["sizeof.PyDictUnicodeEntry"]
        key_off = o["PyDictKeyEntry.me_key"] if kind == 0 else o["PyDictUnicodeEntry.me_key"]
        value_off = o["PyDictKeyEntry.me_value"] if kind == 0 else o["PyDictUnicodeEntry.me_value"]
        entries = self.ctx.read(keys + o["_dictkeysobject.dk_indices"] + (1 << log2_index), nentries * entry_size)
        split = self.ctx.read(values, 8 * nentries) if values else b""
        out = []
        for i in range(nentries):
            key, = struct.unpack_from("<Q", entries, i * entry_size + key_off)
            value, = struct.unpack_from("<Q", split if values else entries,
                                        i * 8 if values else i * entry_size + value_off)
            if key and value:
                out.append((key, value))
        return out

    def long_value(self, obj: int) -> int:
        """Return the value of a small int object (at most MAX_LONG_DIGITS 30-bit digits)."""
        if not self.is_type(obj, "PyLong_Type"):
            raise GuestDataError(f"0x{obj:x} is not an int")
        size = int.from_bytes(self.ctx.read(obj + self.o["PyVarObject.ob_size"], 8), "little", signed=True)
        if abs(size) > MAX_LONG_DIGITS:
            raise GuestDataError(f"int 0x{obj:x} has {size} digits")
        raw = self.ctx.read(obj + self.o["_longobject.ob_digit"], 4 * abs(size))
        value = sum((int.from_bytes(raw[i * 4:i * 4 + 4], "little") & ((1 << 30) - 1)) << (30 * i)
                    for i in range(abs(size)))
        return -value if size < 0 else value

    def attribute(self, obj: int, name: str) -> int | None:
        """Return the object an instance attribute names (its __dict__ or 3.11 inline values), or None."""
        o = self.o
        tp = self.u64(obj + o["_object.ob_type"])
        flags = self.u64(tp + o["_typeobject.tp_flags"])
        if flags & MANAGED_DICT:
            dict_ = self.u64(obj + MANAGED_DICT_OFFSET)
            values = self.u64(obj + VALUES_OFFSET) if not dict_ else 0
            if values:  # split keys shared by the class (ht_cached_keys), values inline
                keys = self.u64(tp + o["_heaptypeobject.ht_cached_keys"])
                head = self.ctx.read(keys, o["sizeof._dictkeysobject"])
                log2_index = head[o["_dictkeysobject.dk_log2_index_bytes"]]
                nentries, = struct.unpack_from("<q", head, o["_dictkeysobject.dk_nentries"])
                if head[o["_dictkeysobject.dk_kind"]] != 2 or log2_index > 23 or not 0 <= nentries <= 1 << 10:
                    raise GuestDataError(f"class keys 0x{keys:x} are not a split table")
                size = o["sizeof.PyDictUnicodeEntry"]
                entries = self.ctx.read(keys + o["_dictkeysobject.dk_indices"] + (1 << log2_index), nentries * size)
                for i in range(nentries):
                    key, = struct.unpack_from("<Q", entries, i * size + o["PyDictUnicodeEntry.me_key"])
                    if key and self.string(key) == name:
                        value = self.u64(values + 8 * i)
                        return value or None
                return None
        else:
            offset = int.from_bytes(self.ctx.read(tp + o["_typeobject.tp_dictoffset"], 8), "little", signed=True)
            dict_ = self.u64(obj + offset) if 0 < offset < 1 << 16 else 0
        if not dict_:
            return None
        return next((v for k2, v in self.dict_items(dict_)
                     if self.is_type(k2, "PyUnicode_Type") and self.string(k2) == name), None)

    def module_object(self, interp: int, name: str) -> int | None:
        """Return the module object sys.modules holds under `name`, or None."""
        for key, module in self.dict_items(self.u64(interp + self.o["_is.modules"]), MAX_MODULES):
            if self.is_type(key, "PyUnicode_Type") and self.string(key) == name:
                return module if self.is_type(module, "PyModule_Type") else None
        return None

    def thread_names(self, interp: int) -> dict[int, str]:
        """Return {thread ident: name} from threading._active (empty if threading is not imported)."""
        threading = self.module_object(interp, "threading")
        if threading is None:
            return {}
        md_dict = self.u64(threading + self.o["PyModuleObject.md_dict"])
        active = next((v for k2, v in self.dict_items(md_dict)
                       if self.is_type(k2, "PyUnicode_Type") and self.string(k2) == "_active"), None)
        if active is None:
            return {}
        names = {}
        for ident, thread in self.dict_items(active, MAX_THREADS):
            name = self.attribute(thread, "_name")
            if name is not None and self.is_type(name, "PyUnicode_Type"):
                names[self.long_value(ident)] = self.string(name)
        return names

    def modules(self, interp: int) -> dict[str, str]:
        """Return {module name: __file__} of the interpreter's sys.modules (modules without a file left out)."""
        out: dict[str, str] = {}
        for key, module in self.dict_items(self.u64(interp + self.o["_is.modules"]), MAX_MODULES):
            if not self.is_type(module, "PyModule_Type"):
                continue  # a module subclass or a placeholder object: not a plain module
            name = self.string(key)
            path = self._module_file(self.u64(module + self.o["PyModuleObject.md_dict"]))
            if path is not None:
                out[name] = path
        return out

    def _module_file(self, md_dict: int) -> str | None:
        """Return a module dict's __file__ (str), or None."""
        items = self.dict_items(md_dict)
        if self._file_key:  # attribute names are interned: one str object per process, compared by address
            value = next((v for k2, v in items if k2 == self._file_key), None)
            # (a module without that key has no __file__: builtin and frozen modules)
            return self.string(value) if value is not None and self.is_type(value, "PyUnicode_Type") else None
        for k2, v2 in items:
            if k2 not in self._other_keys and self.is_type(k2, "PyUnicode_Type"):
                if self.string(k2) == "__file__":
                    self._file_key = k2
                    return self.string(v2) if self.is_type(v2, "PyUnicode_Type") else None
                self._other_keys.add(k2)
        return None


def addr2line(table: bytes, first_line: int, addr: int) -> int:
    """Return the line of byte offset `addr` in a 3.11 code object's co_linetable (-1: no line)."""
    if addr < 0:
        return first_line
    line, pos, start = first_line, 0, 0

    def varint() -> int:
        nonlocal pos
        value, shift = 0, 0
        while pos < len(table):
            byte = table[pos]
            pos += 1
            value |= (byte & 63) << shift
            shift += 6
            if not byte & 64:
                break
        return value

    def svarint() -> int:
        v = varint()
        return -(v >> 1) if v & 1 else v >> 1

    while pos < len(table):
        byte = table[pos]
        pos += 1
        if not byte & 0x80:
            raise GuestDataError("co_linetable is not a location table (entry without its start bit)")
        code, length = (byte >> 3) & 15, (byte & 7) + 1
        delta: int | None = 0
        if code == 15:
            delta = None
        elif code == 14:
            delta = svarint()
            varint()
            varint()
            varint()
        elif code == 13:
            delta = svarint()
        elif code in (10, 11, 12):
            delta = code - 10
            pos += 2
        else:
            pos += 1
        if delta is not None:
            line += delta
        end = start + length * 2
        if start <= addr < end:
            return line if delta is not None else -1
        start = end
    return -1


def read_python(ctx: ProcessContext) -> InterpResult | None:
    """Return what the CPython in this process runs, None if it maps no CPython (user gvas; no pause)."""
    task = ctx.task
    found = find_build(ctx)
    if found is None:
        return None
    if isinstance(found, str):
        return InterpResult(task.pid, task.comm, "python", "CPython (unknown build)", Verdict.UNVERIFIABLE, found)
    build, bias, binary = found
    result = InterpResult(task.pid, task.comm, "python", build.label, Verdict.VERIFIED,
                          details={"binary": binary, "build_id": build.build_id, "load_bias": bias,
                                   "cache_tag": "cpython-" + build.python.replace(".", ""),
                                   "offsets_source": build.source,
                                   "runtime_gva": bias + build.symbols["_PyRuntime"]})
    reader = _Reader(ctx, build, bias)
    problems: list[str] = []
    try:
        interps = reader.interpreters()
    except GUEST_ERRORS as exc:
        result.verdict, result.reason = Verdict.UNVERIFIABLE, f"_PyRuntime of {build.label}: {exc}"
        return result
    modules: dict[str, str] = {}
    for interp in interps:
        try:
            states = reader.thread_states(interp)
        except GUEST_ERRORS as exc:
            problems.append(str(exc))
            continue
        for ts in states:
            try:
                frames = reader.frames(ts)
                result.threads.append(InterpThread(reader.u64(ts + build.offsets["_ts.thread_id"]),
                                                   int.from_bytes(ctx.read(ts + build.offsets["_ts.native_thread_id"],
                                                                           4), "little"), tuple(frames)))
            except GUEST_ERRORS as exc:
                problems.append(f"thread state 0x{ts:x}: {exc}")
        try:
            modules.update(reader.modules(interp))
        except GUEST_ERRORS as exc:
            problems.append(f"sys.modules: {exc}")
        try:  # names are a label, not evidence: a thread without one keeps its ids
            names = reader.thread_names(interp)
            result.threads = [InterpThread(t.thread_id, t.native_id, t.frames, names.get(t.thread_id, t.name))
                              for t in result.threads]
        except GUEST_ERRORS as exc:
            result.details["thread_names"] = f"unreadable ({exc})"
    result.scripts = sorted(set(modules.values()))
    main = modules.get("__main__")
    if main:
        result.entry = main
    elif result.threads and result.threads[-1].frames:  # the first thread state is the main thread's
        result.entry = result.threads[-1].frames[-1].file
    result.details["modules"] = len(modules)
    if problems:
        result.verdict, result.reason = Verdict.UNVERIFIABLE, "; ".join(problems[:4])
    else:
        result.reason = (f"_PyRuntime of build {build.build_id[:12]} at 0x{bias + build.symbols['_PyRuntime']:x}; "
                         f"{len(interps)} interpreter(s), {len(result.threads)} thread(s), every object type-checked")
    return result


__all__ = ["Build", "addr2line", "find_build", "read_python"]
