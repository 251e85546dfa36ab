"""kb sync without a VM: Contents parsing and lookups (usrmerge), hostile hints, owners, the unverifiable rule."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from nephoscope.analysis.merge import merge
from nephoscope.core import payloads
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.knowledge.binaries import CodePageDB, PackageMeta
from nephoscope.knowledge.debian import archive
from nephoscope.knowledge.debian.contents import ContentsIndex, merged_path, parse_contents_line, wanted_path
from nephoscope.knowledge.elfpages import ElfPages, PageInfo
from nephoscope.knowledge.sync import (
    MAX_KERNELS,
    MAX_PATHS,
    PACKAGE_RE,
    clean_path,
    collect_hints,
    escape,
    kernel_package,
    mark_unverifiable,
    owners,
)

CONTENTS = """\
FILE                                                    LOCATION
bin/bash                                                shells/bash
bin/busybox                                             utils/busybox,utils/busybox-static
usr/bin/pv                                              utils/pv
usr/lib/x86_64-linux-gnu/libc.so.6                      libs/libc6
lib/x86_64-linux-gnu/libz.so.1.2.13                     libs/zlib1g
usr/lib/openssh/sftp-server                             net/openssh-sftp-server
usr/share/doc/pv/copyright                              utils/pv
usr/lib/python3/dist-packages/odd name.so               python/python3-odd
usr/lib/x86_64-linux-gnu/libfoo_bar.so.1                libs/libfoo1
usr/lib/x86_64-linux-gnu/libfooXbar.so.1                libs/libfoox1
usr/bin/evil                                            utils/Bad;rm -rf
"""


@pytest.fixture
def contents() -> ContentsIndex:
    return ContentsIndex.from_lines(CONTENTS.splitlines(keepends=True))


def test_contents_lines_parse_with_spaces_several_packages_and_headers() -> None:
    assert parse_contents_line("FILE   LOCATION\n") is None
    assert parse_contents_line("bin/busybox   utils/busybox,utils/busybox-static\n") == (
        "/usr/bin/busybox", ["busybox", "busybox-static"])
    assert parse_contents_line("usr/lib/a b.so   python/python3-x\n") == ("/usr/lib/a b.so", ["python3-x"])
    assert parse_contents_line("usr/bin/x   utils/Bad;rm\n") is None  # not a package name
    assert parse_contents_line("\n") is None


def test_paths_compare_in_merged_usr_form() -> None:
    assert merged_path("bin/bash") == merged_path("/usr/bin/bash") == "/usr/bin/bash"
    assert merged_path("/lib64/ld-linux-x86-64.so.2") == "/usr/lib64/ld-linux-x86-64.so.2"
    assert merged_path("/etc/passwd") == "/etc/passwd"
    assert wanted_path("usr/lib/openssh/sftp-server") and wanted_path("usr/lib/python3/x.cpython-311.so")
    assert not wanted_path("usr/share/doc/pv/copyright")


def test_contents_index_answers_in_every_usrmerge_form(contents: ContentsIndex) -> None:
    assert contents.packages("/bin/bash") == contents.packages("/usr/bin/bash") == ["bash"]
    assert contents.packages("/usr/bin/busybox") == ["busybox", "busybox-static"]
    assert contents.packages("/lib/x86_64-linux-gnu/libc.so.6") == ["libc6"]
    assert contents.packages("/usr/lib/x86_64-linux-gnu/libz.so.1.2.13") == ["zlib1g"]
    assert contents.packages("/usr/share/doc/pv/copyright") == []  # no ELF lives there: not indexed
    assert contents.packages("/usr/bin/evil") == []
    assert contents.packages("") == contents.packages("/x\0y") == contents.packages("/" + "a" * 5000) == []
    # LIKE wildcards in a guest-supplied name are literal
    assert contents.by_basename("libfoo_bar.so.1") == [("/usr/lib/x86_64-linux-gnu/libfoo_bar.so.1", "libfoo1")]
    assert contents.by_basename("%") == [] and contents.by_basename("a/b") == []


def test_contents_index_cache_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "contents.sqlite"
    ContentsIndex.from_lines(CONTENTS.splitlines(), path, "k")
    assert ContentsIndex.from_lines([], tmp_path / "empty.sqlite").packages("/usr/bin/pv") == []
    reopened = ContentsIndex.from_lines(CONTENTS.splitlines(), path, "k")
    assert reopened.packages("/usr/bin/pv") == ["pv"]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("raw", ["relative/bin", "/usr/bin/a b", "/usr/bin/\x1b[31m", "/usr/../etc/shadow",
                                 "/usr/bin/.", "/" + "x" * 5000, "/bin/\0sh", 7, None, ""])
def test_hostile_paths_name_no_packaged_file(raw: object) -> None:
    assert clean_path(raw) is None


def test_paths_are_normalised() -> None:
    assert clean_path("/bin/bash (deleted)") == "/usr/bin/bash"
    assert clean_path("/usr/sbin/nginx") == "/usr/sbin/nginx"
    assert escape("a\x1b[31mb\n" + "x" * 300, 20) == "a\\x1b[31mb\\x0a" + "x" * 12 + "…"


def _obs(kind: str, payload: payloads.Payload, method: str = "inspect",
         verdict: Verdict = Verdict.VERIFIED) -> Observation:
    return Observation(kind, f"{kind}:{id(payload)}", payload, Provenance(method, "vm"), verdict)


def test_hints_are_bounded_and_validated() -> None:
    obs = [_obs("mapping", payloads.Mapping(1, 0x1000, 0x2000, "r-xp", 0, f"/usr/lib/lib{i}.so"))
           for i in range(MAX_PATHS + 10)]
    obs += [_obs("mapping", payloads.Mapping(1, 0, 0x1000, "rw-p", 0, "/usr/lib/data.so")),  # not executable
            _obs("mapping", payloads.Mapping(1, 0, 0x1000, "r-xp", 0, "[vdso]")),
            _obs("process", payloads.Process(1, exe="/bin/busybox")),
            _obs("package", payloads.Package("busybox-static", "1:1.35.0-4"), "agent", Verdict.REPORTED),
            _obs("package", payloads.Package("Bad;rm", "1"), "agent", Verdict.REPORTED),
            _obs("package", payloads.Package("ok", "1 2"), "agent", Verdict.REPORTED)]
    hints = collect_hints(obs)
    assert len(hints.paths) == MAX_PATHS
    assert "/usr/lib/data.so" not in hints.paths
    assert hints.installed == {"busybox-static": "1:1.35.0-4"}
    assert hints.rejected == 10 + 1 + 2  # over the bound: 10 mappings and the exe after them; two bad packages
    assert all(PACKAGE_RE.match(n) for n in hints.installed)


def test_owners_prefer_what_dpkg_says_is_installed(contents: ContentsIndex) -> None:
    obs = [_obs("process", payloads.Process(1, exe="/bin/busybox")),
           _obs("process", payloads.Process(2, exe="/usr/local/bin/mine")),
           _obs("mapping", payloads.Mapping(2, 0, 0x1000, "r-xp", 0, "/lib/x86_64-linux-gnu/libc.so.6"))]
    by_package, unowned = owners(collect_hints(obs), contents)
    assert by_package == {"busybox": {"/usr/bin/busybox"}, "busybox-static": {"/usr/bin/busybox"},
                          "libc6": {"/usr/lib/x86_64-linux-gnu/libc.so.6"}}
    assert unowned == ["/usr/local/bin/mine"]
    obs.append(_obs("package", payloads.Package("busybox-static", "1:1.35.0-4"), "agent", Verdict.REPORTED))
    by_package, _ = owners(collect_hints(obs), contents)
    assert set(by_package) == {"busybox-static", "libc6"}


def _kb_with(tmp_path: Path, name: str, versions: tuple[str, ...]) -> CodePageDB:
    db = CodePageDB.open(tmp_path / "kb.sqlite")
    for v in versions:
        pkg = db.package_id(PackageMeta(name, v, "amd64"))
        page = PageInfo(0x1000, 0x1000, hashlib.sha256(v.encode()).digest())
        db.add_file(pkg, "/usr/bin/pv", ElfPages(hashlib.sha256(v.encode()).digest(), 8192, "ET_DYN", "EM_X86_64",
                                                  None, (), (page,)))
    db.commit()
    return db


def _unknown_in_pv(installed: str | None) -> list[Observation]:
    cr3 = 0x1234000
    obs = [_obs("process", payloads.Process(7, exe="/usr/bin/pv", cr3=cr3)),
           _obs("mapping", payloads.Mapping(7, 0x5000, 0x9000, "r-xp", 0x1000, "/usr/bin/pv")),
           _obs("unknown-code", payloads.UnknownCode(cr3, 0x6000, 0x7000, 1, False, (0x99000,), "00" * 8), "arch"),
           _obs("unknown-code", payloads.UnknownCode(cr3, 0x20000, 0x21000, 1, True, (0x98000,), "90" * 8), "arch")]
    if installed:
        obs.append(_obs("package", payloads.Package("pv", installed), "agent", Verdict.REPORTED))
    return obs


def test_undownloadable_installed_version_is_unverifiable_not_unknown(tmp_path: Path, contents: ContentsIndex
                                                                      ) -> None:
    offered = archive.available_versions("pv")  # the real archive: every version apt offers is "in the KB"
    assert offered
    db = _kb_with(tmp_path, "pv", offered)
    obs = mark_unverifiable(_unknown_in_pv("0.9-old"), db, contents)
    marked = [o for o in obs if o.verdict == Verdict.UNVERIFIABLE]
    assert len(marked) == 1 and marked[0].payload.gva_start == 0x6000  # the rwx region in no VMA stays unknown
    held = ", ".join(sorted(offered))
    assert marked[0].reason.startswith(f"unverifiable: pv 0.9-old not downloadable (KB holds {held})")
    view = merge(obs, ["inspect", "arch", "agent"], "vm")
    assert [f.title for f in view.findings if f.kind == "unknown-code"] == [
        "executable code in no known binary at 0x20000-0x21000 (pid 7)"]
    assert any(u["reason"] == marked[0].reason for u in view.unverifiable)
    # no dpkg: a packaged file that matches none of the downloadable versions is unverifiable too
    assert "(installed version unknown)" in next(o.reason for o in mark_unverifiable(_unknown_in_pv(None), db, contents)
                                                 if o.verdict == Verdict.UNVERIFIABLE)


def test_unknown_code_stays_unknown_when_the_kb_lacks_versions_or_holds_the_installed_one(
        tmp_path: Path, contents: ContentsIndex) -> None:
    offered = archive.available_versions("pv")
    partial = _kb_with(tmp_path / "a", "pv", ()) if len(offered) == 1 else _kb_with(tmp_path / "a", "pv", offered[:1])
    assert all(o.verdict != Verdict.UNVERIFIABLE for o in mark_unverifiable(_unknown_in_pv("0.9"), partial, contents))
    full = _kb_with(tmp_path / "b", "pv", offered)
    # the installed version is in the KB and its pages still differ: a changed binary, not a download gap
    assert all(o.verdict != Verdict.UNVERIFIABLE
               for o in mark_unverifiable(_unknown_in_pv(offered[0]), full, contents))


def test_kernel_release_hints_come_from_the_kernel_model_and_are_validated() -> None:
    obs = [_obs("kernel", payloads.Details({"release": "6.1.0-57-amd64", "banner": "Linux version ..."}), "inspect"),
           _obs("kernel-image", payloads.KernelImage("vmlinux", "vmlinux", "unverifiable"), "arch",
                Verdict.UNVERIFIABLE),
           _obs("kernel", payloads.Details({"release": "6.1.0; rm -rf /"}), "inspect"),
           _obs("kernel", payloads.Details({"release": ["not", "a", "string"]}), "inspect")]
    obs[1] = dataclasses.replace(obs[1], reason="package linux-image-6.12.57+deb12-amd64 not in KB (kernel ...)")
    hints = collect_hints(obs)
    assert hints.kernels == {"6.1.0-57-amd64", "6.12.57+deb12-amd64"}
    assert hints.rejected == 1  # the shell-looking release; a non-string is no hint at all
    many = [_obs("kernel", payloads.Details({"release": f"6.1.0-{i}-amd64"}), "inspect") for i in range(10)]
    assert len(collect_hints(many).kernels) == MAX_KERNELS


def test_kernel_package_is_the_image_apt_offers_for_the_release() -> None:
    names = [n for n in archive.package_names("linux-image-") if n.endswith("-amd64") and n.count("-") >= 4
             and "cloud" not in n and "rt-" not in n and "dbg" not in n]
    if not names:
        pytest.skip("apt offers no versioned linux-image-*-amd64 package")
    release = names[0].removeprefix("linux-image-")
    assert kernel_package(release, {}) == f"linux-image-{release}"
    unsigned = f"linux-image-{release}-unsigned"
    if archive.available_versions(unsigned):
        assert kernel_package(release, {unsigned: "1"}) == unsigned  # what dpkg says is installed wins
    assert kernel_package("0.0.0-nonexistent-amd64", {}) is None
    assert kernel_package("../../etc", {}) is None
