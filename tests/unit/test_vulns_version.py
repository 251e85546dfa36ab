"""Debian version order: edge cases, python-debian and dpkg itself as oracles."""

from __future__ import annotations

import itertools
import random
import shutil
import subprocess

import pytest
from debian.debian_support import Version

from nephoscope.core.errors import KnowledgeError
from nephoscope.knowledge.vulns import VulnRecord, compare_versions, version_key

ORDERED = [  # each strictly before the next
    "1.0~rc1", "1.0", "1.0-1~bpo1", "1.0-1", "1.0-1+b1", "1.0-1+deb12u1", "1.0-1+deb12u1+b1", "1.0-1+deb12u2",
    "1.0-1+deb12u9", "1.0-1+deb12u10", "1.0-1+deb12u11", "1.0-2~deb12u1", "1.0-2", "1.0a", "1.0.1", "1:0.1",
]


def test_ordered_chain() -> None:
    for a, b in itertools.pairwise(ORDERED):
        assert compare_versions(a, b) == -1, (a, b)
        assert compare_versions(b, a) == 1, (b, a)


@pytest.mark.parametrize(("a", "b", "want"), [
    ("1.22.1-9+deb12u10", "1.22.1-9+deb12u9", 1),  # numeric, not string, order
    ("3.0.17-1~deb12u2", "3.0.17-1", -1),  # tilde before everything
    ("1:1.2.13.dfsg-1", "2.0", 1),  # epoch wins
    ("0:1.0", "1.0", 0),  # epoch 0 is the default
    ("1.0", "1.0-0", 0),  # missing revision equals "0"
    ("5.2.15-2+b13", "5.2.15-2+b2", 1),  # binNMU numbers compare numerically
    ("5.2.15-2+b1", "5.2.15-2", 1),  # a binNMU is newer than its source version
    ("1.0-1", "1.0-1.1", -1),
    ("1.00", "1.0", 0),
])
def test_pairs(a: str, b: str, want: int) -> None:
    assert compare_versions(a, b) == want


def test_agrees_with_python_debian() -> None:
    rnd = random.Random(7)
    chars = "0123456789.~+ab"
    for _ in range(3000):
        a, b = ("".join(rnd.choice(chars) for _ in range(rnd.randint(1, 6))) for _ in range(2))
        a, b = "1" + a + ("-" + b if rnd.random() < 0.5 else ""), "1" + b
        want = (Version(a) > Version(b)) - (Version(a) < Version(b))
        assert compare_versions(a, b) == want, (a, b)


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg as the oracle")
def test_agrees_with_dpkg() -> None:
    for a, b in itertools.pairwise(ORDERED):
        assert subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False).returncode == 0, (a, b)


@pytest.mark.parametrize("bad", ["", "1.0 beta", "x:1.0", "1:"])
def test_rejects_malformed(bad: str) -> None:
    with pytest.raises(KnowledgeError):
        version_key(bad)


def test_record_range() -> None:
    r = VulnRecord("nginx", "CVE-2026-1", "1.22.1-9+deb12u10", introduced="1.22.1-9+deb12u2")
    assert r.affects("1.22.1-9+deb12u9")
    assert not r.affects("1.22.1-9+deb12u10")
    assert not r.affects("1.22.1-9+deb12u1")
    assert VulnRecord("x", "CVE-2026-2", None).affects("99")
