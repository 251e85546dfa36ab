"""Lab building blocks on small synthetic inputs."""

from __future__ import annotations

import io
import shutil
import subprocess

import pytest

from nephoscope.core.errors import LabError, ProfileError
from nephoscope.knowledge.debian.relations import Relation, parse_depends
from nephoscope.lab.build import is_compound, normalise_path
from nephoscope.lab.cpio import Entry, write_cpio
from nephoscope.lab.manifest import _records
from nephoscope.lab.profile import list_profiles, load_profile
from nephoscope.lab.runner import parse_size
from nephoscope.lab.trojan import MARKER, patch_text_padding


def test_builtin_profiles_load_and_tampered_extends_clean() -> None:
    assert {"clean", "tampered"} <= set(list_profiles())
    clean, tampered = load_profile("clean"), load_profile("tampered")
    assert {s.tag for s in clean.services} < {s.tag for s in tampered.services}
    techniques = {s.technique for s in tampered.services if s.technique}
    assert techniques == {"masquerade", "deleted-binary", "fileless-memfd", "code-injection",
                          "trojaned-binary", "preload-hidden", "unpackaged-binary"}
    assert clean.package("nginx").version == "oldest"


def test_bad_profiles_fail_clearly(tmp_path) -> None:
    with pytest.raises(ProfileError, match="unknown profile"):
        load_profile("no-such-profile")
    bad = tmp_path / "bad.toml"
    bad.write_text("services = [ { command = 'x' } ]")
    with pytest.raises(ProfileError, match="malformed"):
        load_profile(str(bad))
    broken = tmp_path / "broken.toml"
    broken.write_text("packages = [")
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(str(broken))
    loop = tmp_path / "loop.toml"
    loop.write_text('extends = "loop"')
    with pytest.raises(ProfileError, match="cycle"):
        load_profile(str(loop))


def test_depends_parsing_and_debian_version_order() -> None:
    groups = parse_depends("libc6 (>= 2.34), nginx-common (<< 1.22.1-9+deb12u9.1~), a | b:any (= 1:2~rc1)")
    assert groups[0] == [Relation("libc6", ">=", "2.34")]
    assert [r.name for r in groups[2]] == ["a", "b"]
    assert groups[1][0].allows("1.22.1-9+deb12u9") and not groups[1][0].allows("1.22.1-9+deb12u10")
    assert Relation("b", "=", "1:2~rc1").allows("1:2~rc1")
    assert not Relation("x", ">=", "1:0").allows("9.9")  # epoch wins


def test_compound_commands_are_detected_outside_quotes() -> None:
    assert not is_compound("/usr/sbin/nginx -g 'daemon off;'")
    assert is_compound("cp a b; exec c")
    assert is_compound("(echo x) | sqlite3 db")
    assert normalise_path("./bin/bash") == "usr/bin/bash" and normalise_path("etc/x") == "etc/x"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed (make setup)")
def test_cpio_archive_reads_back_with_gnu_cpio(tmp_path) -> None:
    buf = io.BytesIO()
    entries = [Entry("etc", 0o40755), Entry("etc/hostname", 0o100644, b"lab\n"),
               Entry("bin", 0o120777, b"usr/bin"), Entry("odd", 0o100600, b"x" * 1001)]
    assert write_cpio(buf, entries) == 4
    out = subprocess.run(["cpio", "-itv", "--quiet"], input=buf.getvalue(), capture_output=True, check=True)
    listing = out.stdout.decode()
    assert "etc/hostname" in listing and "bin -> usr/bin" in listing and " 1001 " in listing


def test_trojan_patch_changes_only_padding() -> None:
    original = open("/usr/bin/bash", "rb").read()  # noqa: SIM115 - a host ELF as input
    patched = patch_text_padding(original)
    diff = [i for i, (a, b) in enumerate(zip(original, patched, strict=True)) if a != b]
    assert diff and len(diff) <= len(MARKER)
    assert original[diff[0] - 1] == 0xC3  # right after a ret
    with pytest.raises(Exception, match=r"[Mm]agic|ELF|entry"):
        patch_text_padding(b"not an elf at all" * 10)


def test_parse_size() -> None:
    assert parse_size("512M") == 512 and parse_size("1G") == 1024
    for bad in ("lots", "64M", "8G"):
        with pytest.raises(LabError):
            parse_size(bad)


def test_report_parser_ignores_garbage_lines() -> None:
    recs = _records("junk\n[ 1.0] kernel NPH-TAG nginx 12\r\nNPH-PROC 1 0 aW5pdA== L2Jpbg==\n\x00\xffNPH-")
    assert recs[0] == ("NPH-TAG", ["nginx", "12"])
    assert recs[1][0] == "NPH-PROC"
