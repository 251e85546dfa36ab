"""The kernel's patch-site tables and the variants each site may hold, on small synthetic inputs."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from nephoscope.core.errors import KnowledgeError, NephoscopeError
from nephoscope.knowledge.kernelpkg import KernelImageFile, Section, module_name
from nephoscope.os.linux import patchsites as ps

TEXT = (0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_8200_0000)
TABLE = 0xFFFF_FFFF_8300_0000
NOP5 = bytes.fromhex("0f1f440000")
THUNK, FENTRY = 0xFFFF_FFFF_8150_0000, 0xFFFF_FFFF_8160_0000
ANY = ps.Targets(lambda a: TEXT[0] <= a < TEXT[1], lambda a: a == THUNK, lambda a: a == FENTRY)


def _rel(addrs: list[int], table: int = TABLE, stride: int = 4) -> bytes:
    return b"".join(struct.pack("<i", a - (table + stride * i)) for i, a in enumerate(addrs))


def _call(at: int, target: int, op: int = ps.CALL32) -> bytes:
    return bytes([op]) + struct.pack("<i", target - (at + 5))


@pytest.mark.parametrize("nop", ["90", "6690", "0f1f00", "0f1f4000", "0f1f440000", "660f1f440000",
                                 "0f1f8000000000", "0f1f840000000000", "662e0f1f840000000000", "0f1f40d6"])
def test_every_x86_nop_encoding_is_one_instruction(nop: str) -> None:
    code = bytes.fromhex(nop)
    assert ps.nop_length(code, 0) == len(code)
    assert ps.is_padding(code)


def test_padding_forms_and_what_is_not_padding() -> None:
    assert ps.is_padding(b"")
    assert ps.is_padding(bytes([ps.JMP8, 4]) + b"\xcc" * 4)  # 6.6+ add_nop: jmp.d8 over int3
    assert ps.is_padding(b"\xcc\xcc", after_branch=True)
    assert not ps.is_padding(b"\x90\xcc\xcc")  # an int3 where code runs into it is a breakpoint
    assert not ps.is_padding(b"\xe8\x00\x00\x00\x00")
    assert not ps.is_padding(bytes([ps.JMP8, 9]) + b"\xcc" * 4)  # jumps past the site
    assert not ps.is_padding(b"\x0f\x1f")  # cut short
    assert ps.content(b"\x31\xc0" + NOP5) == b"\x31\xc0"


def test_relative_tables_decode_and_refuse_entries_outside_the_image() -> None:
    sites = [TEXT[0] + 0x10, TEXT[0] + 0x2000]
    got = ps.decode_relative("return", _rel(sites), TABLE, TEXT, "return", 5)
    assert [(s.start, s.length, s.kind) for s in got] == [(a, 5, "return") for a in sites]
    with pytest.raises(ps.SiteTableError, match="return: entry 1 points to 0xffffffff83000100"):
        ps.decode_relative("return", _rel([TEXT[0], TABLE + 0x100]), TABLE, TEXT, "return", 5)
    with pytest.raises(ps.SiteTableError, match="not a whole number"):
        ps.decode_relative("return", b"\x00" * 6, TABLE, TEXT, "return", 5)


def test_absurd_counts_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ps, "MAX_SITES", 3)
    with pytest.raises(ps.SiteTableError, match=r"\.smp_locks: 4 entries is absurd"):
        ps.decode_relative(".smp_locks", _rel([TEXT[0]] * 4), TABLE, TEXT, "lock", 1)


def test_mcount_entries_of_discarded_functions_are_skipped() -> None:
    data = struct.pack("<3Q", TEXT[0] + 0x40, 0, TEXT[0] + 0x80)
    assert [s.start for s in ps.decode_absolute("__mcount_loc", data, TEXT, "mcount", 5)] == [TEXT[0] + 0x40,
                                                                                            TEXT[0] + 0x80]
    with pytest.raises(ps.SiteTableError):
        ps.decode_absolute("__mcount_loc", struct.pack("<Q", 0x1234), TEXT, "mcount", 5)


@pytest.mark.parametrize("stride", [12, 14])
def test_alternatives_decode_with_either_kernel_layout(stride: int) -> None:
    repl_base = TABLE + 0x1000
    instr, repl = TEXT[0] + 0x100, repl_base + 8
    entry = struct.pack("<ii", instr - TABLE, repl - (TABLE + 4)) + bytes(stride - 10) + bytes([6, 3])
    body = bytes(8) + b"\x0f\xae\xe8"
    (site,) = ps.decode_alternatives(".altinstructions", entry, TABLE, TEXT, (repl_base, body))
    assert (site.start, site.length, site.repl, site.repl_addr) == (instr, 6, b"\x0f\xae\xe8", repl)


def test_alternatives_with_garbage_say_which_table() -> None:
    garbage = bytes(range(12)) * 5
    with pytest.raises(ps.SiteTableError, match=r"\.altinstructions: no entry layout fits"):
        ps.decode_alternatives(".altinstructions", garbage, TABLE, TEXT, (0, b""))


def test_jump_labels_take_their_length_from_the_file_and_accept_only_their_target() -> None:
    code, target = TEXT[0] + 0x500, TEXT[0] + 0x540
    entry = struct.pack("<iiq", code - TABLE, target - (TABLE + 4), 0)
    text = {code: NOP5}
    (site,) = ps.decode_jump_table("__jump_table", entry, TABLE, TEXT, lambda a, n: text.get(a, b"")[:n])
    assert (site.start, site.length, site.target) == (code, 5, target)
    assert ps.accepts(site, NOP5, _call(code, target, ps.JMP32), 0, ANY)  # enabled: jmp to the target
    assert ps.accepts(site, _call(code, target, ps.JMP32), NOP5, 0, ANY)  # disabled
    assert not ps.accepts(site, NOP5, _call(code, target + 0x10, ps.JMP32), 0, ANY)  # elsewhere: a hook
    assert not ps.accepts(site, NOP5, _call(code, target), 0, ANY)  # a call is no jump label
    bad = struct.pack("<iiq", 0x10, 0, 0)  # code inside the table itself
    with pytest.raises(ps.SiteTableError, match="__jump_table: entry 0"):
        ps.decode_jump_table("__jump_table", bad, TABLE, TEXT, lambda a, n: b"")


def test_site_variants() -> None:
    at = TEXT[0] + 0x1000
    ret = ps.Site(at, 5, "return")
    thunk = _call(at, 0xFFFF_FFFF_8150_0000, ps.JMP32)
    assert ps.accepts(ret, thunk, b"\xc3\xcc\xcc\xcc\xcc", 0, ANY)
    assert not ps.accepts(ret, thunk, _call(at, TEXT[0] + 0x10, ps.JMP32), 0, ANY)  # not a return thunk
    retpoline = ps.Site(at, 5, "retpoline")
    assert ps.accepts(retpoline, _call(at, TEXT[0]), b"\xff\xd0" + b"\x0f\x1f\x00", 0, ANY)  # call *%rax
    assert ps.accepts(retpoline, _call(at, TEXT[0]), b"\x41\xff\xd3\x66\x90", 0, ANY)  # call *%r11
    assert not ps.accepts(retpoline, _call(at, TEXT[0]), b"\xff\x25\x00\x00\x00", 0, ANY)
    lock = ps.Site(at, 1, "lock")
    assert ps.accepts(lock, b"\xf0", b"\x3e", 0, ANY)
    assert not ps.accepts(lock, b"\xf0", b"\xcc", 0, ANY)  # a breakpoint
    sc = ps.Site(at, 5, "static_call")
    assert ps.accepts(sc, _call(at, TEXT[0]), ps.XOR5RAX, 0, ANY)
    assert ps.accepts(sc, _call(at, TEXT[0]), _call(at, TEXT[0] + 0x40), 0, ANY)
    assert not ps.accepts(sc, _call(at, TEXT[0]), _call(at, TEXT[1] + 0x1000), 0, ANY)  # outside any code
    mcount = ps.Site(at, 5, "mcount")
    assert ps.accepts(mcount, NOP5, _call(at, 0xFFFF_FFFF_8160_0000), 0, ANY)  # ftrace on
    assert not ps.accepts(mcount, NOP5, _call(at, TEXT[0] + 0x40), 0, ANY)  # a call elsewhere
    rc = ps.Site(at, 8, "runtime_const", target=0x7FFF_FFFF_F000)
    assert ps.accepts(rc, b"\xef\xcd\xab\x89\x67\x45\x23\x01", struct.pack("<Q", 0x7FFF_FFFF_F000), 0, ANY)
    assert not ps.accepts(rc, b"\xef\xcd\xab\x89\x67\x45\x23\x01", struct.pack("<Q", 0xFFFF_FFFF_F000), 0, ANY)


def test_an_alternative_may_hold_its_replacement_moved_or_its_original_with_other_nops() -> None:
    at, repl_at = TEXT[0] + 0x2000, TEXT[0] + 0x90_0000
    # replacement: "call foo" (rel32 relative to the replacement's own address), then padding in the site
    foo = TEXT[0] + 0x3000
    site = ps.Site(at, 8, "alternative", _call(repl_at, foo), repl_at)
    orig = b"\x90" * 8
    assert ps.accepts(site, orig, _call(at, foo) + b"\x0f\x1f\x00", 0, ANY)
    assert ps.accepts(site, orig, bytes.fromhex("0f1f840000000000"), 0, ANY)  # optimize_nops
    assert not ps.accepts(site, orig, _call(at, foo + 4) + b"\x0f\x1f\x00", 0, ANY)  # call elsewhere
    assert not ps.accepts(site, orig, b"\xcc" + b"\x90" * 7, 0, ANY)
    assert ps.same_code(b"\x48\x8b\x05" + struct.pack("<i", 0x100), b"\x48\x8b\x05" + struct.pack("<i", 0x80), 0x80)


def test_the_kaslr_relocation_table_reads_from_its_end() -> None:
    words = [0, 0x8100_0010, 0x8100_0020, 0, 0x8100_0030, 0, 0x8100_0040]  # 0, 64-bit, 0, inverse, 0, 32-bit
    r32, r32neg, r64 = ps.parse_relocs(b"junk" + np.array(words, "<u4").tobytes())
    assert r32.tolist() == [0xFFFF_FFFF_8100_0040]
    assert r32neg.tolist() == [0xFFFF_FFFF_8100_0030]
    assert sorted(r64.tolist()) == [0xFFFF_FFFF_8100_0010, 0xFFFF_FFFF_8100_0020]
    with pytest.raises(ps.SiteTableError, match="no end marker"):
        ps.parse_relocs(np.array([1, 2, 3], "<u4").tobytes())


def test_kernel_image_blobs_round_trip_and_damage_is_a_knowledge_error() -> None:
    image = KernelImageFile("module", "e1000", "6.1.0-57-amd64/kernel/e1000.ko", "ab" * 32)
    image.sections[".text"] = Section(".text", 0, "SHT_PROGBITS", 6, 0, 0, 0, b"\xc3" * 10, 2)
    back = KernelImageFile.from_blob(image.to_blob(), image.sha256)
    assert back.sections[".text"] == image.sections[".text"] and back.name == "e1000"
    with pytest.raises(KnowledgeError):
        KernelImageFile.from_blob(b"not zlib")
    assert issubclass(ps.SiteTableError, NephoscopeError)
    assert module_name("kernel/drivers/net/e1000-e.ko.xz") == "e1000_e"


def _tiny_ko() -> KernelImageFile:
    """A module with one `call printk` (R_X86_64_PLT32 against an undefined symbol) in .text."""
    image = KernelImageFile("module", "tiny", "6.1.0-57-amd64/kernel/tiny.ko", "00" * 32)
    strtab = b"\0printk\0"
    symtab = bytes(24) + struct.pack("<IBBHQQ", 1, 0x10, 0, 0, 0, 0)  # GLOBAL NOTYPE UNDEF printk
    rela = struct.pack("<QQq", 1, (1 << 32) | 4, -4)  # offset 1, sym 1, R_X86_64_PLT32, addend -4
    image.sections[".text"] = Section(".text", 0, "SHT_PROGBITS", 6, 0, 0, 0, b"\xe8\0\0\0\0\xc3", 1)
    image.sections[".rela.text"] = Section(".rela.text", 0, "SHT_RELA", 0x40, 1, 2, 24, rela, 3)
    image.sections[".symtab"] = Section(".symtab", 0, "SHT_SYMTAB", 0, 1, 4, 24, symtab, 2)
    image.sections[".strtab"] = Section(".strtab", 0, "SHT_STRTAB", 0, 0, 0, 0, strtab, 4)
    return image


def test_module_relocations_use_kallsyms_values_and_refuse_functions_outside_code() -> None:
    from nephoscope.core.errors import GuestDataError
    from nephoscope.introspect.kernelcode import _link_module

    text_at, printk = 0xFFFF_FFFF_C000_0000, 0xFFFF_FFFF_8110_0000
    linked, _own, _ranged = _link_module(_tiny_ko(), {".text": text_at}, {"printk": printk})
    assert linked[".text"] == b"\xe8" + struct.pack("<i", printk - (text_at + 5)) + b"\xc3"

    def outside(name: str, gva: int) -> None:
        raise GuestDataError(f"{name} at 0x{gva:x} is outside every kernel and module text")

    with pytest.raises(GuestDataError, match="printk"):
        _link_module(_tiny_ko(), {".text": text_at}, {"printk": printk}, outside)
    with pytest.raises(GuestDataError, match="no kallsyms table"):
        _link_module(_tiny_ko(), {".text": text_at}, {})


def _bss_ko() -> KernelImageFile:
    """A module whose .text loads the address of a symbol in its empty .bss (R_X86_64_32S, like evdev's
    evdev_connect+0x67), and one per-cpu variable (R_X86_64_32S against .data..percpu: %gs-relative)."""
    image = KernelImageFile("module", "tiny", "6.1.0-57-amd64/kernel/tiny.ko", "00" * 32)
    strtab = b"\0counter\0pcpu_var\0"
    symtab = (bytes(24) + struct.pack("<IBBHQQ", 1, 0x01, 0, 5, 0, 0)  # LOCAL OBJECT counter in .bss (index 5)
              + struct.pack("<IBBHQQ", 9, 0x01, 0, 6, 8, 8))  # LOCAL OBJECT pcpu_var in .data..percpu at 8
    # 48 c7 c7 imm32: mov $counter, %rdi (32S); 65 48 8b 04 25 imm32: mov %gs:pcpu_var, %rax (32S); ret
    text = b"\x48\xc7\xc7\0\0\0\0" + b"\x65\x48\x8b\x04\x25\0\0\0\0" + b"\xc3"
    rela = struct.pack("<QQq", 3, (1 << 32) | 11, 0) + struct.pack("<QQq", 12, (2 << 32) | 11, 0)
    image.sections[".text"] = Section(".text", 0, "SHT_PROGBITS", 6, 0, 0, 0, text, 1)
    image.sections[".rela.text"] = Section(".rela.text", 0, "SHT_RELA", 0x40, 1, 2, 24, rela, 3)
    image.sections[".symtab"] = Section(".symtab", 0, "SHT_SYMTAB", 0, 1, 4, 24, symtab, 2)
    image.sections[".strtab"] = Section(".strtab", 0, "SHT_STRTAB", 0, 0, 0, 0, strtab, 4)
    image.sections[".bss"] = Section(".bss", 0, "SHT_NOBITS", 3, 0, 0, 0, b"", 5)  # WA, size 0
    image.sections[".data..percpu"] = Section(".data..percpu", 0, "SHT_PROGBITS", 3, 0, 0, 0, bytes(16), 6)
    return image


def test_a_relocation_against_a_section_without_a_load_address_is_range_checked_into_its_kind() -> None:
    from nephoscope.introspect.kernelcode import _Checker, _link_module, section_kind

    text_at, percpu = 0xFFFF_FFFF_C000_0000, 0x3_5000
    data = (0xFFFF_FFFF_C000_3000, 0xFFFF_FFFF_C000_3400)  # the module's writable allocation [gva, end]
    image = _bss_ko()
    assert [section_kind(image.sections[n]) for n in (".text", ".bss", ".symtab")] == ["text", "data", None]
    linked, _own, ranged = _link_module(image, {".text": text_at}, {}, regions={"data": data},
                                        placed={".data..percpu": percpu})
    # the per-cpu variable: exact (module.percpu + value), the .bss address: one bounded site, not a byte value
    assert linked[".text"][12:16] == struct.pack("<i", percpu + 8)
    assert [(s.start, s.length, s.kind) for s in ranged] == [(text_at + 3, 4, "reloc_range")]
    checker = _Checker(ranged, ANY)
    expected = linked[".text"]

    def bad(bss: int) -> list[int]:
        got = bytearray(expected)
        got[3:7] = struct.pack("<i", bss - 2**64)  # sign-extended imm32 of a module address
        diff = np.flatnonzero(np.frombuffer(expected, np.uint8) != np.frombuffer(bytes(got), np.uint8))
        return checker.check(text_at, expected, got, diff, {}).tolist()

    assert bad(data[0] + 0x200) == [] and bad(data[1]) == []  # inside the module's data (an empty .bss at its end)
    assert bad(data[1] + 1) and bad(0xFFFF_FFFF_8100_0000) and bad(text_at)  # kernel data or the module's text
    # without the module's memory layout the old behaviour stays: no site, the bytes must match exactly
    assert _link_module(image, {".text": text_at}, {}, placed={".data..percpu": percpu})[2] == []
