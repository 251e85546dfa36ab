"""The kernel-model cache on a synthetic kernel image: a hit equals the original, any changed fact is a miss."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from nephoscope.core.errors import DetectionError
from nephoscope.memory.physical import BufferMemory
from nephoscope.os.btf.build import BtfBuilder
from nephoscope.os.btf.reader import Btf
from nephoscope.os.linux import cache as cache_mod
from nephoscope.os.linux.cache import (
    FORMAT,
    CachedKallsyms,
    CacheMiss,
    ModelCache,
    RecordingTypes,
    ReplayTypes,
    cache_disabled,
    open_model,
    validate,
)
from nephoscope.os.linux.detect import (
    LINK_TEXT_GVA,
    START_KERNEL_MAP,
    Detection,
    DetectionReport,
    Stage,
    kernel_info,
    kernel_page_tables,
)
from nephoscope.os.linux.kallsyms import Kallsyms, KallsymsLayout
from nephoscope.os.linux.model import WIDTHS, LinuxKernel
from nephoscope.os.linux.symbols import MemberInfo

MASK = (1 << 64) - 1
BANNER = "Linux version 6.1.0-synth (x@y) (gcc 12) #1 SMP PREEMPT_DYNAMIC Debian 6.1.1-1 (2026-01-01)"
BUILD_ID = bytes(range(1, 21))
RAM = 16 << 20
# offsets inside the kernel image (from _text's gpa); the image is mapped by 2 MiB pages
BANNER_AT, PHYS_BASE_AT, PGD_AT, INIT_TASK_AT, NOTES_AT = 0x100000, 0x100200, 0x101000, 0x110000, 0x120000
OFFSETS_AT, NAMES_AT, MARKERS_AT, TOKENS_AT, BTF_AT = 0x130000, 0x131000, 0x132000, 0x133000, 0x200000
NUM_SYMS = 64
PERCPU = 0x2C000  # a per-cpu symbol: an offset, never slid by KASLR


class FakeTypes:
    """Every struct the model asks for exists, members at 8-byte steps with the widths the model checks."""

    label = "fake"
    COUNTS: ClassVar[dict[str, int]] = {"xa_node.slots": 64, "maple_range_64.pivot": 15, "maple_range_64.slot": 16,
              "maple_arange_64.pivot": 9, "maple_arange_64.slot": 10}

    def has_struct(self, name: str) -> bool:
        return name != "module_memory"

    def struct_size(self, name: str) -> int:
        return 4096

    def members(self, wanted: Mapping[str, Iterable[str]], kernel: str = "") -> dict[str, dict[str, MemberInfo]]:
        out: dict[str, dict[str, MemberInfo]] = {}
        for s, paths in wanted.items():
            out[s] = {}
            for i, p in enumerate(paths):
                path = p.rstrip("?")
                if path == "mem":
                    continue  # module.mem: a 6.4+ member; this fake kernel uses core_layout
                key = f"{s}.{path}"
                count = self.COUNTS.get(key)
                size = 8 * count if count else WIDTHS.get(key, (8,))[0]
                out[s][path] = MemberInfo(64 * i, size, count, 8 * 64 * i)
        return out

    def enum_values(self, name: str) -> dict[str, int] | None:
        return {"maple_dense": 0, "maple_leaf_64": 1, "maple_range_64": 2, "maple_arange_64": 3} \
            if name == "maple_type" else None


@pytest.fixture(autouse=True)
def _anchors_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's anchor checks read kernel objects this synthetic image does not build (tested elsewhere)."""
    monkeypatch.setattr(LinuxKernel, "check_anchors", lambda self: [])


def _btf_blob() -> bytes:
    b = BtfBuilder()
    b.struct("task_struct", 8, [("pid", b.int("int", 4, signed=True), 0, 0)])
    return b.blob()


def _symbols(text_gva: int) -> list[tuple[int, str]]:
    btf_len = len(_btf_blob())
    notes_len = 12 + 4 + len(BUILD_ID)
    rows = [(text_gva, "_text"), (text_gva + BANNER_AT, "linux_banner"), (text_gva + PHYS_BASE_AT, "phys_base"),
            (text_gva + PGD_AT, "init_top_pgt"), (text_gva + INIT_TASK_AT, "init_task"),
            (text_gva + INIT_TASK_AT + 0x1000, "init_pid_ns"), (text_gva + INIT_TASK_AT + 0x2000, "modules"),
            (text_gva + NOTES_AT, "__start_notes"), (text_gva + NOTES_AT + notes_len, "__stop_notes"),
            (text_gva + BTF_AT, "__start_BTF"), (text_gva + BTF_AT + btf_len, "__stop_BTF"), (PERCPU, "runqueues")]
    rows += [(text_gva + 0x10 * i, f"filler_{i}") for i in range(NUM_SYMS - len(rows) - 1)]
    rows.append((text_gva + 0x20, "filler_3"))  # a duplicate name: the lowest address wins, as in the kernel
    return sorted(rows)


def build_image(text_gpa: int = 0x400000, slide: int = 0x1000000) -> tuple[bytearray, int, int]:
    """Return (RAM, phys_base, relative_base) of a kernel whose _text is at `text_gpa`, KASLR-slid by `slide`."""
    ram = bytearray(RAM)
    text_gva = LINK_TEXT_GVA + slide
    phys_base = (text_gpa - (text_gva - START_KERNEL_MAP)) & MASK
    banner = BANNER.encode() + b"\n\0"
    ram[text_gpa + BANNER_AT:text_gpa + BANNER_AT + len(banner)] = banner
    struct.pack_into("<Q", ram, text_gpa + PHYS_BASE_AT, phys_base)
    pml4, pdpt, pd = (text_gpa + PGD_AT + 0x1000 * i for i in range(3))
    struct.pack_into("<Q", ram, pml4 + 8 * 511, pdpt | 3)
    struct.pack_into("<Q", ram, pdpt + 8 * 510, pd | 3)
    for page in range(2):  # the image: two 2 MiB pages
        index = ((text_gva - START_KERNEL_MAP) >> 21) + page
        struct.pack_into("<Q", ram, pd + 8 * index, (text_gpa + (page << 21)) | 0x83)
    struct.pack_into("<III", ram, text_gpa + NOTES_AT, 4, len(BUILD_ID), 3)
    ram[text_gpa + NOTES_AT + 12:text_gpa + NOTES_AT + 16] = b"GNU\0"
    ram[text_gpa + NOTES_AT + 16:text_gpa + NOTES_AT + 16 + len(BUILD_ID)] = BUILD_ID
    blob = _btf_blob()
    ram[text_gpa + BTF_AT:text_gpa + BTF_AT + len(blob)] = blob
    relative_base = text_gva
    for i, at in enumerate((OFFSETS_AT, NAMES_AT, MARKERS_AT, TOKENS_AT)):  # table bytes (hashed, not decoded)
        ram[text_gpa + at:text_gpa + at + 0x400] = bytes([(i * 37 + k) & 0xFF for k in range(0x400)])
    struct.pack_into("<QQ", ram, text_gpa + NAMES_AT - 16, relative_base, NUM_SYMS)
    return ram, phys_base, relative_base


def _layout(text_gpa: int, relative_base: int) -> KallsymsLayout:
    return KallsymsLayout(text_gpa + TOKENS_AT, text_gpa + TOKENS_AT + 0x200, text_gpa + NAMES_AT, 0x400,
                          text_gpa + MARKERS_AT, 4, NUM_SYMS, text_gpa + OFFSETS_AT, relative_base, None, True,
                          "offsets-first")


def detected(phys: BufferMemory, text_gpa: int = 0x400000, slide: int = 0x1000000) -> Detection:
    """Return what full detection would prove about the synthetic image."""
    ram_view = phys.read(text_gpa + NAMES_AT - 16, 8)
    relative_base = int.from_bytes(ram_view, "little")
    rows = _symbols(LINK_TEXT_GVA + slide)
    syms = Kallsyms(_layout(text_gpa, relative_base), [n for _a, n in rows], "T" * len(rows),
                    np.array([a for a, _n in rows], dtype=np.uint64))
    phys_base = (text_gpa - (syms.get("_text") - START_KERNEL_MAP)) & MASK
    space, _how = kernel_page_tables(phys, syms, phys_base)
    btf = Btf.parse(_btf_blob())
    info = kernel_info(phys, syms, phys_base, space, [], (btf, text_gpa + BTF_AT, len(_btf_blob())))
    report = DetectionReport([Stage(n, True, "synthetic", 0.0)
                              for n in ("banner", "kallsyms", "phys/virt base", "page-table root", "btf")])
    return Detection(report, info=info, kallsyms=syms, kernel_space=space, btf=btf)


@pytest.fixture()
def cached(tmp_path: Path) -> tuple[bytearray, BufferMemory, LinuxKernel, ModelCache]:
    """A synthetic image, its model, and a cache holding its record."""
    ram, _pb, _rb = build_image()
    phys = BufferMemory(ram)
    recorder = RecordingTypes(FakeTypes())
    kernel = LinuxKernel(phys, detected(phys), types=recorder)
    cache = ModelCache(tmp_path / "kernels")
    cache._remember(phys, kernel, recorder.log)
    return ram, phys, kernel, cache


def test_a_hit_is_the_model_recovery_gave(cached: tuple[bytearray, BufferMemory, LinuxKernel, ModelCache]) -> None:
    _ram, phys, original, cache = cached
    assert original.info.build_id == BUILD_ID.hex()
    hit = cache.open(phys)
    assert hit.info == original.info
    assert hit.off._off == original.off._off and hit.off.size == original.off.size
    assert (hit.maple, hit.module_mem_types, hit.state_member) == (original.maple, original.module_mem_types,
                                                                   original.state_member)
    assert isinstance(hit.symbols, CachedKallsyms) and len(hit.symbols) == len(original.symbols)
    assert hit.btf is not None and hit.btf._btf is None  # type: ignore[attr-defined]  # not parsed: not needed
    assert hit.report.stage("banner").detail.startswith("cached kernel")  # type: ignore[union-attr]
    assert "from the cache" in hit.report.stage("kallsyms").detail  # type: ignore[union-attr]
    assert hit.symbols.find("filler_3") == original.symbols.find("filler_3")  # not hot: parses the full table
    assert list(hit.symbols.entries()) == list(original.symbols.entries())
    assert hit.symbols.symbols == original.symbols.symbols
    with pytest.raises(DetectionError, match="no symbol"):
        hit.symbols.get("not_a_symbol")
    assert hit.btf is not None and hit.btf.get_struct("task_struct").size == 8  # the lazily parsed guest BTF


def _corrupt(ram: bytearray, gpa: int, value: bytes = b"\xff") -> None:
    ram[gpa:gpa + len(value)] = value


TEXT = 0x400000
HOSTILE: dict[str, Callable[[bytearray], None]] = {
    "banner": lambda ram: _corrupt(ram, TEXT + BANNER_AT + 20, b"X"),
    "kallsyms names": lambda ram: _corrupt(ram, TEXT + NAMES_AT + 0x123),
    "kallsyms offsets": lambda ram: _corrupt(ram, TEXT + OFFSETS_AT + 8),
    "kallsyms tokens": lambda ram: _corrupt(ram, TEXT + TOKENS_AT + 0x30),
    "relative base": lambda ram: _corrupt(ram, TEXT + NAMES_AT - 16, b"\x01"),
    "num_syms": lambda ram: _corrupt(ram, TEXT + NAMES_AT - 8, b"\x07"),
    "phys_base variable": lambda ram: _corrupt(ram, TEXT + PHYS_BASE_AT, b"\x01"),
    "page tables": lambda ram: _corrupt(ram, TEXT + PGD_AT + 0x2000 + 8 * 16 + 2, b"\x10"),
    "build id": lambda ram: _corrupt(ram, TEXT + NOTES_AT + 20),
    "BTF": lambda ram: _corrupt(ram, TEXT + BTF_AT + 40),
}


@pytest.mark.parametrize("what", sorted(HOSTILE))
def test_any_changed_fact_falls_back_to_full_detection(
        cached: tuple[bytearray, BufferMemory, LinuxKernel, ModelCache], what: str) -> None:
    ram, phys, _original, cache = cached
    HOSTILE[what](ram)
    # full detection runs and, on this synthetic image without real kallsyms, fails naming its stage
    with pytest.raises(DetectionError, match="stage"):
        cache.open(phys)
    assert cache.last_problem is not None


def test_another_boot_of_the_same_build_validates_at_its_position(
        cached: tuple[bytearray, BufferMemory, LinuxKernel, ModelCache]) -> None:
    _ram, _phys, original, cache = cached
    ram2, _pb, _rb = build_image(text_gpa=0xA00000, slide=0x2E00000)
    phys2 = BufferMemory(ram2)
    record = next(cache._records())
    det, types = validate(phys2, record, cache.directory, 0xA00000, 0x2E00000)
    delta = 0x2E00000 - 0x1000000
    assert det.info is not None and det.info.text_gpa == 0xA00000 and det.info.virt_slide == 0x2E00000
    assert det.kallsyms is not None and det.kallsyms.find("runqueues") == PERCPU  # per-cpu: not slid
    assert det.kallsyms.get("init_task") == original.symbols.get("init_task") + delta
    assert [a for a, _t, _n in det.kallsyms.entries()] == [
        a + delta if a >= START_KERNEL_MAP else a for a, _t, _n in original.symbols.entries()]
    assert types.has_struct("maple_tree")  # what the model asked when the record was made
    with pytest.raises(CacheMiss):
        validate(phys2, record, cache.directory, 0xA00000, 0x1000000)  # the wrong slide is refused


def test_replayed_types_answer_only_what_was_asked() -> None:
    recorder = RecordingTypes(FakeTypes())
    assert recorder.has_struct("task_struct")
    asked = recorder.members({"task_struct": ["pid", "comm"]})
    assert asked["task_struct"]["comm"] == MemberInfo(64, 16, None, 512)
    replay = ReplayTypes(json.loads(json.dumps(recorder.log)), "replay")
    assert replay.has_struct("task_struct")
    assert replay.members({"task_struct": ["pid", "comm"]}) == asked
    for question in (lambda: replay.has_struct("mm_struct"), lambda: replay.struct_size("task_struct"),
                     lambda: replay.members({"task_struct": ["pid"]}), lambda: replay.enum_values("maple_type")):
        with pytest.raises(CacheMiss):
            question()


def test_a_model_that_asks_something_new_is_rebuilt(
        cached: tuple[bytearray, BufferMemory, LinuxKernel, ModelCache], monkeypatch: pytest.MonkeyPatch) -> None:
    _ram, phys, _original, cache = cached
    from nephoscope.os.linux import model

    monkeypatch.setitem(model.WANTED, "cred", [*model.WANTED["cred"], "fsuid"])  # a newer model wants more
    # the question is answered from the image's BTF (proved identical); this synthetic BTF lacks the structs,
    # so the model refuses — exactly what full recovery would say — and the cache is not trusted
    with pytest.raises(DetectionError, match="stage"):
        cache.open(phys)
    assert cache.last_problem is not None and "lacks" in cache.last_problem


def test_unrecorded_questions_are_answered_from_the_proved_btf_and_learnt() -> None:
    recorder = RecordingTypes(FakeTypes())
    recorder.has_struct("task_struct")
    replay = ReplayTypes(json.loads(json.dumps(recorder.log)), "replay", fallback=FakeTypes())
    assert replay.has_struct("task_struct") and not replay.learnt
    assert replay.members({"cred": ["uid", "fsuid"]})["cred"]["fsuid"].offset == 64
    assert replay.learnt and replay.log["members"]  # written back into the record's log
    assert replay.enum_values("maple_type") == FakeTypes().enum_values("maple_type")
    assert replay.struct_size("cred") == 4096


def test_damaged_cache_files_are_never_trusted(cached: tuple[bytearray, BufferMemory, LinuxKernel, ModelCache]
                                               ) -> None:
    _ram, phys, _original, cache = cached
    syms = next(cache.directory.glob("*.syms"))
    raw = bytearray(syms.read_bytes())
    raw[-3] ^= 0xFF  # an address in the symbols file
    syms.write_bytes(bytes(raw))
    with pytest.raises(DetectionError):
        cache.open(phys)
    assert "changed" in (cache.last_problem or "")
    record_path = next(cache.directory.glob("*.json"))
    good = json.loads(record_path.read_bytes())
    broken = [{**good, "layout_rel": "x"}, {**good, "seen": [[1]]}, {**good, "count": True},
              {**good, "hot": {"_text": "0x1"}}, {**good, "layout_rel": {**good["layout_rel"], "names_gpa": 1.5}},
              {**good, "format": FORMAT + 1}, {k: v for k, v in good.items() if k != "types_log"}]
    for garbage in (b"{not json", b"[]", *(json.dumps(b).encode() for b in broken)):
        record_path.write_bytes(garbage)
        assert list(cache._records()) == []
    record_path.write_bytes(json.dumps({**good, "types_log": {"has_struct": {"maple_tree": "yes"}}}).encode())
    syms.write_bytes(bytes(raw[:-3]) + bytes([raw[-3] ^ 0xFF]) + bytes(raw[-2:]))  # the original symbols
    with pytest.raises(DetectionError, match="stage"):  # a malformed recorded answer: rebuilt, not trusted
        cache.open(phys)
    assert "malformed" in (cache.last_problem or "")


def test_the_cache_can_be_bypassed(cached: tuple[bytearray, BufferMemory, LinuxKernel, ModelCache],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _ram, phys, _original, cache = cached
    monkeypatch.setenv(cache_mod.NO_CACHE_ENV, "1")
    assert cache_disabled()
    with pytest.raises(DetectionError, match="stage"):  # full detection, although the record would fit
        open_model(phys, directory=cache.directory)
    monkeypatch.setenv(cache_mod.NO_CACHE_ENV, "0")
    assert not cache_disabled()
    assert open_model(phys, directory=cache.directory).report.stages[0].detail.startswith("cached kernel")
    with pytest.raises(DetectionError, match="stage"):
        open_model(phys, use_cache=False, directory=cache.directory)


def test_another_boot_is_found_by_probing_aligned_load_addresses(
        cached: tuple[bytearray, BufferMemory, LinuxKernel, ModelCache]) -> None:
    _ram, _phys, original, cache = cached
    ram2, _pb, _rb = build_image(text_gpa=0xA00000, slide=0x2E00000)  # same build, another KASLR boot
    hit = cache.open(BufferMemory(ram2))  # no banner scan, no kallsyms search: the record's placement fits
    assert hit.info.text_gpa == 0xA00000 and hit.info.virt_slide == 0x2E00000
    assert hit.info.banner == original.info.banner and hit.off._off == original.off._off
    assert hit.report.stage("banner").detail.startswith("cached kernel")  # type: ignore[union-attr]
    assert next(cache._records()).seen[0] == [0xA00000, 0x2E00000]  # remembered for next time
    ram3, _pb, _rb = build_image(text_gpa=0xA00000, slide=0x2E00000)
    _corrupt(ram3, 0xA00000 + NAMES_AT + 5)  # that boot, but its kallsyms differ: probing proves nothing
    with pytest.raises(DetectionError, match="stage"):
        cache.open(BufferMemory(ram3))
