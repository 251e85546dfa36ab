"""The /proc command-line parser and VM discovery, on real QEMU command lines (the lab's own and libvirt's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nephoscope.hypervisor import discover as d
from nephoscope.hypervisor.libvirt import parse_domain_xml
from nephoscope.hypervisor.target import VmTarget
from nephoscope.lab import runner
from nephoscope.lab.build import Image

# captured from `virsh`-started libvirt 9.0 / QEMU 7.2 (a transient TCG domain of lab/libvirt_runner.py)
LIBVIRT_ARGV = [
    "/usr/bin/qemu-system-x86_64", "-name", "guest=virt-try,debug-threads=on", "-S", "-object",
    '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain-1-virt-try/'
    'master-key.aes"}',
    "-machine", "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram", "-accel", "tcg",
    "-cpu", "qemu64", "-m", "512", "-object", '{"qom-type":"memory-backend-ram","id":"pc.ram","size":536870912}',
    "-overcommit", "mem-lock=off", "-smp", "1,sockets=1,cores=1,threads=1",
    "-uuid", "9c7a3ce7-5b90-4399-9f9f-4b6f4bf72138", "-display", "none", "-no-user-config", "-nodefaults",
    "-chardev", "socket,id=charmonitor,fd=31,server=on,wait=off", "-mon", "chardev=charmonitor,id=monitor,mode=control",
    "-rtc", "base=utc", "-no-shutdown", "-no-acpi", "-boot", "strict=on",
    "-kernel", "/root/.cache/nephoscope/images/clean-321108ac7257fbaf/vmlinuz",
    "-initrd", "/root/.cache/nephoscope/images/clean-321108ac7257fbaf/initrd.cpio",
    "-append", "console=ttyS0,115200 panic=-1 loglevel=4 kaslr",
    "-device", '{"driver":"virtio-serial-pci","id":"virtio-serial0","bus":"pci.0","addr":"0x3"}',
    "-netdev", '{"type":"user","id":"hostnet0"}',
    "-device", '{"driver":"e1000","netdev":"hostnet0","id":"net0","mac":"52:54:00:d7:97:57","bus":"pci.0",'
    '"addr":"0x2"}',
    "-add-fd", "set=0,fd=30,opaque=serial0-source", "-chardev", "file,id=charserial0,path=/dev/fdset/0,append=on",
    "-device", '{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}',
    "-chardev", "socket,id=charchannel0,fd=29,server=on,wait=off",
    "-device", '{"driver":"virtserialport","bus":"virtio-serial0.0","nr":1,"chardev":"charchannel0","id":"channel0",'
    '"name":"org.qemu.guest_agent.0"}',
    "-audiodev", '{"id":"audio1","driver":"none"}',
    "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny", "-msg", "timestamp=on",
]


def lab_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], runner.Guest]:
    monkeypatch.setenv("NEPHOSCOPE_RUN", str(tmp_path / "run"))
    guest = runner.Guest(name="web1", profile="clean", pid=4242, mem_mib=512, smp=1, kaslr=True, accel="tcg",
                         cpu="qemu64", gdb_port=40123, http_port=40124, ssh_port=40125, image=str(tmp_path),
                         started=0.0)
    return runner.qemu_command(guest, Image(tmp_path)), guest


def test_split_options_handles_escapes_json_and_shorthand() -> None:
    assert d.split_options("socket,id=a,path=/x,,y,server,nowait") == {
        "": "socket", "id": "a", "path": "/x,y", "server": "on", "nowait": "on"}
    assert d.split_options('{"qom-type":"memory-backend-ram","id":"pc.ram"}')["qom-type"] == "memory-backend-ram"
    assert d.split_options("{not json") == {}


def test_the_labs_own_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv, guest = lab_argv(tmp_path, monkeypatch)
    proc = d.parse_qemu_cmdline(argv, 4242)
    assert proc is not None
    assert proc.lab_name == "web1" and not proc.libvirt
    assert proc.qmp_sockets == [guest.qmp_socket]
    assert proc.qga_socket == guest.qga_socket and proc.agent_channel
    assert proc.gdb_port == 40123
    assert proc.ram_files == [guest.ram_path] and proc.memory_backends == ["memory-backend-file"]
    assert proc.mem == "512M" and proc.pidfile == guest.directory / "qemu.pid"


def test_a_libvirt_command_line_is_libvirt_held() -> None:
    proc = d.parse_qemu_cmdline(LIBVIRT_ARGV, 5960)
    assert proc is not None
    assert proc.name == "virt-try" and proc.uuid == "9c7a3ce7-5b90-4399-9f9f-4b6f4bf72138"
    assert proc.libvirt and proc.lab_name is None
    assert proc.qmp_sockets == [] and proc.qga_socket is None and proc.agent_channel  # the agent is on an fd
    assert proc.ram_files == [] and proc.memory_backends == ["memory-backend-ram"]
    assert proc.gdb is None and proc.mem == "512"


def test_hand_written_qemu_command_lines() -> None:
    proc = d.parse_qemu_cmdline(["qemu-system-x86_64", "-m", "size=4608M", "-s", "-qmp",
                                 "unix:/tmp/q.sock,server,nowait", "-monitor", "unix:/tmp/h.sock,server",
                                 "-chardev", "socket,id=m2,path=/tmp/m2.sock,server=on",
                                 "-mon", "chardev=m2,mode=control", "-mem-path", "/dev/hugepages/x",
                                 "-name", "db1,process=db1"], 7)
    assert proc is not None
    assert proc.name == "db1" and proc.mem == "4608M" and proc.gdb_port == 1234
    assert proc.qmp_sockets == [Path("/tmp/q.sock"), Path("/tmp/m2.sock")]
    assert proc.hmp_sockets == [Path("/tmp/h.sock")] and proc.ram_files == [Path("/dev/hugepages/x")]
    assert not proc.agent_channel and not proc.libvirt


@pytest.mark.parametrize("argv", [[], ["/usr/bin/python3", "-m", "x"], ["qemu-img", "info"]])
def test_not_a_qemu_system_emulator(argv: list[str]) -> None:
    assert d.parse_qemu_cmdline(argv, 1) is None


def test_hostile_command_lines_do_not_crash() -> None:
    for argv in (["qemu-system-x86_64", "-chardev"], ["qemu-system-x86_64", "-device", "{"],
                 ["qemu-system-x86_64", "-gdb", "tcp:::::x"], ["qemu-system-x86_64", "-object", '{"qom-type":1}'],
                 ["qemu-system-x86_64", "-chardev", '{"id":"a","backend":{"type":"socket","data":7}}']):
        d.parse_qemu_cmdline(argv, 1)


def fake_proc(root: Path, procs: dict[int, list[str]]) -> Path:
    for pid, argv in procs.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (root / "self").mkdir()
    return root


def test_discover_claims_libvirt_held_qemus_and_names_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    argv, _guest = lab_argv(tmp_path, monkeypatch)
    proc_root = fake_proc(tmp_path / "proc", {4242: argv, 5960: LIBVIRT_ARGV, 77: ["/bin/bash"],
                                              88: ["qemu-system-x86_64", "-m", "1G"]})
    monkeypatch.setenv("NEPHOSCOPE_LIBVIRT_URI", "test:///nonexistent-virt-unit")
    found = d.discover(proc_root=proc_root)
    by_name = {vm.name: vm for vm in found.vms}
    assert set(by_name) == {"web1", "virt-try", "pid:88"}
    assert "libvirt" in found.skipped  # the test URI cannot be opened: said, not silent
    assert by_name["web1"].kind == "lab" and by_name["web1"].target.qmp_socket is None  # no live socket in tmp
    held = by_name["virt-try"]
    assert held.kind == "qemu" and held.details["libvirt_held"]
    assert "held by libvirtd" in (held.methods["trap"] or "")
    assert by_name["pid:88"].methods["agent"] == "no guest agent channel (org.qemu.guest_agent.0)"
    assert found.find("pid:88") is by_name["pid:88"] and found.find("nope") is None


def test_capabilities_say_why_not() -> None:
    dump = d.capabilities(VmTarget("x.elf", ram_path=Path("/x.elf"), live=False))
    assert dump["arch"] is None and dump["inspect"] is None and dump["agent"]
    bare = d.capabilities(VmTarget("v", qemu_pid=1), agent_channel=False, monitor="no QMP socket")
    assert bare["agent"] and "no QMP socket" in (bare["trap"] or "")
    if d.process_ram_reader() is None:
        assert "needs the conn connector" in (bare["arch"] or "")
    shared = d.capabilities(VmTarget("l", ram_path=Path("/dev/shm/x"), qmp_socket=Path("/q"), gdb_port=1,
                                     qemu_pid=3), agent_channel=True)
    assert shared["arch"] is None and shared["trap"] is None and shared["checkpoint"] is None
    assert shared["agent"] == "the guest agent channel is not on a chardev socket nephoscope can reach"
    via_libvirt = d.capabilities(VmTarget("d", domain="u", qemu_pid=3), agent_channel=True)
    assert via_libvirt["agent"] is None


def test_domain_xml_parse() -> None:
    xml = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>a</name>
      <memory unit='KiB'>524288</memory><memoryBacking><source type='memfd'/></memoryBacking>
      <devices><channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
      </channel></devices><qemu:commandline><qemu:arg value='-gdb'/><qemu:arg value='tcp:127.0.0.1:5555'/>
      </qemu:commandline></domain>"""
    info = parse_domain_xml(xml, "a", "u-1", "running", 9)
    assert info.agent_channel and info.agent_connected and info.memory_source == "memfd"
    assert info.memory_kib == 524288 and info.gdb == "tcp:127.0.0.1:5555"
    bare = parse_domain_xml("<domain><name>b</name></domain>", "b", "u-2", "shutoff", None)
    assert not bare.agent_channel and bare.agent_connected is None and bare.gdb is None


def test_argv_fixture_is_what_libvirt_ran() -> None:
    # the captured argv round-trips through JSON like /proc/PID/cmdline does through NUL splitting
    assert json.loads(json.dumps(LIBVIRT_ARGV)) == LIBVIRT_ARGV
