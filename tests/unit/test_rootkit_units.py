"""The rootkit profile, the kernel-module build cache key and the pointer classification, without a VM."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from nephoscope.core.errors import ProfileError
from nephoscope.introspect.kernelhooks import CORE, ELSEWHERE, CodeMap, _jump_target
from nephoscope.lab.kmodules import ROOTKIT_DIR, sources_hash
from nephoscope.lab.profile import load_profile
from nephoscope.os.linux.crossviews import ModuleText

CORE_TEXT = (0xFFFFFFFF81000000, 0xFFFFFFFF82000000)
E1000 = ModuleText("e1000", 0xFFFFFFFFC0010000, 0xFFFFFFFFC0000000, 0xFFFFFFFFC0008000,
                   (0xFFFFFFFFC0000000, 0xFFFFFFFFC0020000))


def test_rootkit_profile_extends_clean_with_a_kernel_module_and_its_techniques() -> None:
    rootkit, clean = load_profile("rootkit"), load_profile("clean")
    assert {s.tag for s in clean.services} < {s.tag for s in rootkit.services}
    assert [(a.kind, a.source) for a in rootkit.artifacts] == [("kmodule", "nphrk")]
    assert {s.technique for s in rootkit.services if s.technique} == {"dkom-hidden-task", "ftrace-hidden-process"}
    assert {t["id"] for t in rootkit.kernel_techniques} == {"hidden-module", "syscall-hook", "inline-patch"}
    loader = next(s for s in rootkit.services if s.tag == "rk-fhide")
    assert "insmod /opt/lab/nphrk.ko" in loader.after and "NPH-KLOG" in loader.after


def test_kernel_techniques_need_an_id(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[kernel_techniques]]\nexpect = "no id"\n')
    with pytest.raises(ProfileError, match="kernel_techniques"):
        load_profile(str(bad))


def test_module_sources_hash_follows_the_sources(tmp_path: Path) -> None:
    for f in ROOTKIT_DIR.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    same = sources_hash(tmp_path)
    assert same == sources_hash(ROOTKIT_DIR)
    (tmp_path / "nphrk.c").write_bytes((tmp_path / "nphrk.c").read_bytes() + b"\n")
    assert sources_hash(tmp_path) != same


def test_classify_core_module_and_elsewhere() -> None:
    cmap = CodeMap(CORE_TEXT, (E1000,))
    assert cmap.classify(0xFFFFFFFF81234567) == CORE
    assert cmap.classify(0xFFFFFFFFC0001000) == "module:e1000"
    assert cmap.classify(0xFFFFFFFFC0009000) == ELSEWHERE  # e1000's data, not its text
    assert cmap.classify(0xFFFFFFFFC0400000) == ELSEWHERE
    assert cmap.classify(CORE_TEXT[1]) == ELSEWHERE


def test_jump_patterns_of_inline_hooks() -> None:
    at = 0xFFFFFFFF81000000
    target = 0xFFFFFFFFC0404020
    assert _jump_target(None, at, b"\xe9" + struct.pack("<i", target - (at + 5)) + bytes(11)) == target  # type: ignore[arg-type]
    assert _jump_target(None, at, b"\x48\xb8" + struct.pack("<Q", target) + b"\xff\xe0" + bytes(4)) == target  # type: ignore[arg-type]
    assert _jump_target(None, at, b"\x68" + struct.pack("<i", -0x3FBFBFE0) + b"\xc3" + bytes(10)) == \
        (-0x3FBFBFE0) % 2**64  # type: ignore[arg-type]
    assert _jump_target(None, at, b"\x0f\x1f\x44\x00\x00" + bytes(11)) is None  # type: ignore[arg-type]
