"""The PHP reader on synthetic engine state laid out with the php8.2 layout, intact and corrupted."""

from __future__ import annotations

import struct

import pytest

from nephoscope.core.errors import MemoryAccessError
from nephoscope.introspect.interp import php
from nephoscope.introspect.interp.php_layout import PHP82_NTS as L

BIAS = 0x5600_0000_0000
EG_VADDR, SG_VADDR = 0x582500, 0x581F60
BUILD = php.PhpBuild("php8.2-fpm", "8.2.36-1~deb12u1", "/usr/sbin/php-fpm8.2", "ab" * 20, 420220829, "NTS",
                     EG_VADDR, 1800, SG_VADDR, 552)


class Memory:
    """Sparse user memory in 4 KiB pages; reads of a page never written raise like an unmapped page."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.reads = 0
        self.heap = 0x7F00_0000_0000

    def write(self, gva: int, blob: bytes) -> None:
        for i, b in enumerate(blob):
            self.pages.setdefault((gva + i) >> 12, bytearray(4096))[(gva + i) & 0xFFF] = b

    def u64(self, gva: int, value: int) -> None:
        self.write(gva, struct.pack("<Q", value))

    def data_u64(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 8), "little")

    def u32(self, gva: int, value: int) -> None:
        self.write(gva, struct.pack("<I", value))

    def alloc(self, size: int) -> int:
        gva = self.heap
        self.heap += (size + 15) // 16 * 16 + 16
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

    def table(self, keys: list[str], size: int = 8) -> int:
        gva = self.alloc(L["sizeof.HashTable"])
        self.place_table(gva, keys, size)
        return gva

    def place_table(self, gva: int, keys: list[str], size: int = 8) -> None:
        ar = self.alloc(size * L["sizeof.Bucket"])
        for i, key in enumerate(keys):
            bucket = ar + i * L["sizeof.Bucket"]
            self.write(bucket + L["Bucket.val"] + L["zval.u1.type_info"], b"\x01")  # IS_NULL: a live entry
            self.u64(bucket + L["Bucket.key"], self.zstr(key))
        self.u32(gva + L["HashTable.u.flags"], 0)
        self.u32(gva + L["HashTable.nTableMask"], (-2 * size) & 0xFFFFFFFF)
        self.u64(gva + L["HashTable.arData"], ar)
        self.write(gva + L["HashTable.nNumUsed"], struct.pack("<III", len(keys), len(keys), size))

    def function(self, name: str | None, file: str, lines: list[int], ftype: int = 2, cls: str = "") -> tuple[int, int]:
        """Return (zend_function gva, opcodes gva) of a user function whose opcodes carry `lines`."""
        func = self.alloc(256)
        self.write(func + L["zend_function.type"], bytes([ftype]))
        self.u64(func + L["zend_function.common.function_name"], self.zstr(name) if name else 0)
        if cls:
            ce = self.alloc(64)
            self.u64(ce + L["zend_class_entry.name"], self.zstr(cls))
            self.u64(func + L["zend_function.common.scope"], ce)
        if ftype == 1:
            return func, 0
        ops = self.alloc(len(lines) * L["sizeof.zend_op"])
        for i, line in enumerate(lines):
            self.u32(ops + i * L["sizeof.zend_op"] + L["zend_op.lineno"], line)
        self.u64(func + L["zend_function.op_array.filename"], self.zstr(file))
        self.u64(func + L["zend_function.op_array.opcodes"], ops)
        self.u32(func + L["zend_function.op_array.last"], len(lines))
        self.u32(func + L["zend_function.op_array.line_start"], min(lines))
        return func, ops

    def frame(self, func: int, opline: int, prev: int) -> int:
        ex = self.alloc(L["sizeof.zend_execute_data"])
        self.u64(ex + L["zend_execute_data.opline"], opline)
        self.u64(ex + L["zend_execute_data.func"], func)
        self.u64(ex + L["zend_execute_data.prev_execute_data"], prev)
        return ex


def engine(busy: bool = True) -> tuple[Memory, dict[str, int]]:
    """Return memory holding a php-fpm worker inside sleep() in NphWorker::work, and named gvas."""
    m = Memory()
    eg, sg = BIAS + EG_VADDR, BIAS + SG_VADDR
    m.write(eg, bytes(1800))
    m.write(sg, bytes(552))
    m.u64(eg + L["zend_executor_globals.function_table"], m.table([f"f{i}" for i in range(20)], 32))
    m.u64(eg + L["zend_executor_globals.class_table"], m.table([f"c{i}" for i in range(10)], 16))
    m.place_table(eg + L["zend_executor_globals.included_files"], ["/var/www/slow.php", "/var/www/lib.php"])
    m.write(eg + L["zend_executor_globals.active"], b"\x01")
    names: dict[str, int] = {"eg": eg, "sg": sg}
    if busy:
        main, main_ops = m.function(None, "/var/www/slow.php", [1, 2, 11, 12])
        slow, slow_ops = m.function("nph_slow", "/var/www/slow.php", [8, 9, 10])
        work, work_ops = m.function("work", "/var/www/slow.php", [4, 5, 6], cls="NphWorker")
        sleep, _ = m.function("sleep", "", [], ftype=1)
        f_main = m.frame(main, main_ops + 2 * L["sizeof.zend_op"], 0)
        f_slow = m.frame(slow, slow_ops + 1 * L["sizeof.zend_op"], f_main)
        f_work = m.frame(work, work_ops + 1 * L["sizeof.zend_op"], f_slow)
        f_sleep = m.frame(sleep, 0, f_work)
        m.u64(eg + L["zend_executor_globals.current_execute_data"], f_sleep)
        names.update(main=f_main, slow=f_slow, work=f_work, sleep=f_sleep, work_func=work, work_ops=work_ops)
        for key, text in (("request_uri", "/slow.php"), ("request_method", "GET"),
                          ("path_translated", "/var/www/slow.php")):
            s = m.alloc(len(text) + 1)
            m.write(s, text.encode() + b"\0")
            m.u64(sg + L[f"sapi_globals_struct.request_info.{key}"], s)
    return m, names


def test_reads_the_stack_innermost_first_and_the_included_files() -> None:
    m, _ = engine()
    state = php.read_state(m.read, BUILD, BIAS)
    assert state.complete, state.problem
    assert [f.label() for f in state.frames] == [
        "sleep <internal>", "NphWorker::work (/var/www/slow.php:5)", "nph_slow (/var/www/slow.php:9)",
        "{main} (/var/www/slow.php:11)"]
    assert state.included_files == ["/var/www/slow.php", "/var/www/lib.php"]
    assert (state.request_method, state.request_uri, state.script) == ("GET", "/slow.php", "/var/www/slow.php")
    assert state.to_json()["frames"][1] == {"function": "work", "cls": "NphWorker", "file": "/var/www/slow.php",
                                            "line": 5, "internal": False}


def test_an_active_executor_without_frames_is_idle() -> None:
    m, _ = engine(busy=False)
    state = php.read_state(m.read, BUILD, BIAS)
    assert state.complete and not state.busy and state.activated


def test_between_requests_the_stale_included_files_are_not_reported() -> None:
    m, n = engine(busy=False)
    m.write(n["eg"] + L["zend_executor_globals.active"], b"\x00")  # the request ended; the table is stale
    state = php.read_state(m.read, BUILD, BIAS)
    assert state.complete and not state.activated and state.included_files == [] and not state.frames


def test_an_inactive_executor_with_a_frame_or_a_non_bool_flag_is_unverifiable() -> None:
    m, n = engine()
    m.write(n["eg"] + L["zend_executor_globals.active"], b"\x00")
    state = php.read_state(m.read, BUILD, BIAS)
    assert not state.complete and "not active" in state.problem and not state.frames
    m.write(n["eg"] + L["zend_executor_globals.active"], b"\x07")
    assert "not a bool" in php.read_state(m.read, BUILD, BIAS).problem


def test_a_process_whose_executor_never_started_is_not_activated() -> None:
    m = Memory()
    m.write(BIAS + EG_VADDR, bytes(1800))
    state = php.read_state(m.read, BUILD, BIAS)
    assert state.complete and not state.activated and not state.frames


def test_wrong_bias_does_not_validate() -> None:
    m, _ = engine()
    state = php.read_state(m.read, BUILD, BIAS + 0x1000)
    assert not state.complete and "executor_globals" in state.problem and not state.frames


def test_a_table_of_garbage_at_function_table_does_not_validate() -> None:
    m, n = engine()
    m.u64(n["eg"] + L["zend_executor_globals.function_table"], n["eg"] + 8)  # points into EG itself
    state = php.read_state(m.read, BUILD, BIAS)
    assert not state.complete and "function_table" in state.problem


@pytest.mark.parametrize("corrupt, words", [
    (lambda m, n: m.u64(n["slow"] + L["zend_execute_data.prev_execute_data"], n["work"]), "loops"),
    (lambda m, n: m.u64(n["work"] + L["zend_execute_data.opline"], n["work_ops"] + 0x1000), "outside"),
    (lambda m, n: m.u64(n["work"] + L["zend_execute_data.opline"], n["work_ops"] + 3), "outside"),
    (lambda m, n: m.u64(n["work"] + L["zend_execute_data.func"], 0), "null"),
    (lambda m, n: m.u64(n["work"] + L["zend_execute_data.func"], 0xDEAD_0000), "not mapped"),
    (lambda m, n: m.write(n["work_func"] + L["zend_function.type"], b"\x09"), "type 9"),
    (lambda m, n: m.u64(m.data_u64(n["work_func"] + L["zend_function.op_array.filename"]) + L["zend_string.len"],
                        1 << 40), "claims"),
    (lambda m, n: m.u64(n["sleep"] + L["zend_execute_data.prev_execute_data"], n["work"] + 4), "misaligned"),
])
def test_a_corrupted_stack_is_unverifiable_not_partial(corrupt, words: str) -> None:  # type: ignore[no-untyped-def]
    m, n = engine()
    corrupt(m, n)
    state = php.read_state(m.read, BUILD, BIAS)
    assert not state.complete and words in state.problem, state.problem
    assert state.frames == []  # never a made-up or partial stack
    assert state.included_files  # the rest still read


def test_an_endless_chain_of_distinct_frames_stops_at_the_cap() -> None:
    m, n = engine()
    func, ops = m.function("f", "/x.php", [3])
    prev = 0
    for _ in range(php.MAX_FRAMES + 5):
        prev = m.frame(func, ops, prev)
    m.u64(n["eg"] + L["zend_executor_globals.current_execute_data"], prev)
    state = php.read_state(m.read, BUILD, BIAS)
    assert not state.complete and "more than" in state.problem


def test_included_files_counts_must_agree() -> None:
    m, n = engine()
    m.u32(n["eg"] + L["zend_executor_globals.included_files"] + L["HashTable.nNumOfElements"], 7)
    state = php.read_state(m.read, BUILD, BIAS)
    assert not state.complete and "included files" in state.problem and state.included_files == []
    assert len(state.frames) == 4


def test_a_layout_that_does_not_fit_the_build_is_refused() -> None:
    m, _ = engine()
    other = php.PhpBuild(**{**php.asdict(BUILD), "executor_globals_size": 1808})
    state = php.read_state(m.read, other, BIAS)
    assert not state.complete and "does not fit" in state.problem
    unknown = php.PhpBuild(**{**php.asdict(BUILD), "api": 420230831})
    assert "no PHP struct layout" in php.read_state(m.read, unknown, BIAS).problem


def _elf_header(build_id: bytes) -> bytes:
    """Return an ELF header, two program headers (PT_LOAD at 0, PT_NOTE at 0x100) and the note."""
    ehdr = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 56, 2,
                                                             64, 0, 0)
    load = struct.pack("<IIQQQQQQ", php.PT_LOAD, 5, 0, 0, 0, 0x1000, 0x1000, 0x1000)
    note_desc = struct.pack("<III", 4, len(build_id), php.NT_GNU_BUILD_ID) + b"GNU\0" + build_id
    note = struct.pack("<IIQQQQQQ", php.PT_NOTE, 4, 0x100, 0x100, 0x100, len(note_desc), len(note_desc), 4)
    blob = bytearray(0x200)
    blob[:64], blob[64:120], blob[120:176] = ehdr, load, note
    blob[0x100:0x100 + len(note_desc)] = note_desc
    return bytes(blob)


def test_inspect_process_finds_the_build_from_the_header_in_another_process() -> None:
    from nephoscope.os.linux.walkers import Vma

    m, _ = engine()
    worker, master = Memory(), Memory()
    worker.pages = m.pages  # the worker lacks its header page; the master maps the same file at the same base
    master.write(BIAS, _elf_header(bytes.fromhex("ab" * 20)))
    vmas = [Vma(BIAS, BIAS + 0x1000, "r--p", 0, "/usr/sbin/php-fpm8.2", 1, 0)]
    asked: list[tuple[str, str, str]] = []

    def lookup(build_id: str, package: str, binary: str) -> php.PhpBuild | None:
        asked.append((build_id, package, binary))
        return BUILD if build_id == BUILD.build_id else None

    state = php.inspect_process(worker.read, "/usr/sbin/php-fpm8.2", vmas, lookup, headers=[(master.read, BIAS)])
    assert state is not None and state.complete, state and state.problem
    assert asked == [("ab" * 20, "php8.2-fpm", "/usr/sbin/php-fpm8.2")] and len(state.frames) == 4
    alone = php.inspect_process(worker.read, "/usr/sbin/php-fpm8.2", vmas, lookup)
    assert alone is not None and not alone.complete and "build id unreadable" in alone.problem
    assert php.inspect_process(worker.read, "/usr/bin/python3.11", vmas, lookup) is None


def test_a_header_of_garbage_is_refused() -> None:
    m = Memory()
    m.write(BIAS, b"\x7fELF\x02\x01" + bytes(26) + struct.pack("<Q", 64) + bytes(14) + struct.pack("<HH", 56, 60000))
    with pytest.raises(php.GuestDataError):
        php.read_build_id(m.read, BIAS)


def test_binary_names() -> None:
    assert php.php_binary("/usr/sbin/php-fpm8.2") == ("php8.2-fpm", "/usr/sbin/php-fpm8.2")
    assert php.php_binary("/usr/bin/php8.2") == ("php8.2-cli", "/usr/bin/php8.2")
    assert php.php_binary("/usr/bin/php-cgi8.2") == ("php8.2-cgi", "/usr/bin/php-cgi8.2")
    assert php.php_binary("/tmp/php-fpm8.2") is None


def test_a_page_cache_view_of_the_header_reads_only_the_cached_first_page() -> None:
    header = _elf_header(bytes.fromhex("cd" * 20))
    view = php.file_view(header + bytes(4096 - len(header)), (), BIAS)
    assert php.read_build_id(view, BIAS) == ("cd" * 20, 0)
    with pytest.raises(MemoryAccessError):
        view(BIAS + 4090, 16)
    absent = php.file_view(bytes(4096), (0,), BIAS)
    with pytest.raises(MemoryAccessError):
        absent(BIAS, 64)


def test_find_build_fetches_versions_until_the_build_id_matches_and_remembers_every_build(
        tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    from nephoscope.knowledge.debian import archive

    monkeypatch.setenv("NEPHOSCOPE_CACHE", str(tmp_path))
    fetched: list[str] = []
    monkeypatch.setattr(archive, "available_versions", lambda name: ("8.2.36-1", "8.2.32-1"))

    def download(name: str, version: str, cache: Path) -> Path:
        fetched.append(version)
        return cache / f"{name}_{version}.deb"

    monkeypatch.setattr(archive, "download", download)
    monkeypatch.setattr(archive, "unpack", lambda deb, cache: cache / deb.stem)
    monkeypatch.setattr(php, "build_from_elf", lambda path, package, version, binary: php.PhpBuild(
        **{**php.asdict(BUILD), "version": version, "build_id": "b" + version}))
    found = php.find_build("b8.2.32-1", "php8.2-fpm", "/usr/sbin/php-fpm8.2")
    assert found is not None and found.version == "8.2.32-1" and fetched == ["8.2.36-1", "8.2.32-1"]
    assert php.find_build("b8.2.32-1", "php8.2-fpm", "/usr/sbin/php-fpm8.2") == found and len(fetched) == 2
    assert php.find_build("nope", "php8.2-fpm", "/usr/sbin/php-fpm8.2") is None and len(fetched) == 2
