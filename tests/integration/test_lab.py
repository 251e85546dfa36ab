"""The lab on real QEMU guests: boot, ground truth against the guest itself, clean shutdown, bad input."""

from __future__ import annotations

import os
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest

from nephoscope.core.errors import LabError
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.hypervisor.qmp import Qmp
from nephoscope.knowledge.debian import archive
from nephoscope.lab import runner
from nephoscope.lab.build import Image, build_image
from nephoscope.lab.profile import load_profile

pytestmark = pytest.mark.guest


def _guest_procs(agent: GuestAgent) -> dict[int, str]:
    """List pid -> comm as a static busybox sees /proc (not fooled by ld.so.preload)."""
    code, out, _ = agent.exec(["/bin/busybox", "sh", "-c",
                               'for d in /proc/[0-9]*; do echo "${d#/proc/} $(cat $d/comm)"; done'])
    assert code == 0
    procs = {}
    for line in out.decode().splitlines():
        pid, _, comm = line.partition(" ")
        if pid.isdigit():
            procs[int(pid)] = comm
    return procs


def test_clean_guest_runs_the_older_nginx_and_libssl(clean_guest) -> None:
    manifest = clean_guest.manifest()
    oldest_nginx = archive.available_versions("nginx")[-1]
    assert manifest["packages"]["nginx"] == oldest_nginx
    assert manifest["packages"]["libssl3"] == archive.available_versions("libssl3")[-1]
    nginx = [p for p in manifest["processes"] if p["binary"] == "/usr/sbin/nginx"]
    master = [p for p in nginx if p["started_by_init"]]
    workers = [p for p in nginx if not p["started_by_init"]]
    assert len(master) == 1 and len(workers) == 2
    assert all(w["ppid"] == master[0]["pid"] for w in workers)
    assert {p["version"] for p in nginx} == {oldest_nginx}
    tags = {p["tag"] for p in manifest["processes"] if p["started_by_init"]}
    assert tags == {s.tag for s in load_profile("clean").services}
    assert manifest["kernel"]["release"] in manifest["kernel"]["source"]


def test_manifest_matches_what_the_guest_reports(clean_guest) -> None:
    manifest = clean_guest.manifest()
    with GuestAgent(clean_guest.qga_socket) as agent:
        live = _guest_procs(agent)
        for p in manifest["processes"]:
            if p["comm"] == "sleep" and p["cmdline"][-1:] == ["3600"]:
                continue
            assert live.get(p["pid"]) == p["comm"], p
        _code, out, _ = agent.exec(["/bin/busybox", "uname", "-r"])
        assert out.decode().strip() == manifest["kernel"]["release"]
        exe = agent.exec(["/bin/busybox", "readlink", f"/proc/{manifest['processes'][1]['pid']}/exe"])[1]
        assert exe.decode().strip() == manifest["processes"][1]["exe"]


def test_web_server_is_forwarded_to_the_host(clean_guest) -> None:
    body = urllib.request.urlopen(f"http://127.0.0.1:{clean_guest.http_port}/", timeout=20).read()
    assert b"nephoscope lab" in body


def test_guest_ram_is_shared_and_qmp_answers(clean_guest) -> None:
    assert clean_guest.ram_path.stat().st_size == clean_guest.mem_mib * 2**20
    with Qmp(clean_guest.qmp_socket) as qmp:
        assert qmp.command("query-status")["running"] is True
        assert qmp.command("query-name")["name"] == f"nephoscope-{clean_guest.name}"
    with socket.create_connection(("127.0.0.1", clean_guest.gdb_port), timeout=5):
        pass


def test_tampered_techniques_are_in_place(tampered_guest) -> None:
    manifest = tampered_guest.manifest()
    tech = {t["id"]: t for t in manifest["techniques"]}
    assert all(t["alive"] for t in tech.values()), tech
    procs = {p["pid"]: p for p in manifest["processes"]}
    with GuestAgent(tampered_guest.qga_socket) as agent:
        masq = procs[tech["masquerade"]["pid"]]
        assert masq["comm"] == "sshd" and masq["exe"] == "/usr/bin/python3.11"
        assert masq["cmdline"][0].startswith("/usr/sbin/sshd")
        assert procs[tech["deleted-binary"]["pid"]]["exe"].endswith("(deleted)")
        assert procs[tech["fileless-memfd"]["pid"]]["exe"].startswith("/memfd:")
        victim = tech["code-injection"]["pid"]
        maps = agent.read_file(f"/proc/{victim}/maps").decode()
        assert any(" rwxp 00000000 00:00 0" in line for line in maps.splitlines()), maps
        hidden = tech["preload-hidden"]["pid"]
        # a dynamically linked lister (bash globbing /proc) is fooled; static busybox is not
        _code, out, _ = agent.exec(["/usr/bin/bash", "-c", "echo /proc/[0-9]*"])
        assert f"/proc/{hidden} " not in out.decode() + " "
        assert hidden in _guest_procs(agent)
        original = agent.read_file("/usr/bin/bash")
        trojan = agent.read_file("/usr/local/bin/bash")
        assert len(original) == len(trojan) and original != trojan
    assert procs[tech["unpackaged-binary"]["pid"]]["package"] is None
    assert procs[tech["masquerade"]["pid"]]["package"] == "python3.11-minimal"


def test_down_leaves_nothing_behind(clean_image: Image) -> None:
    guest = runner.start(f"pt-down-{os.getpid()}", clean_image, mem="256M")
    pid, ram, directory = guest.pid, guest.ram_path, guest.directory
    assert runner.stop(guest.name) is True
    assert not Path(f"/proc/{pid}").exists() or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert not ram.exists() and not directory.exists()
    with pytest.raises(LabError, match="no lab guest"):
        runner.stop(guest.name)


def test_bad_input_gets_clear_errors_and_no_leftovers(clean_guest, clean_image: Image, tmp_path) -> None:
    with pytest.raises(LabError, match="already running"):
        runner.start(clean_guest.name, clean_image)
    assert clean_guest.alive()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(LabError, match="busy"):
            runner.start("pt-busy", clean_image, http_port=busy.getsockname()[1])
    assert not (runner.run_root() / "pt-busy").exists()
    with pytest.raises(LabError, match="does not exist"):
        build_image(load_profile("clean"), str(tmp_path / "no-vmlinuz"))
    with pytest.raises(LabError, match="name"):
        runner.start("bad name!", clean_image)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(clean_image.directory, corrupt)
    (corrupt / "initrd.cpio").write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(LabError, match=r"panic|exited|not ready"):
        runner.start("pt-corrupt", Image(corrupt, clean_image.meta), timeout=90)
    assert not (runner.run_root() / "pt-corrupt").exists()
    assert not Path("/dev/shm/nephoscope-pt-corrupt.ram").exists()
