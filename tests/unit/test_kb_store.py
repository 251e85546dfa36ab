"""The code-page DB: storing, idempotence, vectorised lookups verified against full digests, ingest."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nephoscope.cli.main import app
from nephoscope.core.errors import GuestDataError, KnowledgeError
from nephoscope.knowledge.binaries import CodePageDB, PackageMeta
from nephoscope.knowledge.elfpages import ElfPages, PageInfo, exec_pages
from nephoscope.knowledge.ingest import ingest_deb, ingest_path, ingest_unpacked


def _digest(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "little")).digest()


def _fake(pages: list[tuple[int, int, bytes]], tag: bytes = b"x") -> ElfPages:
    return ElfPages(hashlib.sha256(tag).digest(), 1234, "ET_DYN", "EM_X86_64", "ab" * 20, (),
                    tuple(PageInfo(o, v, d) for o, v, d in pages))


@pytest.fixture
def db(tmp_path: Path) -> CodePageDB:
    return CodePageDB.open(tmp_path / "kb.sqlite")


def test_lookup_finds_every_occurrence_and_nothing_else(db: CodePageDB) -> None:
    pkg = db.package_id(PackageMeta("libfoo1", "1.0-1", "amd64", "foo", "1.0-1"))
    db.add_file(pkg, "/usr/lib/libfoo.so.1", _fake([(0x1000, 0x1000, _digest(1)), (0x2000, 0x2000, _digest(2))]))
    other = db.package_id(PackageMeta("libfoo1", "1.0-2", "amd64", "foo", "1.0-2"))
    db.add_file(other, "/usr/lib/libfoo.so.1", _fake([(0x3000, 0x5000, _digest(1))], b"y"))
    db.commit()
    hits = db.lookup_digests([_digest(1), _digest(2), _digest(3)])
    assert sorted((h.version, h.file_offset, h.vaddr) for h in hits[0]) == [("1.0-1", 0x1000, 0x1000),
                                                                            ("1.0-2", 0x3000, 0x5000)]
    assert [(h.package, h.source_package, h.path, h.build_id) for h in hits[1]] == [
        ("libfoo1", "foo", "/usr/lib/libfoo.so.1", "ab" * 20)]
    assert hits[2] == []
    assert db.lookup(_digest(2)) == hits[1]


def test_key_collision_is_rejected_by_full_digest(db: CodePageDB) -> None:
    real = _digest(7)
    twin = real[:8] + bytes(24)  # same 64-bit key, different digest
    db.add_file(db.package_id(PackageMeta("p", "1")), "/bin/p", _fake([(0, 0, real)]))
    db.commit()
    assert db.lookup(twin) == []
    assert len(db.lookup(real)) == 1


def test_wrong_digest_length_raises(db: CodePageDB) -> None:
    with pytest.raises(KnowledgeError, match="32 bytes"):
        db.lookup_digests([_digest(1), b"short"])


def test_index_rebuilds_after_changes_and_add_is_idempotent(db: CodePageDB) -> None:
    pkg = db.package_id(PackageMeta("p", "1"))
    assert db.add_file(pkg, "/bin/p", _fake([(0, 0, _digest(1))])) == 1
    db.commit()
    assert db.lookup(_digest(2)) == []
    assert db.add_file(pkg, "/bin/p", _fake([(0, 0, _digest(1))])) == 0  # same package+path+sha256
    assert db.add_file(pkg, "/bin/q", _fake([(0, 0, _digest(2))])) == 1
    db.commit()
    assert len(db.lookup(_digest(2))) == 1
    again = CodePageDB.open(db.path)
    assert again.stats().files == 2 and again.stats().pages == 2 and again.stats().packages == 1
    assert [p.digest for p in again.file_pages(again.lookup(_digest(2))[0].file_id)] == [_digest(2)]


def test_high_vaddrs_round_trip(db: CodePageDB) -> None:
    vaddr = 0xFFFF_FFFF_FF60_0000
    db.add_file(db.package_id(PackageMeta("k", "1")), "[vsyscall]", _fake([(0, vaddr, _digest(9))]))
    db.commit()
    assert db.lookup(_digest(9))[0].vaddr == vaddr
    assert db.file_pages(db.lookup(_digest(9))[0].file_id)[0].vaddr == vaddr


def _tiny_elf(tmp_path: Path, name: str, flags: tuple[str, ...] = ("-pie", "-fPIE")) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    src = tmp_path / f"{name}.c"
    src.write_text(f'int main(void) {{ return {len(name)}; }}\nconst char *id = "{name}";\n')
    out = tmp_path / name
    subprocess.run(["gcc", *flags, "-o", str(out), str(src)], check=True)
    return out


def test_ingest_tree_records_good_files_and_errors_for_bad_ones(db: CodePageDB, tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    good = _tiny_elf(tmp_path, "good")
    shutil.copy(good, root / "usr/bin/good")
    shutil.copy(_tiny_elf(tmp_path, "static", ("-no-pie", "-fno-pie")), root / "usr/bin/nopie")
    data = good.read_bytes()
    seg = exec_pages(data).segments[0]
    (root / "usr/bin/truncated").write_bytes(data[:seg.file_offset + 8])
    (root / "usr/bin/script").write_text("#!/bin/sh\necho hi\n")
    (root / "usr/bin/link").symlink_to("good")
    report = ingest_path(db, root)
    assert report.files_added == 2
    assert [e[0] for e in report.errors] == ["/usr/bin/truncated"]
    hits = db.lookup(exec_pages(data).pages[0].digest)
    assert {h.path for h in hits} >= {"/usr/bin/good"} and hits[0].package == "(local)"
    assert ingest_path(db, root).files_added == 0


def test_single_file_and_non_elf(db: CodePageDB, tmp_path: Path) -> None:
    elf = _tiny_elf(tmp_path, "single")
    assert ingest_path(db, elf).files_added == 1
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an elf at all")
    report = ingest_path(db, junk)
    assert report.files_added == 0 and "not an ELF" in report.errors[0][1]


def test_fake_deb_is_an_error_not_a_crash(db: CodePageDB, tmp_path: Path) -> None:
    fake = tmp_path / "evil_1.0_amd64.deb"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a deb")
    with pytest.raises(GuestDataError, match="not a Debian package"):
        ingest_deb(db, fake)
    report = ingest_path(db, fake)
    assert report.files_added == 0 and report.errors


def test_unpacked_deb_takes_names_from_control(db: CodePageDB, tmp_path: Path) -> None:
    unpacked = tmp_path / "hello_2.1-3_amd64"
    (unpacked / "root/usr/bin").mkdir(parents=True)
    (unpacked / "control").mkdir()
    (unpacked / "control/control").write_text(
        "Package: hello\nVersion: 2.1-3\nArchitecture: amd64\nSource: hello-src (2.1-2)\n")
    shutil.copy(_tiny_elf(tmp_path, "hello"), unpacked / "root/usr/bin/hello")
    report = ingest_unpacked(db, unpacked, "test")
    assert report.files_added == 1
    hit = db.lookup(db.file_pages(db.find_files("/usr/bin/hello")[0][0])[0].digest)[0]
    assert (hit.package, hit.version, hit.arch, hit.source_package) == ("hello", "2.1-3", "amd64", "hello-src")


def test_cli_add_stats_which_json(tmp_path: Path) -> None:
    kb = str(tmp_path / "cli.sqlite")
    elf = _tiny_elf(tmp_path, "clitool")
    runner = CliRunner()
    added = runner.invoke(app, ["kb", "add", str(elf), "--kb", kb, "--json"])
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["files_added"] == 1
    stats = json.loads(runner.invoke(app, ["kb", "stats", "--kb", kb, "--json"]).stdout)
    assert stats["files"] == 1 and stats["pages"] == len(exec_pages(elf.read_bytes()).pages)
    which = json.loads(runner.invoke(app, ["kb", "which", str(elf), "--kb", kb, "--json"]).stdout)
    assert which["pages"] == which["pages_found"] == stats["pages"]
    digest = exec_pages(elf.read_bytes()).pages[0].digest.hex()
    one = json.loads(runner.invoke(app, ["kb", "which", digest, "--kb", kb, "--json"]).stdout)
    assert one["hits"][0]["path"] == str(elf.resolve())
    bad = runner.invoke(app, ["kb", "which", "zz", "--kb", kb])
    assert bad.exit_code == 1


def test_stored_key_collisions_are_told_apart(db: CodePageDB) -> None:
    a = _digest(11)
    b, c = a[:8] + bytes(24), a[:8] + b"\xff" * 24  # same 64-bit key as `a`, different digests
    pkg = db.package_id(PackageMeta("p", "1"))
    db.add_file(pkg, "/bin/1", _fake([(0, 0, a), (0x1000, 0x1000, b), (0x2000, 0x2000, a)], b"1"))
    db.add_file(pkg, "/bin/2", _fake([(0x3000, 0x3000, c), (0x4000, 0x4000, a)], b"2"))
    db.commit()
    hits = db.lookup_digests([a, b, c, a[:8] + b"\x01" * 24])
    assert sorted(h.file_offset for h in hits[0]) == [0, 0x2000, 0x4000]
    assert [h.file_offset for h in hits[1]] == [0x1000]
    assert [h.file_offset for h in hits[2]] == [0x3000]
    assert hits[3] == []
    q_idx, rows = db.match([c, a])
    assert sorted(zip(q_idx.tolist(), (db.hit_at(r).file_offset for r in rows), strict=True)) == [
        (0, 0x3000), (1, 0), (1, 0x2000), (1, 0x4000)]


def test_returned_lists_are_private_copies(db: CodePageDB) -> None:
    db.add_file(db.package_id(PackageMeta("p", "1")), "/bin/p", _fake([(0, 0, _digest(5))]))
    db.commit()
    db.lookup(_digest(5)).clear()
    assert len(db.lookup(_digest(5))) == 1


def test_rootfs_with_dpkg_database_attributes_files_to_packages(db: CodePageDB, tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "var/lib/dpkg/info").mkdir(parents=True)
    shutil.copy(_tiny_elf(tmp_path, "owned"), root / "usr/bin/owned")
    shutil.copy(_tiny_elf(tmp_path, "stray"), root / "usr/bin/stray")
    (root / "var/lib/dpkg/status").write_text(
        "Package: ownedpkg\nStatus: install ok installed\nVersion: 3.0-1\nArchitecture: amd64\nSource: ownsrc\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\nArchitecture: amd64\n")
    (root / "var/lib/dpkg/info/ownedpkg.list").write_text("/.\n/bin\n/bin/owned\n")  # dpkg lists the unmerged path
    (root / "var/lib/dpkg/info/gone.list").write_text("/usr/bin/stray\n")
    report = ingest_path(db, root)
    assert report.files_added == 2 and report.errors == []
    owned = {f[1]: (f[2], f[3]) for f in db.find_files()}
    assert owned == {"/usr/bin/owned": ("ownedpkg", "3.0-1"), "/usr/bin/stray": ("(local)", "")}
    hit = db.lookup(db.file_pages(db.find_files("/owned")[0][0])[0].digest)[0]
    assert hit.source_package == "ownsrc"


def test_built_deb_and_directory_of_debs(db: CodePageDB, tmp_path: Path) -> None:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr/sbin").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text("Package: tinyd\nVersion: 0.1-1\nArchitecture: amd64\n"
                                         "Maintainer: t <t@example.org>\nDescription: test\n")
    shutil.copy(_tiny_elf(tmp_path, "tinyd"), tree / "usr/sbin/tinyd")
    debs = tmp_path / "debs"
    debs.mkdir()
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(debs / "tinyd_0.1-1_amd64.deb")],
                   check=True, capture_output=True)
    (debs / "broken_1_amd64.deb").write_bytes(b"!<arch>\nnot really an archive")
    report = ingest_path(db, debs)
    assert report.files_added == 1 and len(report.errors) == 1 and "broken" in report.errors[0][0]
    hit = db.lookup(db.file_pages(db.find_files("/usr/sbin/tinyd")[0][0])[0].digest)[0]
    assert (hit.package, hit.version, hit.source_package) == ("tinyd", "0.1-1", "tinyd")
    assert ingest_path(db, debs / "tinyd_0.1-1_amd64.deb").files_known == 1


def test_apt_ingest_skips_a_stored_package_version(db: CodePageDB, monkeypatch: pytest.MonkeyPatch) -> None:
    from nephoscope.knowledge import ingest
    from nephoscope.knowledge.debian import archive

    db.package_id(PackageMeta("stored", "1.0"))
    db.commit()
    monkeypatch.setattr(archive, "download", lambda *a: pytest.fail("a stored package was downloaded again"))
    report = ingest.ingest_apt(db, "stored=1.0")
    assert report.packages == ["stored=1.0"] and report.files_added == 0 and report.errors == []
