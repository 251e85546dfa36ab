"""A garbage or half-written CPython state gives `unverifiable` with the reason, in bounded time.

Each case copies the clean 6.1 dump (its `python3 -m http.server` process, CPython 3.11), changes bytes of
that process's interpreter state in the copy, and reads it again: the reader must not crash, loop or
invent a stack.
"""

from __future__ import annotations

import mmap
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from nephoscope.core.records import Verdict
from nephoscope.introspect.interp import iter_contexts, read_interpreters
from nephoscope.introspect.interp.python import _Reader, addr2line, find_build, read_python
from nephoscope.memory.physical import open_memory, parse_elf_segments
from nephoscope.os.linux.model import LinuxKernel

pytestmark = pytest.mark.guest


def _context(dump: Path):  # type: ignore[no-untyped-def]
    k = LinuxKernel.open(open_memory(dump))
    ctx = next(c for c in iter_contexts(k) if c.task.exe == "/usr/bin/python3.11")
    build, bias, _binary = find_build(ctx)  # type: ignore[misc]
    return k, ctx, _Reader(ctx, build, bias)


def _top_frame(reader: _Reader, ctx) -> int:  # type: ignore[no-untyped-def]
    o = reader.o
    interp = reader.interpreters()[0]
    ts = reader.thread_states(interp)[0]
    return reader.u64(reader.u64(ts + o["_ts.cframe"]) + o["_PyCFrame.current_frame"])


def test_clean_dump_reads_http_server(clean_dump: Path) -> None:
    _k, ctx, _reader = _context(clean_dump)
    result = read_python(ctx)
    assert result is not None and result.verdict is Verdict.VERIFIED, result
    assert result.entry == "/usr/lib/python3.11/http/server.py"
    names = [f.function for f in result.threads[0].frames]
    assert names[:3] == ["_PollLikeSelector.select", "BaseServer.serve_forever", "test"]
    assert "/usr/lib/python3.11/socketserver.py" in result.scripts


def _corrupt(clean_dump: Path, tmp_path: Path, where: Callable[[object, object, _Reader], list[tuple[int, bytes]]]):
    """Copy the dump, write bytes at user gvas of the python process, return the reader's result on the copy."""
    k, ctx, reader = _context(clean_dump)
    edits = [(ctx.user.translate(gva), data) for gva, data in where(k, ctx, reader)]
    copy = tmp_path / "copy.elf"
    shutil.copyfile(clean_dump, copy)
    with copy.open("r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
        segments = parse_elf_segments(mm, str(copy))
        for gpa, data in edits:
            start, _end, file_offset = next(s for s in segments if s[0] <= gpa < s[1])
            off = file_offset + gpa - start
            mm[off:off + len(data)] = data
    k2 = LinuxKernel.open(open_memory(copy))
    results = [r for r in read_interpreters(k2) if r.pid == ctx.task.pid]
    assert len(results) == 1
    return results[0]


def test_frame_cycle_is_unverifiable(clean_dump: Path, tmp_path: Path) -> None:
    def edit(_k, ctx, reader):  # type: ignore[no-untyped-def]
        frame = _top_frame(reader, ctx)
        return [(frame + reader.o["_PyInterpreterFrame.previous"], struct.pack("<Q", frame))]

    result = _corrupt(clean_dump, tmp_path, edit)
    assert result.verdict is Verdict.UNVERIFIABLE and "loops" in result.reason
    assert not result.threads  # the broken thread's stack is not reported


def test_code_object_of_wrong_type_is_unverifiable(clean_dump: Path, tmp_path: Path) -> None:
    def edit(_k, ctx, reader):  # type: ignore[no-untyped-def]
        frame = _top_frame(reader, ctx)
        code = reader.u64(frame + reader.o["_PyInterpreterFrame.f_code"])
        return [(code + reader.o["_object.ob_type"], struct.pack("<Q", reader.types["PyDict_Type"]))]

    result = _corrupt(clean_dump, tmp_path, edit)
    assert result.verdict is Verdict.UNVERIFIABLE and "no code object" in result.reason


def test_garbage_runtime_is_unverifiable(clean_dump: Path, tmp_path: Path) -> None:
    def edit(_k, ctx, reader):  # type: ignore[no-untyped-def]
        head = reader.runtime + reader.o["pyruntimestate.interpreters.head"]
        return [(head, b"\xa5" * 16)]

    result = _corrupt(clean_dump, tmp_path, edit)
    assert result.verdict is Verdict.UNVERIFIABLE and "_PyRuntime" in result.reason and not result.threads


def test_string_length_lie_is_unverifiable(clean_dump: Path, tmp_path: Path) -> None:
    def edit(_k, ctx, reader):  # type: ignore[no-untyped-def]
        frame = _top_frame(reader, ctx)
        code = reader.u64(frame + reader.o["_PyInterpreterFrame.f_code"])
        name = reader.u64(code + reader.o["PyCodeObject.co_qualname"])
        return [(name + reader.o["PyASCIIObject.length"], struct.pack("<Q", 1 << 40))]

    result = _corrupt(clean_dump, tmp_path, edit)
    assert result.verdict is Verdict.UNVERIFIABLE and "impossible state" in result.reason


def test_random_garbage_over_the_thread_state(clean_dump: Path, tmp_path: Path) -> None:
    import random

    rng = random.Random(15)

    def edit(_k, ctx, reader):  # type: ignore[no-untyped-def]
        ts = reader.thread_states(reader.interpreters()[0])[0]
        return [(ts, bytes(rng.randrange(256) for _ in range(160)))]

    result = _corrupt(clean_dump, tmp_path, edit)
    assert result.verdict is Verdict.UNVERIFIABLE and result.reason


def test_addr2line_on_garbage_tables() -> None:
    assert addr2line(b"", 10, 0) == -1
    with pytest.raises(Exception) as info:
        addr2line(b"\x01\x02", 1, 0)
    assert type(info.value).__name__ == "GuestDataError"
    # 14 = long form with line delta +2 then three varints; one code unit
    assert addr2line(bytes([0x80 | (14 << 3), 4, 0, 0, 0]), 5, 0) == 7


@pytest.mark.parametrize("seed", range(6))
def test_random_words_over_frames_and_code_never_crash(clean_dump: Path, tmp_path: Path, seed: int) -> None:
    import random

    rng = random.Random(seed)

    def edit(_k, ctx, reader):  # type: ignore[no-untyped-def]
        o = reader.o
        frame = _top_frame(reader, ctx)
        code = reader.u64(frame + o["_PyInterpreterFrame.f_code"])
        targets = [frame + rng.randrange(0, o["sizeof._PyInterpreterFrame"], 8),
                   code + rng.randrange(0, o["sizeof.PyCodeObject"], 8),
                   reader.interpreters()[0] + o["_is.modules"]]
        return [(t, struct.pack("<Q", rng.choice([0, 1, 0xFFFFFFFFFFFFFFFF, t, rng.getrandbits(64)])))
                for t in rng.sample(targets, rng.randint(1, 3))]

    result = _corrupt(clean_dump, tmp_path, edit)
    assert result.verdict in (Verdict.VERIFIED, Verdict.UNVERIFIABLE)
    assert result.verdict is Verdict.VERIFIED or result.reason
