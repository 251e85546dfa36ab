"""Script identification without a guest: the script-hash DB, its pycs, the findings, the interp profile."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from nephoscope.analysis.scripts import MODIFIED_SCRIPT, UNKNOWN_SCRIPT, VULNERABLE_SCRIPT, script_findings
from nephoscope.core.errors import ProfileError
from nephoscope.core.payloads import Interpreter, ScriptEntry
from nephoscope.knowledge.scripts import ScriptDB, outside_packages, pyc_compiler
from nephoscope.knowledge.vulns import VulnIndex, VulnRecord
from nephoscope.lab.profile import load_profile


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    pkg = root / "usr/lib/python3/dist-packages/demo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 1\n\ndef f():\n    return VALUE\n")
    os.utime(pkg / "__init__.py", (1660001126, 1660001126))
    (root / "usr/share/doc").mkdir(parents=True)
    (root / "usr/share/doc/README").write_text("not a script")
    return root


def test_db_hashes_scripts_and_their_pycs(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    with ScriptDB(tmp_path / "s.sqlite") as db:
        added = db.add_tree(root, "python3-demo", "1.0-1")
        source = (root / "usr/lib/python3/dist-packages/demo/__init__.py").read_bytes()
        hits = db.identify(hashlib.sha256(source).hexdigest())
        assert [(h.package, h.version, h.path) for h in hits] == [
            ("python3-demo", "1.0-1", "/usr/lib/python3/dist-packages/demo/__init__.py")]
        assert db.has("python3-demo", "1.0-1") and not db.has("python3-demo", "1.0-2")
        assert db.shipping("/usr/lib/python3/dist-packages/demo/__init__.py")
        compiler = pyc_compiler("3.11")
        if compiler is None:
            assert added == 1
            return
        # the pyc the guest's CPython 3.11 writes for this source (timestamp pyc: mtime and size of the source)
        assert added == 2
        work = tmp_path / "work"
        shutil.copytree(root, work)
        src = work / "usr/lib/python3/dist-packages/demo/__init__.py"
        os.utime(src, (1660001126, 1660001126))
        import subprocess

        # as py3compile does in the guest: the file's own (guest) path is the code's co_filename
        subprocess.run([compiler, "-I", "-c", "import py_compile, sys; py_compile.compile(sys.argv[1], "
                        "dfile=sys.argv[2], doraise=True)", str(src),
                        "/usr/lib/python3/dist-packages/demo/__init__.py"], check=True)
        pyc = src.parent / "__pycache__" / "__init__.cpython-311.pyc"
        got = db.identify(hashlib.sha256(pyc.read_bytes()).hexdigest())
        assert [h.path for h in got] == ["/usr/lib/python3/dist-packages/demo/__pycache__/__init__.cpython-311.pyc"]


def test_policy_paths() -> None:
    assert outside_packages("/opt/orphan/worker.py") and outside_packages("/usr/local/lib/x.py")
    assert not outside_packages("/usr/lib/python3/dist-packages/flask/app.py")


def _interp(pid: int, *files: ScriptEntry) -> Interpreter:
    return Interpreter(pid, "python", "CPython 3.11 (python3.11-minimal 3.11.2-6+deb12u9)", "/opt/w.py",
                       (("wait (/opt/w.py:16)",),), len(files), files)


def test_findings_unknown_modified_vulnerable() -> None:
    known = ScriptEntry("/usr/lib/python3/dist-packages/flask/app.py", "known", "aa" * 32,
                        "flask 2.2.2 (python3-flask 2.2.2-3)", "python3-flask", "2.2.2-3")
    unknown = ScriptEntry("/opt/w.py", "unknown", "bb" * 32, head=("# \\x1b[31m escaped",))
    modified = ScriptEntry("/usr/lib/python3/dist-packages/flask/cli.py", "modified", "cc" * 32,
                           reason="python3-flask 2.2.2-3 ships this path with other bytes")
    unver = ScriptEntry("/usr/lib/python3.11/os.py", "unverifiable", reason="1 of 3 pages not in the page cache")
    index = VulnIndex([VulnRecord("flask", "CVE-2023-30861", "2.2.2-3+deb12u1", urgency="high")])
    found = script_findings([_interp(10, known, unknown, modified, unver), _interp(11, unknown)], "vm1", index,
                            lambda package, _v: "flask" if package == "python3-flask" else package)
    kinds = {f.kind: f for f in found}
    assert set(kinds) == {UNKNOWN_SCRIPT, MODIFIED_SCRIPT, VULNERABLE_SCRIPT}
    assert kinds[UNKNOWN_SCRIPT].evidence[0]["pids"] == [10, 11]
    assert kinds[UNKNOWN_SCRIPT].evidence[0]["head"] == ["# \\x1b[31m escaped"]
    assert [c["cve"] for c in kinds[VULNERABLE_SCRIPT].evidence[0]["cves"]] == ["CVE-2023-30861"]
    # nothing is claimed about an unverifiable file
    assert not any("/usr/lib/python3.11/os.py" in str(f.evidence) for f in found)
    assert {f.kind for f in script_findings([_interp(10, known, unver)], "vm1")} == set()


def test_interp_profile_loads_and_wheels_need_a_pin(tmp_path: Path) -> None:
    profile = load_profile("interp")
    assert {s.tag for s in profile.services} >= {"webapp", "php-fpm", "javasvc", "orphan"}
    assert [a.kind for a in profile.artifacts] == ["wheel"]
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nboot = "disk"\n[[artifacts]]\nkind = "wheel"\nsource = "py-spy"\n'
                   'output = "/usr/local/bin/py-spy"\n')
    with pytest.raises(ProfileError, match="pinned"):
        load_profile(str(bad))


def _jar(manifest: str | None, extra: dict[str, bytes] | None = None) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as jar:
        if manifest is not None:
            jar.writestr("META-INF/MANIFEST.MF", manifest)
        for name, data in (extra or {"demo/Main.class": b"\xca\xfe\xba\xbe" + bytes(64)}).items():
            jar.writestr(name, data)
    return buf.getvalue()


def test_an_unknown_jar_is_shown_by_its_manifest_not_its_zip_bytes() -> None:
    from nephoscope.introspect.interp.files import head_of

    manifest = ("Manifest-Version: 1.0\r\nCreated-By: 17.0.13 (Debian)\r\nMain-Class: demo.Main\r\n"
                "Implementation-Title: demo \x1b[31mservice\r\nImplementation-Version: 1.2\r\n"
                "Class-Path: lib/a.jar\r\n\r\nName: demo/Main.class\r\nMain-Class: not.the.main.Section\r\n")
    assert head_of("/opt/javasvc/app.jar", _jar(manifest)) == [
        "META-INF/MANIFEST.MF:", "Main-Class: demo.Main", "Implementation-Title: demo \\x1b[31mservice",
        "Implementation-Version: 1.2", "Created-By: 17.0.13 (Debian)"]
    assert head_of("/opt/x.war", _jar("Manifest-Version: 1.0\r\n\r\n")) == [
        "(a zip archive; its manifest has none of Main-Class, Implementation-Title, Implementation-Version, "
        "Created-By)"]
    assert head_of("/opt/x.jar", _jar(None)) == ["(a zip archive; no manifest to show: the jar has no "
                                                 "META-INF/MANIFEST.MF)"]
    broken = head_of("/opt/x.jar", b"PK\x03\x04\x1b[2J" + bytes(100))
    assert len(broken) == 1 and broken[0].startswith("(a zip archive; no manifest to show: the jar does not parse")
    assert "\x1b" not in broken[0]
    # a damaged manifest entry (CRC-32 mismatch) is not shown
    good = _jar("Main-Class: demo.Main\r\n", {"demo/A.class": b"x"})
    at = good.index(b"Main-Class") if b"Main-Class" in good else -1
    if at >= 0:  # stored uncompressed only when deflate does not pay; otherwise flip a byte of the deflated data
        damaged = good[:at] + b"N" + good[at + 1:]
    else:
        start = good.index(b"META-INF/MANIFEST.MF") + len("META-INF/MANIFEST.MF")
        damaged = good[:start + 2] + bytes([good[start + 2] ^ 0xFF]) + good[start + 3:]
    shown = head_of("/opt/x.jar", damaged)
    assert len(shown) == 1 and "no manifest to show" in shown[0]
    # other scripts keep their first lines, escaped
    assert head_of("/opt/w.py", b"#!/usr/bin/python3\n\x1b[31mx = 1\n") == ["#!/usr/bin/python3", "\\x1b[31mx = 1"]
