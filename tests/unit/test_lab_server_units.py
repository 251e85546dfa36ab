"""Disk profiles without a VM: profile fields, generated units, the dpkg ground-truth reader, stable listings."""

from __future__ import annotations

from pathlib import Path

import pytest

from nephoscope.core.errors import LabError, ProfileError
from nephoscope.lab import server
from nephoscope.lab.build import Image
from nephoscope.lab.profile import Service, load_profile


def test_server_profiles_are_disk_profiles_with_units() -> None:
    plain, tampered = load_profile("server"), load_profile("server-tampered")
    assert plain.boot == tampered.boot == "disk" and plain.mem == "1G"
    assert load_profile("clean").boot == "initramfs" and load_profile("clean").mem == ""
    units = {s.tag: s.unit for s in plain.services}
    assert units["nginx"] == "nginx.service" and units["webapp"] == "nph-webapp.service"
    assert plain.package("nginx").version == "oldest"  # type: ignore[union-attr]
    techniques = {s.technique for s in tampered.services if s.technique}
    assert techniques == {s.technique for s in load_profile("tampered").services if s.technique}
    assert {s.tag for s in plain.services} <= {s.tag for s in tampered.services}


def test_unknown_boot_kind_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nboot = "floppy"\n')
    with pytest.raises(ProfileError, match="boot must be"):
        load_profile(str(bad))


def test_unit_text_runs_the_script_and_the_after_step_late() -> None:
    plain = server.unit_text(Service(tag="web", command="x", unit="nph-web.service"))
    assert "ExecStart=/bin/sh /etc/nephoscope/services/web.sh" in plain
    assert "ExecStartPost" not in plain and "multi-user.target\n\n[Service]" not in plain
    after = server.unit_text(Service(tag="v", command="x", after="inject $PID", unit="nph-v.service"))
    assert "After=network.target multi-user.target" in after
    # $$ is systemd's literal $: the shell sees ${MAINPID:-$(systemctl show ...)}
    assert "export PID=$${MAINPID:-$$(systemctl show -p MainPID --value nph-v.service)}" in after
    assert "WantedBy=multi-user.target" in after


def test_read_dpkg_maps_files_to_installed_packages(tmp_path: Path) -> None:
    admin = tmp_path / "var/lib/dpkg"
    (admin / "info").mkdir(parents=True)
    (admin / "status").write_text(
        "Package: libfoo1\nStatus: install ok installed\nArchitecture: amd64\nMulti-Arch: same\nVersion: 1.2-3\n\n"
        "Package: bar\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2:0.9\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1\n")
    (admin / "info/libfoo1:amd64.list").write_text("/.\n/lib\n/lib/x86_64-linux-gnu\n"
                                                   "/lib/x86_64-linux-gnu/libfoo.so.1\n")
    (admin / "info/bar.list").write_text("/usr/bin/bar\n/usr/bin/missing\n")
    (admin / "info/gone.list").write_text("/etc/gone.conf\n")
    lib = tmp_path / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    (lib / "libfoo.so.1").write_bytes(b"\x7fELF")
    (tmp_path / "lib").symlink_to("usr/lib")
    (tmp_path / "usr/bin").mkdir()
    (tmp_path / "usr/bin/bar").write_bytes(b"#!/bin/sh\n")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/gone.conf").write_text("")
    packages, files = server.read_dpkg(tmp_path)
    assert packages == {"libfoo1": "1.2-3", "bar": "2:0.9"}
    # merged /usr: the package's /lib path is where the file really is; directories are not files
    assert files == {"/usr/lib/x86_64-linux-gnu/libfoo.so.1": ["libfoo1", "1.2-3"], "/usr/bin/bar": ["bar", "2:0.9"]}
    image = Image(tmp_path, {"files": files})
    assert image.owner_of("/lib/x86_64-linux-gnu/libfoo.so.1") == ("libfoo1", "1.2-3")


def test_stable_keeps_processes_present_in_both_listings() -> None:
    def p(pid: int, start: int, exe: str = "/usr/bin/x") -> dict[str, object]:
        return {"pid": pid, "start_ticks": start, "exe": exe}

    first = [p(1, 1), p(50, 10), p(60, 20), p(70, 30)]
    second = [p(1, 1), p(50, 10), p(60, 99), p(80, 40)]  # 60 is a reused pid, 70 exited, 80 is new
    stable, transient = server._stable(first, second)
    assert [q["pid"] for q in stable] == [1, 50]
    assert transient == [60, 70, 80]


def test_mounted_tree_is_never_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tmp_path / "x.tmp"
    real = Path("/proc/mounts").read_text()
    fake = real + f"proc {tree.resolve()}/root/proc proc ro 0 0\n"
    original = Path.read_text

    def read_text(self: Path, *a: object, **k: object) -> str:
        return fake if str(self) == "/proc/mounts" else original(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(LabError, match="still has mounts"):
        server._check_unmounted(tree)
