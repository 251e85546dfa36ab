"""The Debian build lookup shared by the PHP and CPython readers, without the network: KB first, failures bounded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nephoscope.core.errors import KnowledgeError
from nephoscope.introspect.interp import builds, pyoffsets
from nephoscope.knowledge.binaries import CodePageDB, PackageMeta, files_with_build_id
from nephoscope.knowledge.debian import archive
from nephoscope.knowledge.elfpages import ElfPages

BINARY = "/usr/bin/python3.11"


@pytest.fixture()
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """A private cache and KB, apt offering two versions, downloads recorded (and failing for dbg packages)."""
    monkeypatch.setenv("NEPHOSCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("NEPHOSCOPE_KB", str(tmp_path / "kb.sqlite"))
    monkeypatch.setattr(pyoffsets, "load_table", lambda: {})
    monkeypatch.setattr(archive, "available_versions", lambda name: ("9.9-1", "9.8-1"))
    fetched: list[tuple[str, str]] = []

    def download(name: str, version: str, cache: Path) -> Path:
        fetched.append((name, version))
        if name.endswith("-dbg"):
            raise KnowledgeError(f"apt-get download {name}={version} failed: Temporary failure resolving "
                                 "'deb.debian.org'")
        return cache / f"{name}_{version}.deb"

    monkeypatch.setattr(archive, "download", download)
    monkeypatch.setattr(archive, "unpack", lambda deb, cache: cache / deb.stem)
    # the unpacked binary is <cache>/unpacked/NAME_VERSION/root/usr/bin/python3.11: its build id is "b" VERSION
    monkeypatch.setattr(builds, "elf_build_id", lambda path: "b" + path.parts[-5].split("_")[1])
    return fetched


def test_no_version_with_that_build_id_is_named_with_what_was_tried_once_per_run(offline) -> None:  # type: ignore[no-untyped-def]
    entry, why = pyoffsets.find_offsets("ff" * 20, BINARY)
    assert entry is None
    assert "ff" * 20 in why and "9.9-1: build b9.9-1" in why and "9.8-1: build b9.8-1" in why
    assert offline == [("python3.11-minimal", "9.9-1"), ("python3.11-minimal", "9.8-1")]
    assert pyoffsets.find_offsets("ff" * 20, BINARY) == (None, why) and len(offline) == 2


def test_a_network_failure_is_a_reason_not_a_crash(offline, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    def down(name: str, version: str, cache: Path) -> Path:
        offline.append((name, version))
        raise KnowledgeError("apt-get download failed: Temporary failure resolving 'deb.debian.org'")

    monkeypatch.setattr(archive, "download", down)
    entry, why = pyoffsets.find_offsets("ee" * 20, BINARY)
    assert entry is None and why.count("Temporary failure resolving") == 2
    # the build is found, but its dbg package cannot be fetched
    monkeypatch.setattr(archive, "download", lambda name, version, cache: (_ for _ in ()).throw(
        KnowledgeError("Temporary failure resolving")) if name.endswith("-dbg") else cache / f"{name}_{version}.deb")
    entry, why = pyoffsets.find_offsets("b9.8-1", BINARY)
    assert entry is None and "python3.11-minimal 9.8-1" in why and "Temporary failure resolving" in why


def test_the_kbs_record_of_the_file_names_the_version_first(offline, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db = CodePageDB.open(tmp_path / "kb.sqlite")
    pid = db.package_id(PackageMeta("python3.11-minimal", "9.8-1", "amd64"))
    db.add_file(pid, BINARY, ElfPages(b"\1" * 32, 10, "ET_EXEC", "EM_X86_64", "b9.8-1", (), ()))
    db.commit()
    db.close()
    assert files_with_build_id("b9.8-1") == [(BINARY, "python3.11-minimal", "9.8-1")]
    search = builds.find_debian_version("b9.8-1", "python3.11-minimal", BINARY)
    assert search.version == "9.8-1" and search.from_kb and offline == [("python3.11-minimal", "9.8-1")]
    # the KB is a hint: the downloaded binary has the last word (a KB record naming the wrong version)
    db = CodePageDB.open(tmp_path / "kb.sqlite")
    db.add_file(pid, BINARY, ElfPages(b"\2" * 32, 10, "ET_EXEC", "EM_X86_64", "b9.9-1", (), ()))
    db.commit()
    db.close()
    search = builds.find_debian_version("b9.9-1", "python3.11-minimal", BINARY)
    assert search.version == "9.9-1" and not search.from_kb
    assert search.tried == ["9.8-1: build b9.8-1 (named by the KB)", "9.9-1: build b9.9-1"]


def test_a_binary_that_is_no_debian_cpython_is_not_looked_up(offline) -> None:  # type: ignore[no-untyped-def]
    entry, why = pyoffsets.find_offsets("aa" * 20, "/opt/python/bin/python3.11")
    assert entry is None and "no Debian CPython binary" in why and offline == []


def test_cache_entries_that_do_not_validate_are_dropped(tmp_path: Path) -> None:
    good = {"package": "p", "version": "1", "python": "3.11",
            "offsets": {k: 8 for k in pyoffsets.offset_keys()}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"a" * 40: good, "b" * 40: {**good, "python": "3.12"}, "c" * 40: "junk",
                                "d" * 40: {**good, "offsets": {**good["offsets"], "_is.next": -1}}}))
    cache = builds.BuildCache("c.json", pyoffsets.valid_entry, path)
    assert list(cache.entries) == ["a" * 40] and cache.dropped == 3
    assert cache.versions("p") == {"1": "a" * 40}
    cache.put("e" * 40, {**good, "version": "2"})
    cache.save()
    assert sorted(json.loads(path.read_text())) == ["a" * 40, "e" * 40]
