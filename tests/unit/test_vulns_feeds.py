"""Feed parsers (changelog, Debian Security Tracker, OSV) and the all-or-nothing import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nephoscope.core.errors import KnowledgeError
from nephoscope.knowledge.feeds import (
    load_debian_tracker,
    load_osv,
    parse_changelog,
    parse_debian_tracker,
    parse_osv,
    source_of,
)
from nephoscope.knowledge.vulns import VulnDB, VulnRecord

CHANGELOG = """\
nginx (1.22.1-9+deb12u11) bookworm-security; urgency=high

  * Fix CVE-2026-123633 and CVE-2026-15176.
  * Additional mitigation for CVE-2023-44487.

 -- A Maintainer <a@example.org>  Thu, 19 Nov 2026 22:02:23 +0100

nginx (1.22.1-9+deb12u10) bookworm-security; urgency=medium

  * d/p/CVE-2026-56434.patch (CVE-2026-56434)

 -- A Maintainer <a@example.org>  Sat, 18 Jul 2026 16:18:45 +0000

nginx (1.22.1-9+deb12u1) bookworm-security; urgency=medium

  * CVE-2023-44487: HTTP/2 rapid reset.

 -- A Maintainer <a@example.org>  Sat, 18 Nov 2023 16:18:45 +0000
"""

TRACKER = {
    "openssl": {
        "CVE-2026-0001": {"releases": {"bookworm": {"status": "resolved", "fixed_version": "3.0.20-1~deb12u1",
                                                    "urgency": "high"},
                                       "trixie": {"status": "resolved", "fixed_version": "3.5.1-1"}}},
        "CVE-2026-0002": {"releases": {"bookworm": {"status": "open", "urgency": "low"}}},
        "CVE-2026-0003": {"releases": {"bookworm": {"status": "resolved", "fixed_version": "0"}}},
        "CVE-2026-0004": {"releases": {"bookworm": {"status": "undetermined"}}},
    },
}

OSV = {
    "id": "DSA-9999-1", "aliases": ["CVE-2026-7777"], "upstream": ["CVE-2026-7778"],
    "affected": [
        {"package": {"ecosystem": "Debian:12", "name": "nginx"},
         "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "1.22.1-9+deb12u10"}]}]},
        {"package": {"ecosystem": "PyPI", "name": "nginx"}, "ranges": []},
    ],
}


def test_changelog_records() -> None:
    recs = parse_changelog(CHANGELOG)
    by = {(r.cve, r.fixed) for r in recs}
    assert ("CVE-2026-123633", "1.22.1-9+deb12u11") in by  # six-digit CVE numbers
    assert ("CVE-2023-44487", "1.22.1-9+deb12u11") in by and ("CVE-2023-44487", "1.22.1-9+deb12u1") in by
    assert {r.source for r in recs} == {"nginx"}
    assert next(r for r in recs if r.cve == "CVE-2026-56434").urgency == "medium"


def test_source_of_control() -> None:
    assert source_of("Package: libssl3\nSource: openssl\nVersion: 3.0.17-1~deb12u2\n") == ("libssl3", "openssl")
    assert source_of("Package: bash\nVersion: 5.2.15-2+b13\n") == ("bash", "bash")
    assert source_of("Package: libgcc-s1\nSource: gcc-12 (12.2.0-14)\n") == ("libgcc-s1", "gcc-12")


def test_tracker() -> None:
    recs = parse_debian_tracker(TRACKER)
    book = {r.cve: r for r in recs if r.release == "bookworm"}
    assert book["CVE-2026-0001"].fixed == "3.0.20-1~deb12u1" and book["CVE-2026-0001"].urgency == "high"
    assert book["CVE-2026-0002"].fixed is None  # open: every version affected
    assert "CVE-2026-0003" not in book and "CVE-2026-0004" not in book
    assert any(r.release == "trixie" for r in recs)


def test_osv(tmp_path: Path) -> None:
    recs = parse_osv(OSV)
    assert {(r.source, r.cve, r.fixed, r.release) for r in recs} == {
        ("nginx", "CVE-2026-7777", "1.22.1-9+deb12u10", "bookworm"),
        ("nginx", "CVE-2026-7778", "1.22.1-9+deb12u10", "bookworm")}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.json").write_text(json.dumps([OSV]))
    assert len(load_osv(tmp_path)) == 2


def _bad_feeds() -> list[tuple[str, object]]:
    return [
        ("tracker", {"openssl": ["not", "a", "dict"]}),
        ("tracker", {"openssl": {"CVE-1": {"releases": {"bookworm": {"status": "resolved",
                                                                     "fixed_version": "bad version"}}}}}),
        ("tracker", {"openssl": {"CVE-1": {"releases": {"bookworm": {"fixed_version": "1.0"}}}}}),
        ("osv", {"affected": []}),  # no id
        ("osv", {"id": "X", "affected": [{"package": {"ecosystem": "Debian:12", "name": "a"},
                                           "ranges": [{"type": "ECOSYSTEM", "events": "nope"}]}]}),
    ]


@pytest.mark.parametrize(("kind", "feed"), _bad_feeds())
def test_malformed_feed_imports_nothing(tmp_path: Path, kind: str, feed: object) -> None:
    db = VulnDB.open(tmp_path / "v.sqlite")
    db.replace("debian-tracker", [VulnRecord("openssl", "CVE-2026-0001", "3.0.20-1~deb12u1")])
    path = tmp_path / "feed.json"
    path.write_text(json.dumps(feed))
    with pytest.raises(KnowledgeError, match="malformed feed"):
        (load_debian_tracker if kind == "tracker" else load_osv)(path)
    assert [r.cve for r in db.records()] == ["CVE-2026-0001"]


def test_invalid_json_and_bad_version_in_batch(tmp_path: Path) -> None:
    path = tmp_path / "feed.json"
    path.write_text("{not json")
    with pytest.raises(KnowledgeError, match="cannot read"):
        load_debian_tracker(path)
    db = VulnDB.open(tmp_path / "v.sqlite")
    good = VulnRecord("a", "CVE-2026-1", "1.0")
    with pytest.raises(KnowledgeError):
        db.replace("osv", [good, VulnRecord("a", "CVE-2026-2", "not a version")])
    assert db.records() == []  # validated before anything is written


def test_replace_scopes_by_origin_and_source(tmp_path: Path) -> None:
    db = VulnDB.open(tmp_path / "v.sqlite")
    db.replace("changelog", [VulnRecord("a", "CVE-2026-1", "1.0"), VulnRecord("b", "CVE-2026-2", "1.0")])
    db.replace("osv", [VulnRecord("a", "CVE-2026-3", "2.0")])
    db.replace("changelog", [VulnRecord("a", "CVE-2026-4", "1.1")], {"liba1": "a"})
    assert sorted(r.cve for r in db.records()) == ["CVE-2026-2", "CVE-2026-3", "CVE-2026-4"]
    assert db.binaries() == {"liba1": "a"}
    s = db.stats()
    assert (s.records, s.sources, s.by_origin) == (3, 2, {"changelog": 2, "osv": 1})
