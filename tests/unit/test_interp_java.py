"""The JVM reader: command lines as the JDK 17 launcher reads them, jar manifests from (partial) page-cache copies."""

from __future__ import annotations

import io
import random
import zipfile

import pytest

from nephoscope.core.errors import MemoryAccessError
from nephoscope.introspect.interp import java
from nephoscope.os.linux.walkers import OpenFile, Vma

JAVA = "/usr/lib/jvm/java-17-openjdk-amd64/bin/java"
MANIFEST = ("Manifest-Version: 1.0\r\nMain-Class: lab.NphService\r\nImplementation-Title: nph-service\r\n"
            "Implementation-Version: 1.4.2\r\nImplementation-Vendor: nephoscope lab with a very long vendor name th\r\n"
            " at continues\r\n\r\nName: lab/\r\nImplementation-Version: 9.9\r\n")


def jar_bytes(manifest: str = MANIFEST, padding: int = 20000, stored: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as z:
        z.writestr("META-INF/MANIFEST.MF", manifest)
        z.writestr("lab/NphService.class", random.Random(1).randbytes(padding))  # incompressible
    return buf.getvalue()


def test_command_lines() -> None:
    cp = java.parse_launch([JAVA, "-Xmx64m", "-Xss512k", "-XX:+UseSerialGC", "-cp",
                            "/opt/javasvc/nph-service.jar:/usr/share/java/commons-lang3.jar", "lab.NphService", "a"])
    assert (cp.main_class, cp.class_path, cp.args) == (
        "lab.NphService", ("/opt/javasvc/nph-service.jar", "/usr/share/java/commons-lang3.jar"), ("a",))
    jar = java.parse_launch([JAVA, "-Dx=1", "-cp", "ignored.jar", "-jar", "/srv/app.jar", "--port", "8080"])
    assert (jar.jar, jar.class_path, jar.main_class, jar.args) == ("/srv/app.jar", ("/srv/app.jar",), "",
                                                                    ("--port", "8080"))
    mod = java.parse_launch([JAVA, "--module-path", "/m", "-m", "app/app.Main"])
    assert mod.module == "app/app.Main" and not mod.problem
    assert java.parse_launch([JAVA, "--add-modules", "ALL", "--class-path=/a.jar", "Main"]).class_path == ("/a.jar",)
    assert java.parse_launch([JAVA, "Hello.java"]).source == "Hello.java"
    assert "argument file" in java.parse_launch([JAVA, "@opts", "Main"]).problem
    assert java.parse_launch([JAVA, "-version"]).problem
    assert java.parse_launch([JAVA, "-cp"]).problem == "-cp without a value"
    assert java.is_java(JAVA) and not java.is_java("/usr/bin/python3") and not java.is_java("/tmp/java")


def test_manifest_main_section_and_continuation_lines() -> None:
    m = java.parse_manifest(MANIFEST)
    assert m["Implementation-Version"] == "1.4.2"  # the main section's, not lab/'s
    assert m["Implementation-Vendor"] == "nephoscope lab with a very long vendor name that continues"


@pytest.mark.parametrize("stored", [False, True])
def test_a_whole_cached_jar_gives_its_manifest(stored: bool) -> None:
    data = jar_bytes(stored=stored)
    manifest, problem = java.read_manifest(data, (), len(data))
    assert problem == "" and manifest["Main-Class"] == "lab.NphService"


def test_absent_pages_under_the_manifest_or_directory_are_unverifiable() -> None:
    data = jar_bytes()
    pages = -(-len(data) // 4096)
    assert pages >= 3
    # a page of class data only (neither the manifest at offset 0 nor the directory at the end) may be absent
    manifest, problem = java.read_manifest(data, (1,), len(data))
    assert problem == "" and manifest["Implementation-Version"] == "1.4.2"
    zeroed = bytes(4096) + data[4096:]
    _, problem = java.read_manifest(zeroed, (0,), len(data))
    assert "not in the page cache" in problem
    tail = data[:(pages - 1) * 4096] + bytes(len(data) - (pages - 1) * 4096)
    _, problem = java.read_manifest(tail, (pages - 1,), len(data))
    assert problem  # the central directory is gone: either it does not parse or it is not cached


def test_corrupted_jars_are_unverifiable_not_made_up() -> None:
    data = bytearray(jar_bytes())
    at = data.find(b"lab.NphService") if b"lab.NphService" in data else 60
    flipped = bytes(data[:at]) + b"X" + bytes(data[at + 1:])
    assert java.read_manifest(flipped, (), len(flipped))[1]
    assert "zip" in java.read_manifest(b"garbage" * 1000, (), 7000)[1]
    assert "read cap" in java.read_manifest(bytes(data), (), len(data) + 1)[1]
    huge = jar_bytes(manifest="A: " + "b" * (java.MAX_MANIFEST + 10), padding=0)
    assert "claims" in java.read_manifest(huge, (), len(huge))[1]
    no_manifest = io.BytesIO()
    with zipfile.ZipFile(no_manifest, "w") as z:
        z.writestr("x.class", b"x")
    assert "no META-INF" in java.read_manifest(no_manifest.getvalue(), (), len(no_manifest.getvalue()))[1]


def test_inspect_jvm_joins_command_line_files_and_manifests() -> None:
    data = jar_bytes()
    files = {0x1000: (data, (), len(data), ""), 0x2000: (b"", (), 0, "page cache of inode 0x1 unreadable")}

    def read_file(gva: int) -> tuple[bytes, tuple[int, ...], int, str]:
        if gva == 0x3000:
            raise MemoryAccessError("unmapped")
        return files[gva]

    argv = [JAVA, "-cp", "/opt/javasvc/nph-service.jar:/usr/share/java/commons-lang3.jar:/missing.jar",
            "lab.NphService"]
    opened = [OpenFile(3, "/opt/javasvc/nph-service.jar", 0x1000),
              OpenFile(4, "/usr/share/java/commons-lang3.jar", 0x2000), OpenFile(5, "/tmp/x.jar", 0x3000)]
    vmas = [Vma(0x10000, 0x20000, "r--s", 0, "/opt/javasvc/nph-service.jar", 0x1000, 0)]
    state = java.inspect_jvm(argv, vmas, opened, [(101, "nph-worker-1"), (100, "java")], read_file)
    assert state.complete and state.main_class == "lab.NphService"
    by = {j.path: j for j in state.jars}
    svc = by["/opt/javasvc/nph-service.jar"]
    assert (svc.open_fd, svc.mapped, svc.on_class_path, svc.version, svc.verified) == (True, True, True, "1.4.2", True)
    assert not by["/usr/share/java/commons-lang3.jar"].verified and "unreadable" in by[
        "/usr/share/java/commons-lang3.jar"].problem
    assert "not open or mapped" in by["/missing.jar"].problem and by["/missing.jar"].on_class_path
    assert "unreadable" in by["/tmp/x.jar"].problem and not by["/tmp/x.jar"].on_class_path
    assert state.threads == [(100, "java"), (101, "nph-worker-1")]
    assert state.to_json()["main_class"] == "lab.NphService"


def test_a_jar_launch_takes_the_main_class_from_the_manifest() -> None:
    data = jar_bytes()
    state = java.inspect_jvm([JAVA, "-jar", "app.jar"], [], [OpenFile(3, "/srv/app.jar", 0x1000)], [],
                             lambda _g: (data, (), len(data), ""))
    assert state.main_class == "lab.NphService" and state.jars[0].on_class_path
    unread = java.inspect_jvm([JAVA, "-jar", "/srv/app.jar"], [], [OpenFile(3, "/srv/app.jar", 0x1000)], [], None)
    assert unread.main_class == "" and "not read" in unread.jars[0].problem
