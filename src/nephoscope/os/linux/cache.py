"""The kernel-model cache: a second command on the same kernel skips recovery, and never trusts the cache.

What detection recovers from RAM (where kallsyms lies and what it decodes to, where the BTF lies and
which struct layouts the model resolved from it) is kept on the host, one record per kernel build
(`<cache>/kernels/<key>.json` + `.syms`, key = banner + GNU build id). Positions are stored relative to
the kernel's physical load address and its KASLR slide, so the record serves every boot of that build.

Guest memory is hostile and can change, so a record is only a guess until the image proves it:
linux_banner and the phys_base variable must read back identical at their gpas, init_top_pgt must
translate _text/linux_banner/init_task to their kernel-map gpas, the build id must match, and the bytes
the cached results were computed from (the kallsyms tables, the whole BTF blob) must hash identical
(SHA-256) — then the cached symbols and layouts equal what recovery would compute. Anything else falls
back to full detection (and rewrites the record). Nothing here pauses the VM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import struct
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nephoscope import __version__
from nephoscope.core.errors import DetectionError, GuestDataError, MemoryAccessError, NephoscopeError
from nephoscope.core.paths import cache_root
from nephoscope.os.linux.detect import (
    BANNER_PREFIX,
    KERNEL_ALIGN,
    START_KERNEL_MAP,
    Detection,
    DetectionReport,
    Stage,
    add_btf,
    banner_at,
    btf_location,
    detect,
    kernel_info,
    kernel_page_tables,
    phys_base_ok,
)
from nephoscope.os.linux.kallsyms import KERNEL_MAP_LO, Kallsyms, KallsymsLayout, Phys

if TYPE_CHECKING:
    from nephoscope.os.btf.reader import Btf
    from nephoscope.os.linux.model import Limits, LinuxKernel
    from nephoscope.os.linux.symbols import Layout, TypeSource

FORMAT = 2  # 2: members with sizes and counts, enum values (the model checks widths and the maple layout)
NO_CACHE_ENV = "NEPHOSCOPE_NO_CACHE"
MAX_RECORDS_TRIED = 16  # most recently used first; each costs a few reads before any hashing
# Symbols detection, the model and the walkers look up: served from the record without parsing all of kallsyms
HOT_SYMBOLS = ("_text", "linux_banner", "phys_base", "init_top_pgt", "__pgtable_l5_enabled", "init_task",
               "init_pid_ns", "modules", "__start_BTF", "__stop_BTF", "__start_notes", "__stop_notes",
               "page_offset_base", "vmalloc_base", "vmemmap_base", "special_mapping_vmops", "total_forks",
               "current_task", "init_mm", "kallsyms_relative_base", "init_cred", "init_struct_pid", "pcpu_hot",
               "init_signals")
MAX_BOOTS = 8  # boot positions remembered per build
SYMS_MAGIC = b"NPSYMS1\0"
_MASK64 = (1 << 64) - 1


class CacheMiss(Exception):
    """The cached record cannot answer (a question the model never asked before, or a stale record)."""


def cache_dir() -> Path:
    """Return the directory of kernel-model records (<cache>/kernels)."""
    return cache_root() / "kernels"


def cache_disabled() -> bool:
    """Return whether NEPHOSCOPE_NO_CACHE asks to bypass the kernel-model cache."""
    return os.environ.get(NO_CACHE_ENV, "").strip().lower() not in ("", "0", "no", "false")


def record_key(banner: str, build_id: str | None) -> str:
    """Return the file name stem of the record for a kernel build."""
    return hashlib.sha256(f"{banner}\0{build_id or ''}".encode("utf-8", "replace")).hexdigest()[:24]


# --- types: record what the model asked, replay it -----------------------------------------------


def _wanted_key(wanted: Mapping[str, Iterable[str]]) -> str:
    return json.dumps({s: list(paths) for s, paths in wanted.items()}, sort_keys=True)


class RecordingTypes:
    """A TypeSource that answers from `inner` and writes down every question and answer."""

    def __init__(self, inner: TypeSource) -> None:
        self.inner = inner
        self.label = inner.label
        self.log: dict[str, dict[str, Any]] = {"has_struct": {}, "struct_size": {}, "members": {},
                                                "enum_values": {}}

    def has_struct(self, name: str) -> bool:
        """Answer from the inner source and record it."""
        self.log["has_struct"][name] = answer = self.inner.has_struct(name)
        return answer

    def struct_size(self, name: str) -> int:
        """Answer from the inner source and record it."""
        self.log["struct_size"][name] = answer = self.inner.struct_size(name)
        return answer

    def members(self, wanted: Mapping[str, Iterable[str]], kernel: str = "") -> Layout:
        """Answer from the inner source and record it (failures are not recorded)."""
        wanted = {s: list(paths) for s, paths in wanted.items()}
        answer = self.inner.members(wanted, kernel)
        self.log["members"][_wanted_key(wanted)] = _layout_json(answer)
        return answer

    def enum_values(self, name: str) -> dict[str, int] | None:
        """Answer from the inner source and record it."""
        self.log["enum_values"][name] = answer = self.inner.enum_values(name)
        return answer


def _layout_json(layout: Layout) -> dict[str, dict[str, list[int | None]]]:
    return {s: {p: [m.offset, m.size, m.count, m.bit_offset, m.bitfield_size] for p, m in members.items()}
            for s, members in layout.items()}


def _layout_of(answer: Any) -> Layout:
    """Return a recorded layout as MemberInfo; raise CacheMiss if the record is malformed."""
    from nephoscope.os.linux.symbols import MemberInfo

    if not isinstance(answer, Mapping) or not all(isinstance(m, Mapping) for m in answer.values()):
        raise CacheMiss("malformed members answer")
    layout: Layout = {}
    for s, members in answer.items():
        layout[str(s)] = {}
        for p, row in members.items():
            if not isinstance(row, list) or len(row) != 5:
                raise CacheMiss("malformed members answer")
            offset, size, count, bit, width = row
            layout[str(s)][str(p)] = MemberInfo(_offset(offset), _offset(size),
                                                None if count is None else _offset(count), _offset(bit),
                                                _offset(width))
    return layout


class ReplayTypes:
    """A TypeSource that replays a RecordingTypes log.

    A question the log lacks (a newer model, or a walker asking later) is answered by `fallback` — the
    image's own BTF, already proved identical — and learnt (`learnt` is then True); without a fallback
    it raises CacheMiss.
    """

    def __init__(self, log: Mapping[str, Any], label: str,
                 fallback: TypeSource | Callable[[], TypeSource] | None = None) -> None:
        self.log = log
        self.label = label
        self.fallback = fallback  # a TypeSource, or a function making one on the first miss
        self.learnt = False

    def _get(self, table: str, key: str, ask: Any = None) -> Any:
        entries = self.log.get(table)
        if isinstance(entries, Mapping) and key in entries:
            return entries[key]
        if self.fallback is None or ask is None or not isinstance(entries, dict):
            raise CacheMiss(f"{table}({key[:60]}) was not recorded")
        if callable(self.fallback) and not hasattr(self.fallback, "members"):
            self.fallback = self.fallback()
        entries[key] = answer = ask(self.fallback)  # a GuestDataError here is the model's own answer
        self.learnt = True
        return answer

    def has_struct(self, name: str) -> bool:
        """Replay the recorded answer."""
        answer = self._get("has_struct", name, lambda t: t.has_struct(name))
        if not isinstance(answer, bool):
            raise CacheMiss(f"malformed has_struct({name}) answer")
        return answer

    def struct_size(self, name: str) -> int:
        """Replay the recorded answer."""
        return _offset(self._get("struct_size", name, lambda t: t.struct_size(name)))

    def members(self, wanted: Mapping[str, Iterable[str]], kernel: str = "") -> Layout:
        """Replay the recorded answer for exactly this `wanted`."""
        wanted = {s: list(paths) for s, paths in wanted.items()}
        return _layout_of(self._get("members", _wanted_key(wanted),
                                    lambda t: _layout_json(t.members(wanted, kernel))))

    def enum_values(self, name: str) -> dict[str, int] | None:
        """Replay the recorded answer."""
        answer = self._get("enum_values", name, lambda t: t.enum_values(name))
        if answer is None:
            return None
        if not isinstance(answer, Mapping) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                      for v in answer.values()):
            raise CacheMiss(f"malformed enum_values({name}) answer")
        return {str(k): v for k, v in answer.items()}


def _offset(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << 32):
        raise CacheMiss(f"malformed recorded offset or size {value!r}")
    return value


class LazyBtf:
    """The guest's BTF, already read and hash-checked, parsed only if something asks for it (e.g. `isf`)."""

    def __init__(self, blob: bytes, label: str) -> None:
        self._blob: bytes | None = blob
        self.label = label
        self._btf: Btf | None = None

    def _get(self) -> Btf:
        if self._btf is None:
            from nephoscope.os.btf.reader import Btf

            assert self._blob is not None
            self._btf = Btf.parse(self._blob, label=self.label)
            self._blob = None
        return self._btf

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def __len__(self) -> int:
        return len(self._get())


# --- the record ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Record:
    """One kernel build as the cache knows it; gpas are relative to _text's gpa, gvas to the KASLR slide."""

    key: str
    banner: str
    build_id: str | None
    text_gva_link: int  # _text minus the slide
    banner_rel: int  # linux_banner gpa - _text gpa
    layout_rel: dict[str, int]  # kallsyms table gpas - _text gpa, plus sizes and flags
    relative_base_link: int
    kallsyms_sha256: str
    btf_rel: int | None
    btf_size: int
    btf_sha256: str | None
    types_log: dict[str, Any]
    count: int  # number of kallsyms symbols
    hot: dict[str, int | None]  # HOT_SYMBOLS as the full table answers them (gvas at syms_slide)
    syms_sha256: str  # of <key>.syms
    seen: list[list[int]]  # [_text gpa, slide] of recent boots, newest first (the same boot skips all scans)
    syms_slide: int  # the slide the .syms addresses were written with

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form written to <key>.json."""
        return {"format": FORMAT, "version": __version__, **{f: getattr(self, f) for f in self.__slots__}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Record:
        """Parse a record; raise CacheMiss if it is of another format or malformed."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT or data.get("version") != __version__:
            raise CacheMiss("record of another format or nephoscope version")
        try:
            record = cls(**{f: data[f] for f in cls.__slots__})
        except (KeyError, TypeError) as exc:
            raise CacheMiss(f"malformed record: {exc}") from exc
        for name, kind in cls.__annotations__.items():
            if not _conforms(getattr(record, name), kind):
                raise CacheMiss(f"malformed record: {name} is not {kind}")
        if set(record.layout_rel) != set(LAYOUT_KEYS) or not all(isinstance(p, int) for s in record.seen for p in s) \
                or not all(len(s) == 2 for s in record.seen) or not all(v is None or isinstance(v, int)
                                                                         for v in record.hot.values()):
            raise CacheMiss("malformed record: positions")
        return record


LAYOUT_FIELDS = ("token_table_gpa", "token_index_gpa", "names_gpa", "markers_gpa", "offsets_gpa")
LAYOUT_KEYS = (*LAYOUT_FIELDS, "names_size", "marker_width", "num_syms", "absolute_percpu", "names_first", "seqs_rel")
_TYPES = {"str": str, "int": int, "dict[str, int]": dict, "dict[str, Any]": dict, "dict[str, int | None]": dict,
          "list[list[int]]": list, "str | None": (str, type(None)), "int | None": (int, type(None))}


def _conforms(value: Any, annotation: str) -> bool:
    """Return whether a JSON value has the record field's (outer) type; ints are never bools."""
    if isinstance(value, bool):
        return False
    if annotation == "dict[str, int]":
        return isinstance(value, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in value.values())
    return isinstance(value, _TYPES[annotation])


def _layout_rel(layout: KallsymsLayout, text_gpa: int) -> dict[str, int]:
    rel = {f: getattr(layout, f) - text_gpa for f in LAYOUT_FIELDS}
    rel.update(names_size=layout.names_size, marker_width=layout.marker_width, num_syms=layout.num_syms,
               absolute_percpu=int(layout.absolute_percpu), names_first=int(layout.order == "names-first"),
               seqs_rel=(layout.seqs_gpa - text_gpa) if layout.seqs_gpa is not None else -1)
    return rel


def _kallsyms_tables(phys: Phys, rel: Mapping[str, int], text_gpa: int) -> tuple[str, int, int]:
    """Return (sha256 of the bytes kallsyms decodes from, num_syms, relative_base) at `text_gpa`."""
    n, width = rel["num_syms"], rel["marker_width"]
    gpa = {f: text_gpa + rel[f] for f in LAYOUT_FIELDS}
    h = hashlib.sha256()
    for start, size in ((gpa["token_table_gpa"], gpa["token_index_gpa"] + 512 - gpa["token_table_gpa"]),
                        (gpa["names_gpa"], rel["names_size"]), (gpa["markers_gpa"], ((n + 255) // 256) * width),
                        (gpa["offsets_gpa"], 4 * n)):
        if not 0 < size <= 64 << 20:
            raise CacheMiss("implausible kallsyms table size")
        h.update(phys.read(start, size))
    num = int.from_bytes(phys.read(gpa["names_gpa"] - 8, 8), "little")
    return h.hexdigest(), num, int.from_bytes(phys.read(text_gpa + _relative_base_rel(rel), 8), "little")


def _relative_base_rel(rel: Mapping[str, int]) -> int:
    """Return where kallsyms_relative_base sits, relative to _text's gpa (its place depends on the order)."""
    if rel["names_first"]:
        return ((rel["offsets_gpa"] + 4 * rel["num_syms"] + 7) & ~7)
    return rel["names_gpa"] - 16


def iter_placements(phys: Phys, record: Record) -> Iterator[tuple[int, int]]:
    """Yield (_text gpa, KASLR slide) wherever this build's linux_banner and kallsyms relative base line up.

    The kernel is loaded at a KERNEL_ALIGN (2 MiB) boundary, so a few hundred small reads find another boot
    of a known build without scanning RAM; every placement is still only a guess until validate() proves it.
    """
    expected = _banner_bytes(record.banner)
    rb_rel = _relative_base_rel(record.layout_rel)
    for start, end in phys.ranges:
        for text_gpa in range((start + KERNEL_ALIGN - 1) & ~(KERNEL_ALIGN - 1), end, KERNEL_ALIGN):
            try:
                if phys.read(text_gpa + record.banner_rel, len(expected)) != expected:
                    continue
                relative_base = int.from_bytes(phys.read(text_gpa + rb_rel, 8), "little")
            except MemoryAccessError:
                continue
            slide = (relative_base - record.relative_base_link) & _MASK64
            if slide < (1 << 31) and slide % KERNEL_ALIGN == 0:
                yield text_gpa, slide


def _relayout(rel: Mapping[str, int], text_gpa: int, relative_base: int) -> KallsymsLayout:
    return KallsymsLayout(
        *(text_gpa + rel[f] for f in ("token_table_gpa", "token_index_gpa", "names_gpa")), rel["names_size"],
        text_gpa + rel["markers_gpa"], rel["marker_width"], rel["num_syms"], text_gpa + rel["offsets_gpa"],
        relative_base, text_gpa + rel["seqs_rel"] if rel["seqs_rel"] >= 0 else None, bool(rel["absolute_percpu"]),
        "names-first" if rel["names_first"] else "offsets-first")


def _syms_bytes(syms: Kallsyms) -> bytes:
    names = "\0".join(syms.names).encode("latin-1", "replace")
    types = syms.types.encode("latin-1", "replace")
    addresses = array("Q", syms.addresses.tolist()).tobytes()
    return SYMS_MAGIC + struct.pack("<III", len(syms), len(types), len(names)) + types + names + addresses


def _slid(gva: int, delta: int) -> int:
    return (gva + delta) & _MASK64 if delta and gva >= KERNEL_MAP_LO else gva


def _parse_syms(raw: bytes, count: int, delta: int) -> tuple[list[str], str, array]:
    """Return (names, types, gvas) of a <key>.syms blob moved by `delta` (kernel-map gvas only)."""
    if raw[:len(SYMS_MAGIC)] != SYMS_MAGIC:
        raise DetectionError("kernel-model cache: not a symbols file; rerun with --no-cache")
    n, ntypes, nnames = struct.unpack_from("<III", raw, len(SYMS_MAGIC))
    at = len(SYMS_MAGIC) + 12
    if n != count or ntypes != n or len(raw) != at + ntypes + nnames + 8 * n:
        raise DetectionError("kernel-model cache: truncated symbols file; rerun with --no-cache")
    types = raw[at:at + ntypes].decode("latin-1")
    names = raw[at + ntypes:at + ntypes + nnames].decode("latin-1").split("\0") if n else []
    addresses = array("Q")
    addresses.frombytes(raw[at + ntypes + nnames:])
    if len(names) != n:
        raise DetectionError("kernel-model cache: symbols file names do not match its count; rerun with --no-cache")
    if delta:
        addresses = array("Q", [_slid(a, delta) for a in addresses])
    return names, types, addresses


def _lazy_slot(name: str) -> property:
    member = Kallsyms.__dict__[name]  # the dataclass slot

    def get(self: CachedKallsyms) -> Any:
        if member.__get__(self) is None:
            self._load()
        return member.__get__(self)

    def put(self: CachedKallsyms, value: Any) -> None:
        member.__set__(self, value)

    return property(get, put)


class CachedKallsyms(Kallsyms):
    """Kallsyms from the cache: the symbols models look up at once, the full table parsed on first need."""

    __slots__ = ("_count", "_delta", "_hot", "_raw")
    names = _lazy_slot("names")
    types = _lazy_slot("types")
    addresses = _lazy_slot("addresses")  # an array('Q'): .tolist() like the ndarray recovery returns

    def __init__(self, layout: KallsymsLayout, count: int, hot: Mapping[str, int | None], raw: bytes,
                 delta: int) -> None:
        self._count, self._delta, self._raw = count, delta, raw
        self._hot = {name: None if gva is None else _slid(gva, delta) for name, gva in hot.items()}
        Kallsyms.__init__(self, layout, None, None, None)  # type: ignore[arg-type]

    def _load(self) -> None:
        names, types, addresses = _parse_syms(self._raw, self._count, self._delta)
        Kallsyms.__dict__["names"].__set__(self, names)
        Kallsyms.__dict__["types"].__set__(self, types)
        Kallsyms.__dict__["addresses"].__set__(self, addresses)

    def __len__(self) -> int:
        return self._count

    def find(self, name: str) -> int | None:
        """Return the gva of symbol `name`, or None (the full table only for names outside HOT_SYMBOLS)."""
        if name in self._hot:
            return self._hot[name]
        return super().find(name)

    def get(self, name: str) -> int:
        """Return the gva of symbol `name`; raise DetectionError if the kernel has none."""
        gva = self.find(name)
        if gva is None:
            raise DetectionError(f"kallsyms: the kernel has no symbol {name!r} (stage kallsyms)")
        return gva


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- validation ----------------------------------------------------------------------------------


def _stage(report: DetectionReport, name: str, detail: str, t0: float) -> float:
    now = time.perf_counter()
    report.stages.append(Stage(name, True, detail, now - t0))
    return now


def _banner_bytes(banner: str) -> bytes:
    return banner.encode("ascii", "replace")


def validate(phys: Phys, record: Record, directory: Path, text_gpa: int, slide: int
             ) -> tuple[Detection, TypeSource]:
    """Return the detection `record` gives for a kernel whose _text is at `text_gpa` with KASLR `slide`.

    Raise CacheMiss unless the image proves every cached fact (see the module docstring).
    """
    report = DetectionReport()
    t0 = time.perf_counter()
    try:
        expected = _banner_bytes(record.banner)
        if phys.read(text_gpa + record.banner_rel, len(expected)) != expected:
            raise CacheMiss("linux_banner differs at its cached gpa")
        t0 = _stage(report, "banner", f"cached kernel {record.key}: linux_banner at gpa "
                    f"0x{text_gpa + record.banner_rel:x} reads back identical", t0)
        digest, num, relative_base = _kallsyms_tables(phys, record.layout_rel, text_gpa)
        if num != record.layout_rel["num_syms"] or relative_base != (record.relative_base_link + slide) & _MASK64:
            raise CacheMiss("kallsyms num_syms or relative base differ")
        if digest != record.kallsyms_sha256:
            raise CacheMiss("kallsyms tables differ from the cached ones")
        layout = _relayout(record.layout_rel, text_gpa, relative_base)
        raw = (directory / f"{record.key}.syms").read_bytes()
        if hashlib.sha256(raw).hexdigest() != record.syms_sha256:
            raise CacheMiss("the cached symbols file was changed")
        syms = CachedKallsyms(layout, record.count, record.hot, raw, slide - record.syms_slide)
        t0 = _stage(report, "kallsyms", f"{len(syms)} symbols from the cache; the tables at gpa "
                    f"0x{layout.names_gpa:x} hash identical (SHA-256)", t0)
        text_gva = record.text_gva_link + slide
        if syms.find("_text") != text_gva:
            raise CacheMiss("cached _text disagrees with the slide")
        phys_base = (text_gpa - (text_gva - START_KERNEL_MAP)) & _MASK64
        if not phys_base_ok(phys, syms, phys_base) or not banner_at(phys, syms, phys_base):
            raise CacheMiss("phys_base variable or linux_banner disagree")
        t0 = _stage(report, "phys/virt base", f"phys_base 0x{phys_base:x}, slide 0x{slide:x}: the phys_base "
                    "variable and linux_banner agree", t0)
        space, how = kernel_page_tables(phys, syms, phys_base)
        t0 = _stage(report, "page-table root", how, t0)
        btf: LazyBtf | None = None
        btf_found = None
        if record.btf_sha256 is not None:
            where = btf_location(syms, phys_base)
            gpa, size = where if where is not None else (text_gpa + (record.btf_rel or 0), record.btf_size)
            if size != record.btf_size:
                raise CacheMiss("BTF size differs")
            blob = phys.read(gpa, size)
            if hashlib.sha256(blob).hexdigest() != record.btf_sha256:
                raise CacheMiss("BTF differs from the cached one")
            btf = LazyBtf(blob, f"vmlinux BTF at gpa 0x{gpa:x}")
            btf_found = (btf, gpa, size)
            t0 = _stage(report, "btf", f"cached layouts; BTF at gpa 0x{gpa:x}, {size} bytes, hash identical", t0)
        info = kernel_info(phys, syms, phys_base, space, [], btf_found)  # type: ignore[arg-type]
        if info.banner != record.banner or info.build_id != record.build_id:
            raise CacheMiss("banner through the page tables or build id differ")
    except (MemoryAccessError, GuestDataError, struct.error, ValueError, OverflowError, OSError) as exc:
        raise CacheMiss(f"{type(exc).__name__}: {exc}") from exc
    det = Detection(report, info=info, kallsyms=syms, kernel_space=space, btf=btf)  # type: ignore[arg-type]
    def btf_types() -> TypeSource:
        from nephoscope.os.linux.symbols import BtfTypes

        return BtfTypes(btf)  # type: ignore[arg-type]

    return det, ReplayTypes(record.types_log, f"cached layouts of {record.key}",
                            btf_types if btf is not None else None)


# --- the cache -----------------------------------------------------------------------------------


class ModelCache:
    """Kernel-model records in `directory` (default <cache>/kernels)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or cache_dir()
        self.last_problem: str | None = None  # why the last lookup missed (for tests and `kernel`)

    def _records(self) -> Iterator[Record]:
        try:
            files = sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:
            return
        for path in files[:MAX_RECORDS_TRIED]:
            with contextlib.suppress(OSError, ValueError, CacheMiss):
                yield Record.from_json(json.loads(path.read_bytes()))

    def load(self, key: str) -> Record | None:
        """Return the record called `key`, or None."""
        try:
            return Record.from_json(json.loads((self.directory / f"{key}.json").read_bytes()))
        except (OSError, ValueError, CacheMiss):
            return None

    def save(self, record: Record) -> None:
        """Write `record` (atomically; a failure to write only costs the next run its speed)."""
        with contextlib.suppress(OSError):
            _atomic_write(self.directory / f"{record.key}.json", json.dumps(record.to_json()).encode())

    def _model(self, phys: Phys, det: Detection, types: TypeSource, qmp: Any, limits: Limits | None
               ) -> LinuxKernel:
        from nephoscope.os.linux.model import LinuxKernel

        return LinuxKernel(phys, det, qmp=qmp, limits=limits, types=types)

    def open(self, phys: Phys, qmp: Any = None, limits: Limits | None = None) -> LinuxKernel:
        """Return the kernel model of `phys`: from a validated record when one fits, else by full detection."""
        records = list(self._records())
        for record in records:  # a boot seen before: no scan at all
            for text_gpa, slide in record.seen:
                kernel = self._try(phys, record, text_gpa, slide, qmp, limits)
                if kernel is not None:
                    return kernel
        for record in records:  # another boot of a known build: probe the aligned load addresses
            for text_gpa, slide in iter_placements(phys, record):
                if [text_gpa, slide] in record.seen:
                    continue
                kernel = self._try(phys, record, text_gpa, slide, qmp, limits)
                if kernel is not None:
                    record.seen = [[text_gpa, slide], *record.seen][:MAX_BOOTS]
                    self.save(record)
                    return kernel
        det = detect(phys, want_btf=False)
        kernel = self._same_build(phys, det, qmp, limits)
        if kernel is not None:
            return kernel
        add_btf(phys, det)
        from nephoscope.os.linux.symbols import BtfTypes

        recorder = RecordingTypes(BtfTypes(det.btf)) if det.btf is not None else None
        kernel = self._model(phys, det, recorder, qmp, limits) if recorder else None
        if kernel is None:
            from nephoscope.os.linux.model import LinuxKernel

            return LinuxKernel(phys, det, qmp=qmp, limits=limits)  # raises, naming the stage that failed
        with contextlib.suppress(NephoscopeError, OSError, ValueError, struct.error):
            self._remember(phys, kernel, recorder.log)  # type: ignore[union-attr]
        return kernel

    def _try(self, phys: Phys, record: Record, text_gpa: int, slide: int, qmp: Any, limits: Limits | None
             ) -> LinuxKernel | None:
        """Return the model `record` gives at this placement once the image proves it, else None."""
        try:
            det, types = validate(phys, record, self.directory, text_gpa, slide)
            kernel = self._model(phys, det, types, qmp, limits)
        except (CacheMiss, NephoscopeError) as exc:  # NephoscopeError: the model refused it; never trust it
            self.last_problem = f"{record.key}: {exc}"
            return None
        if isinstance(types, ReplayTypes) and types.learnt:
            self.save(record)  # the answers learnt from the BTF, for next time
        else:
            with contextlib.suppress(OSError):  # most recently used is tried first next time
                os.utime(self.directory / f"{record.key}.json")
        return kernel

    def _same_build(self, phys: Phys, det: Detection, qmp: Any, limits: Limits | None) -> LinuxKernel | None:
        """Return the model for another boot of a cached build (kallsyms decoded anew), or None."""
        if det.info is None or det.kallsyms is None or det.kallsyms.layout is None:
            return None
        record = self.load(record_key(det.info.banner, det.info.build_id))
        if record is None:
            return None
        try:  # proves every cached fact at this boot's position; only the layouts and the BTF are taken
            cached, types = validate(phys, record, self.directory, det.info.text_gpa, det.info.virt_slide)
            btf_stage = cached.report.stage("btf")
            if cached.btf is None or btf_stage is None or cached.info is None:
                raise CacheMiss("the record has no BTF")
            det.btf = cached.btf
            det.info = dataclasses.replace(det.info, btf_gpa=cached.info.btf_gpa, btf_size=cached.info.btf_size)
            det.report.stages.append(btf_stage)
            kernel = self._model(phys, det, types, qmp, limits)
        except (CacheMiss, NephoscopeError) as exc:
            self.last_problem = f"{record.key}: {exc}"
            det.btf = None
            det.report.stages = [s for s in det.report.stages if s.name != "btf"]
            return None
        record.seen = [[det.info.text_gpa, det.info.virt_slide], *record.seen][:MAX_BOOTS]
        self.save(record)
        return kernel

    def _remember(self, phys: Phys, kernel: LinuxKernel, types_log: dict[str, Any]) -> None:
        """Write the record of a freshly detected kernel."""
        info, syms = kernel.info, kernel.symbols
        layout = syms.layout
        banner_gva = syms.find("linux_banner")
        if layout is None or banner_gva is None or not info.banner.startswith(BANNER_PREFIX.decode()):
            return
        text_gpa = info.text_gpa
        raw = _syms_bytes(syms)
        rel = _layout_rel(layout, text_gpa)
        digest, _num, relative_base = _kallsyms_tables(phys, rel, text_gpa)
        btf_sha = None
        if info.btf_gpa is not None:
            btf_sha = hashlib.sha256(phys.read(info.btf_gpa, info.btf_size)).hexdigest()
        record = Record(
            key=record_key(info.banner, info.build_id), banner=info.banner, build_id=info.build_id,
            text_gva_link=info.text_gva - info.virt_slide, banner_rel=info.kernel_gpa(banner_gva) - text_gpa,
            layout_rel=rel, relative_base_link=(relative_base - info.virt_slide) & _MASK64, kallsyms_sha256=digest,
            btf_rel=info.btf_gpa - text_gpa if info.btf_gpa is not None else None, btf_size=info.btf_size,
            btf_sha256=btf_sha, types_log=types_log, seen=[[text_gpa, info.virt_slide]],
            syms_slide=info.virt_slide, count=len(syms), hot={name: syms.find(name) for name in HOT_SYMBOLS},
            syms_sha256=hashlib.sha256(raw).hexdigest())
        _atomic_write(self.directory / f"{record.key}.syms", raw)
        self.save(record)


def open_model(phys: Phys, *, use_cache: bool = True, directory: Path | None = None, qmp: Any = None,
               limits: Limits | None = None) -> LinuxKernel:
    """Return the kernel model of guest-physical `phys`, through the cache unless disabled (does not pause)."""
    if use_cache and not cache_disabled():
        return ModelCache(directory).open(phys, qmp=qmp, limits=limits)
    from nephoscope.os.linux.model import LinuxKernel

    return LinuxKernel.open(phys, qmp=qmp, limits=limits)
