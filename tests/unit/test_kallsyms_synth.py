"""kallsyms recovery on synthetic tables: every layout variant, and hostile input that must fail cleanly."""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import pytest

from nephoscope.core.errors import DetectionError
from nephoscope.memory.physical import BufferMemory, SegmentedMemory
from nephoscope.os.linux.detect import detect
from nephoscope.os.linux.kallsyms import DIGITS, Kallsyms, load_symbol_file, parse_token_table, recover_kallsyms

BASE = 0xFFFFFFFF81000000
PAIRS = ["__", "_s", "in", "et", "er", "re", "st", "de", "nt", "on", "ck", "ma", "pu", "tr", "ex"]


def _tokens() -> list[bytes]:
    """Return 256 tokens: printable single chars at their own index, pairs elsewhere (like the real table)."""
    pairs = iter(PAIRS + [f"q{i}" for i in range(300)])
    return [bytes([i]) if 0x20 <= i < 0x7F else next(pairs).encode() for i in range(256)]


def _encode(text: str, tokens: list[bytes]) -> bytes:
    index = {t: i for i, t in enumerate(tokens)}
    out, i = bytearray(), 0
    while i < len(text):
        pair = text[i:i + 2].encode()
        if len(pair) == 2 and pair in index:
            out.append(index[pair])
            i += 2
        else:
            out.append(index[text[i].encode()])
            i += 1
    return bytes(out)


def _pad(buf: bytearray) -> None:
    buf.extend(b"\0" * (-len(buf) % 8))


def _symbols(count: int) -> list[tuple[int, str, str]]:
    rng = random.Random(count)
    syms = [(0x0, "A", "fixed_percpu_data"), (0x1000, "A", "cpu_debug_store")]
    addr = BASE
    syms.append((addr, "T", "_text"))
    for i in range(count - 3):
        addr += rng.randrange(0, 64)
        name = f"{rng.choice(['do_', 'sys_', '__x64_', 'ext4_'])}sym{i}_{'x' * rng.randrange(0, 20)}"
        if i == 7:
            name = "very_long_" + "y" * 150  # a "big" symbol: two-byte length
        syms.append((addr, rng.choice("TtDdRrBb"), name))
    return syms


def build(syms: list[tuple[int, str, str]], *, order: str = "offsets-first", seqs: bool = True,
          width: int = 4, base: int = BASE) -> bytes:
    """Return kallsyms tables laid out as scripts/kallsyms.c would (8-byte aligned labels)."""
    tokens = _tokens()
    names = bytearray()
    markers = []
    for i, (_a, t, n) in enumerate(syms):
        if i % 256 == 0:
            markers.append(len(names))
        enc = _encode(t + n, tokens)
        names += bytes([len(enc)]) if len(enc) < 0x80 else bytes([(len(enc) & 0x7F) | 0x80, len(enc) >> 7])
        names += enc
    offsets = b"".join(struct.pack("<i", a if a < 0x80000000 else base - 1 - a) for a, _t, _n in syms)
    table = b"\0".join(tokens) + b"\0"
    index, pos = [], 0
    for t in tokens:
        index.append(pos)
        pos += len(t) + 1
    out = bytearray(b"\xcc" * 64)

    def emit(blob: bytes) -> None:
        _pad(out)
        out.extend(blob)

    head = [struct.pack("<Q", len(syms)), bytes(names), struct.pack(f"<{len(markers)}{'I' if width == 4 else 'Q'}",
                                                                     *markers)]
    if order == "offsets-first":
        emit(offsets)
        emit(struct.pack("<Q", base))
        for blob in head:
            emit(blob)
        if seqs:
            emit(bytes(random.Random(1).randrange(256) for _ in range(3 * len(syms))))
        emit(table)
        emit(struct.pack("<256H", *index))
    else:
        for blob in head:
            emit(blob)
        emit(table)
        emit(struct.pack("<256H", *index))
        emit(offsets)
        emit(struct.pack("<Q", base))
        if seqs:
            emit(bytes(3 * len(syms)))
    _pad(out)
    out.extend(b"\xcc" * 64)
    return bytes(out)


def _check(found: Kallsyms, syms: list[tuple[int, str, str]]) -> None:
    assert list(found.entries()) == syms
    assert found.get("_text") == BASE
    assert found.lookup(BASE + 1) == ("_text", 1) or found.lookup(BASE + 1)[0] != ""


@pytest.mark.parametrize(("order", "seqs", "width"), [
    ("offsets-first", True, 4), ("offsets-first", False, 4), ("offsets-first", False, 8),
    ("names-first", True, 4), ("names-first", False, 8)])
def test_every_layout_decodes_exactly(order: str, seqs: bool, width: int) -> None:
    syms = _symbols(1000)
    ram = bytes(0x3000) + build(syms, order=order, seqs=seqs, width=width) + bytes(0x3000)
    found = recover_kallsyms(BufferMemory(ram))
    _check(found, syms)
    assert found.layout.order == order
    assert found.layout.marker_width == width
    assert (found.layout.seqs_gpa is not None) == (seqs and order == "offsets-first")


def test_lookup_and_duplicates() -> None:
    syms = _symbols(600)
    syms[10] = (syms[10][0], "t", "dup")
    syms[20] = (syms[20][0], "t", "dup")
    found = recover_kallsyms(BufferMemory(build(syms)))
    assert found.get("dup") == syms[10][0]  # the first (lowest) of duplicate names
    name, off = found.lookup(syms[300][0] + 3) or ("", 0)
    assert found.symbols[name] <= syms[300][0] + 3 and off >= 0
    assert found.lookup(0) is not None
    with pytest.raises(DetectionError, match="no symbol"):
        found.get("no_such_symbol")


def test_decoy_token_tables_are_skipped() -> None:
    syms = _symbols(700)
    decoy = bytes(0x100) + b"x\0" * 0x30 + DIGITS + b"y\0" * 200 + bytes(0x400)  # digits, no valid index
    stale = build(syms)[:-3000]  # a truncated stale copy: token table without its tail
    head = decoy + stale
    ram = head + bytes(64 - len(head) % 8) + build(syms) + bytes(0x100)  # real tables are 8-aligned
    _check(recover_kallsyms(BufferMemory(ram)), syms)


def test_garbage_fails_fast_with_detection_error() -> None:
    rng = random.Random(5)
    ram = bytes(rng.randrange(256) for _ in range(1 << 20))
    t0 = time.perf_counter()
    with pytest.raises(DetectionError, match="kallsyms"):
        recover_kallsyms(BufferMemory(ram))
    assert time.perf_counter() - t0 < 5


def test_hostile_tables_fail_cleanly() -> None:
    syms = _symbols(800)
    good = bytearray(build(syms))
    lay = recover_kallsyms(BufferMemory(bytes(good))).layout
    digit = good.find(DIGITS)
    # absurd num_syms, a marker pointing nowhere, names that overrun, unsorted offsets: DetectionError each
    for mutate in (
        lambda b: struct.pack_into("<Q", b, lay.names_gpa - 8, 0xFFFFFFFF),
        lambda b: struct.pack_into("<I", b, lay.markers_gpa + 4, 0xFFFFFFF0),
        lambda b: b.__setitem__(slice(lay.names_gpa, lay.names_gpa + 64), b"\x7f" * 64),
        lambda b: struct.pack_into("<i", b, lay.offsets_gpa + 400, 5),
    ):
        bad = bytearray(good)
        mutate(bad)
        with pytest.raises(DetectionError):
            recover_kallsyms(BufferMemory(bytes(bad)))
    assert parse_token_table(BufferMemory(bytes(good[:digit + 40])), digit) is None  # truncated table


def test_detect_reports_failed_stages_without_raising() -> None:
    det = detect(BufferMemory(bytes(1 << 20)))
    assert det.info is None
    names = [s.name for s in det.report.stages]
    assert names == ["banner", "kallsyms"]
    assert not det.report.ok and "banner" in det.report.failed()[0].name
    with pytest.raises(DetectionError, match="stage kallsyms"):
        det.report.require("kallsyms")


def test_detect_without_kernel_map_reports_phys_base() -> None:
    syms = _symbols(500)
    ram = b"Linux version 6.1.0-test (x@y) (gcc) #1 SMP\n\0".ljust(0x1000, b"\0") + build(syms)
    det = detect(BufferMemory(ram))
    assert det.report.stage("banner").ok and det.report.stage("kallsyms").ok
    failed = det.report.failed()
    assert failed and failed[0].name == "phys/virt base"
    assert "phys_base" in failed[0].detail


def test_symbol_files(tmp_path: Path) -> None:
    placeholder = tmp_path / "System.map"
    placeholder.write_text("ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n")
    with pytest.raises(DetectionError, match="placeholder"):
        load_symbol_file(placeholder)
    good = tmp_path / "System.map-good"
    good.write_text("0000000000000000 A fixed_percpu_data\nffffffff81000000 T _text\n"
                    "ffffffff82000000 D linux_banner\nbad line\n")
    syms = load_symbol_file(good)
    assert syms.link_time and syms.get("_text") == BASE
    slid = syms.relocated(0x200000)
    assert slid.get("_text") == BASE + 0x200000 and slid.get("fixed_percpu_data") == 0
    with pytest.raises(DetectionError):
        load_symbol_file(tmp_path / "missing")


def test_tables_in_a_segment_of_a_dump_file() -> None:
    """Like an ELF core: RAM at gpa 0x100000 starts 0x1000 bytes into the file; find() must not copy."""
    syms = _symbols(900)
    tables = build(syms)
    image = b"\x7fELF" + bytes(0x1000 - 4) + bytes(0x2000) + tables + bytes(0x100)
    phys = SegmentedMemory(image, [(0x0, 0x1000, 0x1000), (0x100000, 0x100000 + len(image), 0x2000)])
    found = recover_kallsyms(phys)
    _check(found, syms)
    assert found.layout is not None and found.layout.token_table_gpa >= 0x100000
