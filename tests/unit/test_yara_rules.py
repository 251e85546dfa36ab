"""The shipped YARA rules and known-bad hashes: hits exactly on the lab's tampering, nowhere else."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from nephoscope.analysis.malware import Region, regions_from, scan_regions
from nephoscope.core.errors import KnowledgeError
from nephoscope.core.paths import cache_root
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.knowledge.debian import archive
from nephoscope.knowledge.yara_rules import RuleSet, load_hashes, page_digest, scan_physical
from nephoscope.lab.build import HELPERS_DIR
from nephoscope.lab.trojan import find_patch_offset, patch_text_padding
from nephoscope.memory.physical import BufferMemory


def inject_payload() -> bytes:
    """Return the payload bytes as inject.c declares them (parsed from the C source)."""
    src = (HELPERS_DIR / "inject.c").read_text()
    body = re.search(r"payload\[\] = \{(.*?)\};", src, re.S).group(1)  # type: ignore[union-attr]
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    out = bytearray()
    for tok in (t.strip() for t in body.split(",")):
        if tok:
            out.append(ord(tok[1]) if tok.startswith("'") else int(tok, 0))
    return bytes(out)


def injected_page() -> bytes:
    """Return the victim's page after the payload ran once (it increments the qword after its marker)."""
    payload = inject_payload()
    page = bytearray(4096)
    page[: len(payload)] = payload
    page[0x10 + 0x18] += 1  # lea rsi,[rip+9] points at offset 0x10; inc qword [rsi+0x18]
    return bytes(page)


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return RuleSet()


def test_injected_payload_hits_code_and_marker(rules: RuleSet) -> None:
    hits = {(h.rule, h.offset) for h in rules.scan(injected_page())}
    assert hits == {("nephoscope_injected_stub", 0), ("nephoscope_injected_marker", 0x10)}
    assert page_digest(injected_page()) in load_hashes()


def test_code_shape_without_the_marker(rules: RuleSet) -> None:
    page = injected_page().replace(b"NEPHOSCOPE-INJECTED-CODE", b"x" * 24)
    assert [(h.rule, h.offset) for h in rules.scan(b"\x90" * 100 + page)] == [("nephoscope_injected_stub", 100)]


def _deb_root(name: str) -> Path:
    version = archive.available_versions(name)[-1]
    return archive.unpack(archive.download(name, version, cache_root() / "debs"), cache_root() / "unpacked") / "root"


def test_trojaned_bash_hits_exactly_at_the_patch(rules: RuleSet) -> None:
    bash = (_deb_root("bash") / "bin" / "bash").read_bytes()
    offset, _ = find_patch_offset(bash)
    assert rules.scan(bash) == []
    hits = rules.scan(patch_text_padding(bash))
    assert [(h.rule, h.offset) for h in hits] == [("nephoscope_trojan_padding", offset - 1)]


def test_no_hits_in_clean_packages(rules: RuleSet) -> None:
    scanned = 0
    for name in ("nginx", "libssl3", "bash", "busybox-static", "python3.11-minimal", "libc6", "dropbear-bin"):
        for path in _deb_root(name).rglob("*"):
            if path.is_file() and not path.is_symlink() and path.read_bytes()[:4] == b"\x7fELF":
                assert rules.scan(path.read_bytes()) == [], path
                scanned += 1
    assert scanned > 10


@pytest.mark.parametrize("text", ["rule broken { condition: $a }", "rule x { strings: $a = { 4G } condition: $a }",
                                  "not yara at all"])
def test_malformed_rules(tmp_path: Path, text: str) -> None:
    (tmp_path / "bad.yar").write_text(text)
    with pytest.raises(KnowledgeError, match="malformed YARA rule"):
        RuleSet([tmp_path / "bad.yar"])


def test_missing_rules_and_bad_hashes(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeError, match="no YARA rule files"):
        RuleSet([tmp_path / "nothing"])
    (tmp_path / "h.txt").write_text("abcd  too short\n")
    with pytest.raises(KnowledgeError, match="not a SHA-256"):
        load_hashes([tmp_path / "h.txt"])


def _one_page_space(page: bytes, gva_page: int = 5) -> BufferMemory:
    """Return RAM with a 4-level table at gpa 0x1000 mapping gva `gva_page`*4 KiB to `page` at gpa 0x5000."""
    ram = bytearray(0x6000)
    for table, nxt in ((0x1000, 0x2000), (0x2000, 0x3000), (0x3000, 0x4000)):
        struct.pack_into("<Q", ram, table, nxt | 0x7)
    struct.pack_into("<Q", ram, 0x4000 + 8 * gva_page, 0x5000 | 0x7)
    ram[0x5000:0x6000] = page
    return BufferMemory(ram)


def _stored(records: list[dict]) -> list[Observation]:
    """Return stored-shape records as the store gives them back: typed observations."""
    return [Observation(r["kind"], "k", r["data"], Provenance(r["method"], "vm"), Verdict.VERIFIED) for r in records]


def test_scan_regions_reads_through_page_tables(rules: RuleSet) -> None:
    phys = _one_page_space(injected_page())
    obs = [{"kind": "process", "method": "inspect", "data": {"pid": 42, "cr3": 0x1000}},
           {"kind": "unknown-code", "method": "arch", "data": {"cr3": 0x1000, "gva_start": 0x5000, "gva_end": 0x7000}}]
    regions = regions_from(_stored(obs))
    assert regions == [Region(0x1000, 0x5000, 0x7000, (42,), "arch")]
    scan = scan_regions(phys, regions, rules, load_hashes(), "vm")
    got = sorted((f.evidence[0].get("rule") or "hash", f.evidence[0]["gva"]) for f in scan.findings)
    assert got == [("hash", 0x5000), ("nephoscope_injected_marker", 0x5010), ("nephoscope_injected_stub", 0x5000)]
    assert all(f.evidence[0]["pids"] == [42] for f in scan.findings)
    assert len(scan.unreadable) == 1  # the region's second page is not mapped: said, not silently skipped


def test_scan_physical_finds_across_chunk_seams(rules: RuleSet) -> None:
    ram = bytearray(3 * 4096)
    ram[4096 - 5: 4096 - 5 + 48] = inject_payload()  # straddles the first chunk boundary
    hits = scan_physical(rules, BufferMemory(ram).iter_segments(), chunk=4096)
    assert [(gpa, h.rule) for gpa, h in hits] == [(4091, "nephoscope_injected_stub"),
                                                  (4107, "nephoscope_injected_marker")]


def test_modified_pages_become_regions() -> None:
    obs = [{"kind": "modified-binary", "method": "arch",
            "data": {"cr3": 0x1000, "modified_pages": [{"gva": 0x5000, "gpa": 0x9000}, {"bogus": 1}]}}]
    assert regions_from(_stored(obs)) == [Region(0x1000, 0x5000, 0x6000, (), "arch")]
