"""The archevents stream parser and page identification, on synthetic streams (garbage, truncation, lies)."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

from nephoscope.introspect.archevents import HEADER, MAGIC, ArchEventStream, Record, StreamParser
from nephoscope.knowledge.binaries import PageHit
from nephoscope.knowledge.pagehash import page_digest

PAGE = 4096


def rec(code: int, gpa: int = 0, vaddr: int = 0, payload: bytes = b"", flags: int | None = None,
        magic: int = MAGIC) -> bytes:
    flags = (1 if len(payload) == PAGE else 0) if flags is None else flags
    return HEADER.pack(magic, code, flags, 0, len(payload), 0, gpa, vaddr, 123) + payload


def test_records_split_across_any_chunking() -> None:
    page = os.urandom(PAGE)
    stream = (rec(4, payload=b"archevents 1 ram_size=1\n") + rec(3, 0x5000, 0x401000, page) + rec(6)
              + rec(1, 0x7000, 0xFFFFFFFF81000000, page) + rec(5, payload=struct.pack("<8Q", *range(8))))
    for chunk in (1, 7, 40, 41, 4136, 100000):
        p = StreamParser()
        got: list[Record] = []
        for i in range(0, len(stream), chunk):
            got += p.feed(stream[i:i + chunk])
        assert [r.kind for r in got] == ["hello", "replay", "replay-done", "first", "stats"]
        assert got[1].payload == page and got[1].has_bytes and got[1].gpa == 0x5000
        assert got[4].stats()["sent"] == 3 and got[4].stats()["store_marks"] == 7
        assert p.close() == ""


def test_truncated_stream_is_reported_not_invented() -> None:
    p = StreamParser()
    data = rec(1, 0x1000, 0x1000, os.urandom(PAGE))
    assert p.feed(data[:-1]) == []
    assert "truncated" in p.close()
    p = StreamParser()
    assert p.feed(data[:10]) == [] and "10 bytes" in p.close()


def test_malformed_headers_break_the_stream() -> None:
    bad = [rec(1, magic=0xDEADBEEF), rec(9), rec(1, 0x1001, 0, bytes(PAGE)), rec(1, 0x1000, 0, bytes(100)),
           rec(3, 0x1000, 0, bytes(PAGE), flags=5),
           rec(5, payload=bytes(8)), rec(4, payload=bytes(2000)), rec(1, 0x1000, 0, bytes(PAGE), flags=0x80),
           rec(2, 1 << 60, 0, bytes(PAGE))]
    for data in bad:
        p = StreamParser()
        good = rec(6)
        assert [r.kind for r in p.feed(good + data + good)] == ["replay-done"]
        assert p.broken and p.feed(good) == [] and p.close() == p.broken


def test_a_huge_length_is_refused_before_buffering() -> None:
    p = StreamParser()
    header = HEADER.pack(MAGIC, 1, 1, 0, 0xFFFFFFFF, 0, 0, 0, 0)
    assert p.feed(header) == [] and "limit" in p.broken


def test_random_garbage_never_raises() -> None:
    rng = random.Random(18)
    for _ in range(300):
        p = StreamParser()
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
        if rng.random() < 0.5:  # a valid prefix, then garbage
            data = rec(6) + struct.pack("<I", MAGIC) + data
        for r in p.feed(data):
            assert r.kind in ("first", "written", "replay", "hello", "stats", "replay-done")
        p.close()


class FakeDb:
    def __init__(self, known: dict[bytes, PageHit]) -> None:
        self.known = known

    def lookup_digests(self, digests: list[bytes]) -> list[list[PageHit]]:
        return [[self.known[d]] if d in self.known else [] for d in digests]

    def file_pages(self, file_id: int) -> list:
        return []


def test_identify_known_unknown_kernel_boot_and_vdso() -> None:
    known_page, unknown_page = os.urandom(PAGE), os.urandom(PAGE)
    vdso = b"\x7fELF" + bytes(100) + b"linux-vdso.so.1" + bytes(PAGE - 119)
    hit = PageHit(1, 0, 0x1000, "/usr/bin/x", "pkg", "1.0", "amd64", "pkg", None, b"")
    stream = ArchEventStream(Path("/nonexistent"), None, FakeDb({page_digest(known_page): hit}))
    records = [Record("first", 0x5000, 0x401123, 0, known_page, True),
               Record("written", 0x6000, 0x7F0000001000, 0, unknown_page, True),
               Record("first", 0x7000, 0xFFFFFFFF81000000, 0, unknown_page, True),
               Record("replay", 0x9000, 0x9010, 0, unknown_page, True),
               Record("first", 0xA000, 0x7FFF00000000, 0, vdso, True),
               Record("first", 0xB000, 0x402000, 0, b"", False)]
    events = stream.identify(records)
    assert [e.verdict for e in events] == ["known", "unknown", "kernel", "boot", "vdso", "unreadable"]
    assert events[0].images == [{"path": "/usr/bin/x", "package": "pkg", "version": "1.0"}]
    assert events[1].kind == "written" and events[1].to_dict()["cr3"] == [] and events[1].to_dict()["space"] == "user"
    assert stream.counts == {"known": 1, "unknown": 1, "kernel": 1, "boot": 1, "vdso": 1, "unreadable": 1}


def test_no_kb_makes_user_pages_unverifiable() -> None:
    stream = ArchEventStream(Path("/nonexistent"), None, None, db_reason="no code-page DB (x)")
    (ev,) = stream.identify([Record("first", 0x5000, 0x401000, 0, bytes(PAGE), True)])
    assert ev.verdict == "unverifiable" and "x" in ev.note


def _fake_plugin(tmp_path: Path, data: bytes) -> Path:
    """Listen like the plugin, send `data` to the first reader, then close."""
    import socket
    import threading

    path = tmp_path / "ae.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        conn.sendall(data)
        conn.close()
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return path


def test_stream_over_a_socket_ends_with_the_reason(tmp_path: Path) -> None:
    page = os.urandom(PAGE)
    data = rec(4, payload=b"archevents 1\n") + rec(3, 0x5000, 0x401000, page) + rec(6) + rec(1, 0x6000, 0x402000, page)
    stream = ArchEventStream(_fake_plugin(tmp_path, data + b"\xff" * 40), None, None)
    events = list(stream.iter_events(duration=10))
    assert [e.kind for e in events] == ["replay", "first"] and stream.replay_done and stream.hello == "archevents 1"
    assert "malformed" in stream.ended and "bad magic" in stream.ended
    stream.close()


def test_stream_truncated_by_the_plugin(tmp_path: Path) -> None:
    stream = ArchEventStream(_fake_plugin(tmp_path, rec(6) + rec(1, 0x6000, 0x402000, bytes(PAGE))[:100]), None, None)
    assert list(stream.iter_events(duration=10)) == []
    assert stream.replay_done and "truncated" in stream.ended
    stream.close()


def test_runner_adds_the_plugin_only_when_asked() -> None:
    import pytest

    from nephoscope.core.errors import LabError
    from nephoscope.lab import runner

    def guest(**kw: object) -> runner.Guest:
        base = dict(name="g", profile="clean", pid=0, mem_mib=512, smp=1, kaslr=True, accel="tcg", cpu="qemu64",
                    gdb_port=0, http_port=1, ssh_port=2, image="/x", started=0.0)
        return runner.Guest(**(base | kw))  # type: ignore[arg-type]

    assert runner._plugin_args(guest()) == []
    with pytest.raises(LabError, match="TCG"):
        runner._plugin_args(guest(arch_events=True, accel="kvm"))
    with pytest.raises(LabError, match="ram"):
        runner._plugin_args(guest(arch_events=True, ram="anon"))


def test_a_replayed_page_written_since_is_stale_unless_mapped_executable() -> None:
    p = StreamParser()
    (r,) = p.feed(rec(3, 0x6000, 0x7F0000001000, bytes(PAGE), flags=3))
    assert r.written_since and r.has_bytes
    stream = ArchEventStream(Path("/nonexistent"), None, FakeDb({}))
    (ev,) = stream.identify([r])
    assert ev.verdict == "stale" and "no longer code" in ev.note
    stream._owners = {0x6000: [0x11000]}
    (ev,) = stream.identify([r])
    assert ev.verdict == "unknown" and ev.cr3 == [0x11000]
