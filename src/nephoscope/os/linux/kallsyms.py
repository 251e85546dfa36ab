"""Recover the kernel's own symbol table (kallsyms) from guest-physical RAM, with no System.map.

The tables `scripts/kallsyms.c` emits sit together in the kernel's .rodata, each 8-byte aligned:
token table (256 NUL-separated strings, "0".."9" at 0x30..0x39), token index (u16[256]), names
(length byte(s) + token indices), markers (offset of every 256th name), num_syms, and the
base-relative offsets (s32[]) + relative base. Their order changed across kernels (6.2 added
`kallsyms_seqs_of_names`, 6.4 moved the offsets behind the token index) and distributions backport
piecemeal, so every layout is tried and each candidate is validated before use.

All table positions here are guest-physical (gpa); recovered symbol addresses are guest-virtual (gva)
at their runtime (KASLR-slid) values. Nothing here pauses the VM.
"""

from __future__ import annotations

import bisect
import itertools
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from nephoscope.core.errors import DetectionError, GuestDataError, MemoryAccessError

if TYPE_CHECKING:  # numpy is imported where it is used: a cached kernel model needs none of it
    import numpy as np

DIGITS = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00"
MAX_SYMS = 1 << 21  # a kernel with more symbols than this is not one we know
MIN_SYMS = 256
MAX_NAMES_BYTES = 64 << 20
SEARCH_BEFORE_TOKENS = 48 << 20  # names + markers + seqs + offsets sit this close before the token table
MAX_TOKEN_LEN = 128
MARKERS_REACH = 8 << 20  # how far before the token table markers can end (3 * MAX_SYMS seqs + markers)
MAX_PLACEMENTS = 256  # num_syms/markers placements checked per token table
KERNEL_MAP_LO = 0xFFFFFFFF80000000  # __START_KERNEL_map: kernel text lives in the top 2 GiB
_U16x256 = struct.Struct("<256H")
_U64 = struct.Struct("<Q")


class Phys(Protocol):
    """What recovery needs from guest-physical memory (satisfied by nephoscope.memory.physical)."""

    ranges: list[tuple[int, int]]

    def read(self, gpa: int, size: int) -> bytes:
        """Return `size` bytes at guest-physical `gpa`."""
        ...


# --- scanning ----------------------------------------------------------------------------------


def _searchable(phys: Phys) -> Iterator[tuple[int, object, int, int]]:
    """Yield (gpa_start, buffer with .find or None, offset in it, length) per RAM segment, without copying."""
    import numpy as np
    segments = getattr(phys, "iter_segments", None)
    if segments is not None:
        for start, view in segments():
            obj = getattr(view, "obj", None)
            if isinstance(obj, mmap.mmap | bytes | bytearray) and len(view):
                # a slice of a mapped file (ELF core, LiME): find its offset so obj.find can serve it
                offset = (np.frombuffer(view, dtype=np.uint8).ctypes.data
                          - np.frombuffer(obj, dtype=np.uint8).ctypes.data)
                if 0 <= offset <= len(obj) - len(view):
                    yield start, obj, offset, len(view)
                    continue
            yield start, view, 0, len(view)
        return
    if isinstance(phys, bytes | bytearray | mmap.mmap):
        yield 0, phys, 0, len(phys)
        return
    for start, end in phys.ranges:
        yield start, None, 0, end - start


def iter_find(phys: Phys, needle: bytes, start: int = 0, end: int | None = None,
              chunk: int = 64 << 20) -> Iterator[int]:
    """Yield each guest-physical address in [start, end) where `needle` occurs (mmap.find when possible)."""
    end = (1 << 64) if end is None else end
    for seg_gpa, buf, base, length in _searchable(phys):
        lo, hi = max(start, seg_gpa) - seg_gpa, min(end, seg_gpa + length) - seg_gpa
        if lo >= hi:
            continue
        if isinstance(buf, mmap.mmap | bytes | bytearray):
            pos = buf.find(needle, base + lo, base + hi)
            while pos >= 0:
                yield seg_gpa + pos - base
                pos = buf.find(needle, pos + 1, base + hi)
            continue
        # no zero-copy finder: read in overlapping chunks
        pos = lo
        while pos < hi:
            n = min(chunk + len(needle) - 1, hi - pos)
            data = bytes(buf[pos:pos + n]) if buf is not None else phys.read(seg_gpa + pos, n)
            hit = data.find(needle)
            while hit >= 0:
                if pos + hit + len(needle) <= hi:
                    yield seg_gpa + pos + hit
                hit = data.find(needle, hit + 1)
            pos += chunk


# --- the layout --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KallsymsLayout:
    """Where each kallsyms table sits (gpa) and how it is encoded."""

    token_table_gpa: int
    token_index_gpa: int
    names_gpa: int
    names_size: int
    markers_gpa: int
    marker_width: int
    num_syms: int
    offsets_gpa: int
    relative_base: int  # gva, as stored (runtime value: the kernel relocates it with KASLR)
    seqs_gpa: int | None
    absolute_percpu: bool
    order: str  # "offsets-first" (<= 6.3) or "names-first" (>= 6.4)


def _align8(x: int) -> int:
    return (x + 7) & ~7


def _read(phys: Phys, gpa: int, size: int) -> bytes | None:
    try:
        data = phys.read(gpa, size)
    except MemoryAccessError:
        return None
    return data if len(data) == size else None


def _read_upto(phys: Phys, gpa: int, size: int) -> bytes | None:
    """Return up to `size` bytes at `gpa`, cut at the end of its RAM range; None if gpa is outside RAM."""
    for start, end in phys.ranges:
        if start <= gpa < end:
            return _read(phys, gpa, min(size, end - gpa))
    return None


def parse_token_table(phys: Phys, digit_gpa: int) -> tuple[int, int, list[bytes]] | None:
    """Return (token_table_gpa, token_index_gpa, tokens) for a "0\\0..9\\0" hit at `digit_gpa`, or None."""
    tail = _read_upto(phys, digit_gpa, 208 * MAX_TOKEN_LEN + 16 + 512)
    if tail is None:
        return None
    rel = [0]
    pos = 0
    for _ in range(0x30, 0x100):  # tokens 0x30..0xff, each non-empty and NUL-terminated
        nul = tail.find(b"\0", pos, pos + MAX_TOKEN_LEN + 1)
        if nul <= pos:
            return None
        pos = nul + 1
        rel.append(pos)
    for index_rel in range(_align8(digit_gpa + pos) - digit_gpa, _align8(digit_gpa + pos) - digit_gpa + 16, 8):
        if index_rel + 512 > len(tail):
            return None
        index = _U16x256.unpack_from(tail, index_rel)
        base = index[0x30]
        if index[0] != 0 or base > 0x30 * MAX_TOKEN_LEN:
            continue
        if all(index[0x30 + i] - base == rel[i] for i in range(208)):
            table_gpa = digit_gpa - base
            head = _read(phys, table_gpa, base)
            if head is None:
                return None
            blob = head + tail[:pos]
            tokens = blob.split(b"\0")[:256]
            if len(tokens) != 256 or any(not t for t in tokens):
                return None
            if any(index[i] != index[i - 1] + len(tokens[i - 1]) + 1 for i in range(1, 256)):
                return None
            return table_gpa, digit_gpa + index_rel, tokens
    return None


def _walk_names(data: bytes, count: int) -> tuple[np.ndarray, int] | None:
    """Return (start offset of each name entry, total size) or None if the entries overrun `data`."""
    import numpy as np
    starts = np.empty(count + 1, dtype=np.int64)
    pos, size = 0, len(data)
    for i in range(count):
        if pos >= size:
            return None
        starts[i] = pos
        b = data[pos]
        if b & 0x80:  # "big" symbol: ULEB128 length in two bytes (6.1+)
            if pos + 1 >= size:
                return None
            pos += 2 + ((b & 0x7F) | (data[pos + 1] << 7))
        else:
            if b == 0:
                return None
            pos += 1 + b
    if pos > size:
        return None
    starts[count] = pos
    return starts, pos


@dataclass(slots=True)
class _Candidate:
    num_syms_gpa: int
    num_syms: int
    markers_gpa: int
    marker_width: int
    seqs_gpa: int | None
    markers: list[int] = field(default_factory=list)


def _view(phys: Phys, gpa: int, size: int) -> bytes | memoryview | None:
    """Return [gpa, gpa+size) zero-copy when the memory offers views, else a copy; None outside RAM."""
    view = getattr(phys, "view", None)
    if view is not None:
        try:
            return view(gpa, size)  # type: ignore[no-any-return]
        except MemoryAccessError:
            pass
    return _read(phys, gpa, size)


def _marker_candidates(phys: Phys, table_gpa: int, chunk: int = 2 << 20) -> Iterator[_Candidate]:
    """Yield (num_syms, markers) placements before the token table that pass cheap checks, nearest first."""
    import numpy as np
    floor = max(table_gpa - SEARCH_BEFORE_TOKENS, _segment_start(phys, table_gpa))
    hi = table_gpa & ~7
    # markers end at the token table or 3*N bytes (seqs_of_names) before it: keep that stretch as u32s
    tail_lo = max((floor + 7) & ~7, hi - MARKERS_REACH)
    tail_raw = _view(phys, tail_lo, hi - tail_lo)
    if tail_raw is None:
        return
    tail = np.frombuffer(tail_raw, dtype="<u4")
    while hi - 8 >= floor:
        lo = max((floor + 7) & ~7, hi - chunk)
        raw = _view(phys, lo, hi - lo)
        if raw is None:
            return
        words = np.frombuffer(raw, dtype="<u8")
        idx = np.flatnonzero((words >= MIN_SYMS) & (words <= MAX_SYMS))[::-1]
        if len(idx):
            keep = _plausible(tail, tail_lo, table_gpa, lo + 8 * idx, words[idx].astype(np.int64))
            for i in idx[keep].tolist():
                yield from _placements(phys, table_gpa, lo + 8 * i, int(words[i]))
        hi = lo


def _plausible(tail: np.ndarray, tail_lo: int, table_gpa: int, num_gpa: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Return which num_syms candidates have markers[0] == 0 and markers[1] > 0 where some layout puts them."""
    import numpy as np
    count = (n + 255) // 256
    keep = np.zeros(len(n), dtype=bool)
    for seqs in (False, True):
        end = table_gpa - (((3 * n) + 7) & ~7 if seqs else 0)
        for width in (4, 8):
            start = end - ((count * width + 7) & ~7)
            rel = (start - tail_lo) // 4
            step = width // 4
            ok = (start > num_gpa + 8 + 2 * n) & (rel >= 0) & (rel + step < len(tail))  # names >= 2 bytes each
            at = np.where(ok, rel, 0)
            ok &= (tail[at] == 0) & ((count == 1) | (tail[at + step] > 0))
            keep |= ok
    return keep


def _placements(phys: Phys, table_gpa: int, num_gpa: int, n: int) -> Iterator[_Candidate]:
    count = (n + 255) // 256
    for seqs in (False, True):
        end = table_gpa - (_align8(3 * n) if seqs else 0)
        for width in (4, 8):
            start = end - _align8(count * width)
            if start <= num_gpa + 8 or start - (num_gpa + 8) > MAX_NAMES_BYTES:
                continue
            blob = _read(phys, start, count * width)
            if blob is None:
                continue
            markers = list(struct.unpack(f"<{count}{'I' if width == 4 else 'Q'}", blob))
            if markers[0] != 0 or any(b <= a for a, b in itertools.pairwise(markers)):
                continue
            if num_gpa + 8 + markers[-1] >= start:
                continue
            yield _Candidate(num_gpa, n, start, width, end if seqs else None, markers)


def _segment_start(phys: Phys, gpa: int) -> int:
    for s, e in phys.ranges:
        if s <= gpa < e:
            return s
    return gpa


def _addresses(offsets: np.ndarray, base: int, absolute_percpu: bool) -> np.ndarray:
    import numpy as np
    if absolute_percpu:
        rel = np.uint64(base - 1) - offsets.astype(np.int64).astype(np.uint64)
        return np.where(offsets >= 0, offsets.astype(np.int64).astype(np.uint64), rel)
    return np.uint64(base) + offsets.astype(np.uint32).astype(np.uint64)


def _offsets_placements(phys: Phys, names_gpa: int, index_gpa: int, n: int) -> Iterator[tuple[str, int, int]]:
    """Yield (order, offsets_gpa, relative_base) for the two orders the offsets come in."""
    rb_gpa = names_gpa - 16  # offsets, relative_base, num_syms, names (<= 6.3)
    raw = _read(phys, rb_gpa, 8)
    if raw is not None:
        yield "offsets-first", rb_gpa - _align8(4 * n), _U64.unpack(raw)[0]
    off_gpa = _align8(index_gpa + 512)  # names, markers, tokens, token index, offsets, relative base (>= 6.4)
    raw = _read(phys, _align8(off_gpa + 4 * n), 8)
    if raw is not None:
        yield "names-first", off_gpa, _U64.unpack(raw)[0]


def locate_layout(phys: Phys, table_gpa: int, index_gpa: int,
                  reasons: list[str]) -> tuple[KallsymsLayout, np.ndarray] | None:
    """Return the validated layout around a token table at `table_gpa` and its name offsets, or None."""
    import numpy as np
    tried = 0
    for cand in _marker_candidates(phys, table_gpa):
        tried += 1
        if tried > MAX_PLACEMENTS:  # a hostile guest can forge many; each costs a names walk
            reasons.append(f"token table 0x{table_gpa:x}: more than {MAX_PLACEMENTS} placements; gave up")
            return None
        names_gpa = cand.num_syms_gpa + 8
        names = _read(phys, names_gpa, cand.markers_gpa - names_gpa)
        if names is None:
            continue
        first = _walk_names(names, min(cand.num_syms, 256))  # cheap: the first marker must match
        if first is None or (len(cand.markers) > 1 and first[1] != cand.markers[1]):
            continue
        walked = _walk_names(names, cand.num_syms)
        if walked is None:
            continue
        starts, size = walked
        if cand.markers_gpa != _align8(names_gpa + size):
            continue
        if any(int(starts[256 * k]) != m for k, m in enumerate(cand.markers)):
            continue
        for order, off_gpa, base in _offsets_placements(phys, names_gpa, index_gpa, cand.num_syms):
            if not KERNEL_MAP_LO <= base < (1 << 64) - (1 << 20):
                continue
            raw = _read(phys, off_gpa, 4 * cand.num_syms)
            if raw is None:
                continue
            offsets = np.frombuffer(raw, dtype="<i4")
            for percpu in (True, False):
                addrs = _addresses(offsets, base, percpu)
                if bool(np.all(addrs[1:] >= addrs[:-1])):
                    layout = KallsymsLayout(table_gpa, index_gpa, names_gpa, size, cand.markers_gpa,
                                            cand.marker_width, cand.num_syms, off_gpa, base, cand.seqs_gpa,
                                            percpu, order)
                    return layout, starts
        reasons.append(f"token table 0x{table_gpa:x}: names/markers at 0x{names_gpa:x} valid but no "
                       "sorted offsets + relative base found in either order")
    if not tried:
        reasons.append(f"token table 0x{table_gpa:x}: no num_syms/markers placement passes the checks")
    elif not reasons or not reasons[-1].startswith(f"token table 0x{table_gpa:x}"):
        reasons.append(f"token table 0x{table_gpa:x}: {tried} num_syms/markers placements, none whose "
                       "names walk lands on every marker")
    return None


# --- the decoded table -------------------------------------------------------------------------


@dataclass(slots=True)
class Kallsyms:
    """The kernel's core symbols in table order (sorted by address): names, type chars, gvas."""

    layout: KallsymsLayout | None  # None: read from a symbol file, not guest RAM
    names: list[str]
    types: str
    addresses: np.ndarray  # uint64 gvas, non-decreasing
    link_time: bool = False  # True: addresses as linked (a file), not yet slid by KASLR
    _by_name: dict[str, int] | None = None
    _sorted: list[int] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def relocated(self, virt_slide: int) -> Kallsyms:
        """Return these symbols with kernel-map gvas moved by `virt_slide` (per-cpu offsets stay)."""
        import numpy as np
        if not 0 <= virt_slide < (1 << 31):
            raise ValueError(f"KASLR slide 0x{virt_slide:x} is outside the kernel map")
        addrs = self.addresses.copy()
        addrs[addrs >= np.uint64(KERNEL_MAP_LO)] += np.uint64(virt_slide)
        return Kallsyms(self.layout, self.names, self.types, addrs, link_time=False)

    @property
    def symbols(self) -> dict[str, int]:
        """Return name → gva (the first of duplicate names, i.e. the lowest address)."""
        if self._by_name is None:
            # reversed, so the first (lowest) of duplicate names wins
            self._by_name = dict(zip(reversed(self.names), reversed(self.addresses.tolist()), strict=True))
        return self._by_name

    def find(self, name: str) -> int | None:
        """Return the gva of symbol `name`, or None."""
        return self.symbols.get(name)

    def get(self, name: str) -> int:
        """Return the gva of symbol `name`; raise DetectionError if the kernel has none."""
        addr = self.symbols.get(name)
        if addr is None:
            raise DetectionError(f"kallsyms: the kernel has no symbol {name!r} (stage kallsyms)")
        return addr

    def entries(self) -> Iterator[tuple[int, str, str]]:
        """Yield (gva, type char, name) like /proc/kallsyms, in table order."""
        yield from zip(self.addresses.tolist(), self.types, self.names, strict=True)

    def lookup(self, gva: int) -> tuple[str, int] | None:
        """Return (symbol name, offset) of the symbol at or below guest-virtual `gva`, or None."""
        if self._sorted is None:
            self._sorted = self.addresses.tolist()
        i = bisect.bisect_right(self._sorted, gva) - 1
        if i < 0:
            return None
        # prefer the last of several symbols sharing one address? the kernel picks the first; so do we
        first = bisect.bisect_left(self._sorted, self._sorted[i])
        return self.names[first], gva - self._sorted[first]


def decode(phys: Phys, layout: KallsymsLayout, tokens: list[bytes], starts: np.ndarray | None = None) -> Kallsyms:
    """Expand every name of `layout` (vectorised; `starts` = name offsets if already walked), compute gvas."""
    import numpy as np
    n = layout.num_syms
    raw = _read(phys, layout.names_gpa, layout.names_size)
    off_raw = _read(phys, layout.offsets_gpa, 4 * n)
    if raw is None or off_raw is None:
        raise GuestDataError("kallsyms tables became unreadable while decoding")
    if starts is None:
        walked = _walk_names(raw, n)
        if walked is None:
            raise GuestDataError("kallsyms names changed while decoding (live guest?); retry")
        starts = walked[0]
    size = int(starts[-1])
    data = np.frombuffer(raw, dtype=np.uint8)[:size]
    big = data[starts[:-1]] >= 0x80
    header = np.where(big, 2, 1)
    lengths = np.diff(starts) - header
    is_token = np.ones(size, dtype=bool)
    is_token[starts[:-1]] = False
    is_token[starts[:-1][big] + 1] = False
    tok = data[is_token]
    tok_len = np.array([len(t) for t in tokens], dtype=np.int64)
    tok_start = np.concatenate(([0], np.cumsum(tok_len)[:-1]))
    table = np.frombuffer(b"".join(tokens), dtype=np.uint8)
    piece_len = tok_len[tok]
    total = int(piece_len.sum())
    piece_out = np.concatenate(([0], np.cumsum(piece_len)[:-1]))
    src = np.repeat(tok_start[tok] - piece_out, piece_len) + np.arange(total)
    text = table[src].tobytes().decode("latin-1")
    entry = np.repeat(np.arange(n), lengths)
    name_len = np.bincount(entry, weights=piece_len, minlength=n).astype(np.int64)
    bounds = np.concatenate(([0], np.cumsum(name_len))).tolist()
    full = [text[a:b] for a, b in itertools.pairwise(bounds)]
    types = "".join(s[:1] or "?" for s in full)
    names = [s[1:] for s in full]
    addrs = _addresses(np.frombuffer(off_raw, dtype="<i4"), layout.relative_base, layout.absolute_percpu)
    return Kallsyms(layout, names, types, addrs)


def recover_kallsyms(phys: Phys, near: list[int] | None = None, window: int = 48 << 20,
                     reasons: list[str] | None = None) -> Kallsyms:
    """Find, validate and decode the kallsyms tables; search around gpas `near` (e.g. the banner) first."""
    reasons = [] if reasons is None else reasons
    seen: set[int] = set()

    def attempts(lo: int, hi: int | None) -> Kallsyms | None:
        for digit_gpa in iter_find(phys, DIGITS, lo, hi):
            parsed = parse_token_table(phys, digit_gpa)
            if parsed is None:
                continue
            table_gpa, index_gpa, tokens = parsed
            if table_gpa in seen:
                continue
            seen.add(table_gpa)
            located = locate_layout(phys, table_gpa, index_gpa, reasons)
            if located is not None:
                return decode(phys, located[0], tokens, located[1])
        return None

    for gpa in near or []:
        # kallsyms.o is linked last, so its .rodata follows the banner's: look forward first
        found = attempts(gpa, gpa + window) or attempts(max(0, gpa - window), gpa)
        if found is not None:
            return found
    found = attempts(0, None)
    if found is not None:
        return found
    why = "; ".join(reasons[-5:]) if reasons else "no kallsyms token table (\"0\"..\"9\" tokens) anywhere in RAM"
    raise DetectionError(f"kallsyms: no valid symbol table found ({why}). Is this a Linux guest with "
                         "CONFIG_KALLSYMS_ALL? Pass this kernel's symbols with --symbols FILE (a Volatility 3 ISF, "
                         "a vmlinux with .symtab, or its System.map)")


def load_symbol_file(path: str | Path) -> Kallsyms:
    """Read link-time symbols from a vmlinux (ELF .symtab) or a System.map-like "addr type name" file."""
    import numpy as np
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise DetectionError(f"cannot read symbol file {path}: {exc.strerror}") from exc
    rows = _elf_symbols(path) if head == b"\x7fELF" else _map_symbols(path)
    if not any(name == "_text" for _a, _t, name in rows):
        raise DetectionError(f"{path}: no _text symbol; a placeholder System.map (Debian ships one) or not "
                             "a kernel symbol file")
    rows.sort(key=lambda r: r[0])
    return Kallsyms(None, [r[2] for r in rows], "".join(r[1] for r in rows),
                    np.array([r[0] for r in rows], dtype=np.uint64), link_time=True)


def _map_symbols(path: Path) -> list[tuple[int, str, str]]:
    rows = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 3 and len(parts[1]) == 1:
                try:
                    rows.append((int(parts[0], 16) & ((1 << 64) - 1), parts[1], parts[2]))
                except ValueError:
                    continue
    return rows


def _elf_symbols(path: Path) -> list[tuple[int, str, str]]:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    rows = []
    try:
        with path.open("rb") as fh:
            symtab = ELFFile(fh).get_section_by_name(".symtab")
            if not isinstance(symtab, SymbolTableSection):
                raise DetectionError(f"{path}: no .symtab (a stripped vmlinux); use kallsyms from RAM")
            for sym in symtab.iter_symbols():
                kind, bind = sym["st_info"]["type"], sym["st_info"]["bind"]
                if not sym.name or kind in ("STT_FILE", "STT_SECTION"):
                    continue
                letter = "T" if kind == "STT_FUNC" else "D"
                rows.append((sym["st_value"], letter if bind != "STB_LOCAL" else letter.lower(), sym.name))
    except (ELFError, OSError) as exc:
        raise DetectionError(f"{path}: not a readable vmlinux ({exc})") from exc
    return rows
