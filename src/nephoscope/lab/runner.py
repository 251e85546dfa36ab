"""Start, stop and list lab guests: QEMU with shared RAM, QMP, guest agent, gdbstub and a serial log.

A guest's RAM is a shared file in /dev/shm by default (`ram="file"`, the fast path); `ram="anon"` starts
QEMU with ordinary anonymous RAM (`-m SIZE` only) and `ram="memfd"` with `memory-backend-memfd`, as a
provider's VMs run: then nephoscope reads guest RAM from the QEMU process itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nephoscope.core.errors import LabError
from nephoscope.lab.manifest import parse_report

if TYPE_CHECKING:
    from nephoscope.lab.build import Image

RAM_KINDS = ("file", "anon", "memfd", "hugetlb")
MAX_FILE_MIB = 3072  # a shared RAM file maps offset = gpa only below the PCI hole
MAX_MIB = 16384
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
READY_MARK = "NPH-READY"
DEFAULT_MEM = "512M"
DISK_TIMEOUT = 900.0  # a disk guest under TCG on a loaded 2-core host: systemd took 50 s idle, allow for load
Progress = Callable[[str], None]


def run_root() -> Path:
    """Return where running guests keep sockets and state (NEPHOSCOPE_RUN, default /run/nephoscope)."""
    default = "/run/nephoscope" if os.geteuid() == 0 else f"/tmp/nephoscope-{os.geteuid()}"
    return Path(os.environ.get("NEPHOSCOPE_RUN", default))


def parse_size(text: str, ram: str = "file") -> int:
    """Parse a memory size such as 512M or 1G into MiB (above 3G only for process RAM: `ram` anon/memfd)."""
    m = re.fullmatch(r"\s*(\d+)\s*([MmGg]?)i?[Bb]?\s*", text)
    if not m:
        raise LabError(f"cannot read memory size {text!r}; use e.g. 512M or 1G")
    value = int(m.group(1)) * (1024 if m.group(2).lower() == "g" else 1)
    if ram == "file" and not 128 <= value <= MAX_FILE_MIB:
        raise LabError(f"memory {text} is outside 128M..3G (a shared RAM file keeps all RAM below the PCI "
                       "hole; use --ram anon or memfd for larger guests)")
    if not 128 <= value <= MAX_MIB:
        raise LabError(f"memory {text} is outside 128M..16G")
    return value


class GuestFiles:
    """The files every lab guest keeps in its state directory (serial log, ground-truth manifest)."""

    __slots__ = ()

    @property
    def directory(self) -> Path:
        raise NotImplementedError

    @property
    def serial_log(self) -> Path:
        return self.directory / "serial.log"

    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.json"

    def manifest(self) -> dict:
        """Return the ground-truth manifest (for tests and evaluations only)."""
        return dict(json.loads(self.manifest_path.read_text()))


@dataclass(slots=True)
class Guest(GuestFiles):
    """A lab guest's runtime description (state.json in its run directory)."""

    name: str
    profile: str
    pid: int
    mem_mib: int
    smp: int
    kaslr: bool
    accel: str
    cpu: str
    gdb_port: int
    http_port: int
    ssh_port: int
    image: str
    started: float
    ram: str = "file"  # file (shared /dev/shm file), anon (plain -m) or memfd (memory-backend-memfd)
    tap: str = ""  # tap networking: the host's tap device (QEMU opens it; "" = user networking with hostfwd)
    netns: str = ""  # the network namespace QEMU runs in (holding the tap), "" = the host's
    arch_events: bool = False  # started with the archevents TCG plugin (docs/arch-events.md)
    arch_events_writes: bool = True  # the plugin tracks stores (executed-after-written events); off: cheaper

    @property
    def directory(self) -> Path:
        return run_root() / self.name

    @property
    def qmp_socket(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def qga_socket(self) -> Path:
        return self.directory / "qga.sock"

    @property
    def console_socket(self) -> Path:
        return self.directory / "console.sock"

    @property
    def arch_events_socket(self) -> Path:
        """Return the archevents plugin's listening socket (present only for guests started with it)."""
        return self.directory / "archevents.sock"

    @property
    def ram_path(self) -> Path | None:
        """Return the shared RAM file (None when RAM lives only in the QEMU process: anon, memfd)."""
        return _ram_file(self.name) if self.ram == "file" else None

    def alive(self) -> bool:
        """Return whether this guest's QEMU process still runs."""
        return _qemu_alive(self.pid, self.name)


def _ram_file(name: str) -> Path:
    return Path("/dev/shm") / f"nephoscope-{name}.ram"


def _qemu_alive(pid: int, name: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"qemu-system" in cmdline and f"nephoscope-{name}".encode() in cmdline


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_port(port: int, what: str) -> int:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise LabError(f"{what} port {port} on 127.0.0.1 is busy ({exc.strerror}); "
                           "choose another or leave it out to pick a free one") from exc
    return port


def load_guest(name: str) -> Guest | None:
    """Return the recorded state of guest `name`, or None."""
    state = run_root() / name / "state.json"
    try:
        data = json.loads(state.read_text())
        known = {f.name for f in dataclasses.fields(Guest)}
        # state written by a newer nephoscope may carry fields this one does not know: keep what it knows
        return Guest(**{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _qemu_of(directory: Path) -> bool:
    """Return whether a QEMU process of the guest with run directory `directory` still runs.

    Asked before a directory whose state cannot be read is removed: the state may be half-written, or
    written by another nephoscope version, while its QEMU (named in qemu.pid and its command line) runs."""
    try:
        pid = int((directory / "qemu.pid").read_text().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid and _qemu_alive(pid, directory.name):
        return True
    needle = str(directory).encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and needle in cmdline:
            return True
    return False


def get_guest(name: str) -> Guest:
    """Return running guest `name` or raise LabError naming the running ones."""
    guest = load_guest(name)
    if guest is None or not guest.alive():
        running = ", ".join(g.name for g in list_guests() if g.alive()) or "none"
        raise LabError(f"no running lab guest {name!r} (running: {running}); start one with `nephoscope lab up {name}`")
    return guest


def list_guests() -> list[Guest]:
    """Return every guest with a run directory (running or stale)."""
    root = run_root()
    if not root.is_dir():
        return []
    return [g for d in sorted(root.iterdir()) if (g := load_guest(d.name)) is not None]


def _cleanup(name: str, only_unused_ram: bool = False) -> None:
    shutil.rmtree(run_root() / name, ignore_errors=True)
    ram = _ram_file(name)
    if not (only_unused_ram and _in_use(ram)):
        ram.unlink(missing_ok=True)


def _in_use(path: Path) -> bool:
    """Return whether any process has `path` open or mapped (checked through /proc)."""
    target = str(path)
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if any(target in line for line in (proc / "maps").read_text(errors="replace").splitlines()):
                return True
            if any(os.readlink(fd).startswith(target) for fd in (proc / "fd").iterdir()):
                return True
        except OSError:
            continue
    return False


def cleanup_stale() -> list[str]:
    """Remove sockets, state and shared RAM of guests whose QEMU is gone; return their names."""
    stale = []
    root = run_root()
    if root.is_dir():
        for d in root.iterdir():
            guest = load_guest(d.name)
            if guest is None or not guest.alive():
                # a directory without state may be a start in progress; leave young ones alone
                if guest is None and (time.time() - d.stat().st_mtime < 300 or _qemu_of(d)):
                    continue
                _cleanup(d.name, only_unused_ram=True)
                stale.append(d.name)
    for ram in Path("/dev/shm").glob("nephoscope-*.ram"):
        name = ram.name.removeprefix("nephoscope-").removesuffix(".ram")
        # a RAM file is stale only when no process uses it: another NEPHOSCOPE_RUN, a checkpoint copy in
        # progress or a QEMU started by hand may own it
        if not (root / name).exists() and not _in_use(ram):
            ram.unlink(missing_ok=True)
            stale.append(name)
    return sorted(set(stale))


def qemu_command(guest: Guest, image: Image) -> list[str]:
    """Return the QEMU argv for `guest` booting `image`."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise LabError("qemu-system-x86_64 is missing; run `make setup`")
    d = guest.directory
    append = "console=ttyS0,115200 panic=-1 loglevel=4 " + ("kaslr" if guest.kaslr else "nokaslr")
    if guest.ram == "file":
        ram = ["-machine", "pc,memory-backend=ram0", "-object",
               f"memory-backend-file,id=ram0,size={guest.mem_mib}M,mem-path={guest.ram_path},share=on"]
    elif guest.ram == "memfd":
        ram = ["-machine", "pc,memory-backend=ram0", "-object",
               f"memory-backend-memfd,id=ram0,size={guest.mem_mib}M,share=on"]
    elif guest.ram == "hugetlb":  # 2 MiB huge pages from the host's pool (vm.nr_hugepages), no hugetlbfs mount
        ram = ["-machine", "pc,memory-backend=ram0", "-object",
               f"memory-backend-memfd,id=ram0,size={guest.mem_mib}M,share=on,hugetlb=on,hugetlbsize=2M"]
    else:  # anon: QEMU's default, RAM is an anonymous mapping of the QEMU process
        ram = ["-machine", "pc"]
    gdb = ["-gdb", f"tcp:127.0.0.1:{guest.gdb_port}"] if guest.gdb_port else []
    boot = ["-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append]
    if image.is_disk:  # a Debian system on its disk: its own kernel and initramfs, root on the virtio disk
        from nephoscope.lab.server import disk_append

        boot = ["-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", disk_append(guest.kaslr),
                "-drive", f"file={d / 'disk.qcow2'},if=virtio,format=qcow2,cache=unsafe"]
    return [
        qemu, "-name", f"nephoscope-{guest.name}", *ram, "-accel", guest.accel, "-cpu", guest.cpu,
        "-m", f"{guest.mem_mib}M", "-smp", str(guest.smp),
        *boot,
        "-display", "none", "-monitor", "none", "-nodefaults", "-no-reboot",
        "-chardev", f"socket,id=ser0,path={guest.console_socket},server=on,wait=off,logfile={guest.serial_log}",
        "-serial", "chardev:ser0",
        "-qmp", f"unix:{guest.qmp_socket},server=on,wait=off",
        "-chardev", f"socket,id=qga0,path={guest.qga_socket},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        *gdb,
        "-netdev", (f"tap,id=net0,ifname={guest.tap},script=no,downscript=no" if guest.tap else
                    f"user,id=net0,hostfwd=tcp:127.0.0.1:{guest.http_port}-:80,"
                    f"hostfwd=tcp:127.0.0.1:{guest.ssh_port}-:22"),
        "-device", "e1000,netdev=net0",
        "-pidfile", str(d / "qemu.pid"),
        *_plugin_args(guest),
    ]


def launch_argv(guest: Guest, argv: list[str]) -> list[str]:
    """Return `argv` run inside the guest's network namespace when it has one (`ip netns exec` execs QEMU)."""
    return ["ip", "netns", "exec", guest.netns, *argv] if guest.netns else argv


def _plugin_args(guest: Guest) -> list[str]:
    """Return `-plugin` for the archevents TCG plugin (TCG with a file or memfd RAM backend only)."""
    if not guest.arch_events:
        return []
    if guest.accel != "tcg":
        raise LabError("--arch-events needs TCG (a QEMU plugin sees only translated code; KVM hosts use periodic "
                       "arch scans and trap)")
    if guest.ram not in ("file", "memfd"):
        raise LabError("--arch-events needs --ram file or memfd (the plugin finds guest RAM by its mapping)")
    from nephoscope.lab.plugin import build_plugin

    ram = str(guest.ram_path) if guest.ram == "file" else "memfd:ram0"
    writes = "on" if guest.arch_events_writes else "off"
    return ["-plugin", f"{build_plugin()},sock={guest.arch_events_socket},ram={ram},writes={writes}"]


def check_name(name: str) -> None:
    """Raise LabError unless `name` is a valid guest name."""
    if not NAME_RE.match(name):
        raise LabError(f"guest name {name!r} must be 1-32 letters, digits, '.', '_' or '-'")


def start(name: str, image: Image, *, mem: str | None = None, smp: int = 1, kaslr: bool = True,
          accel: str = "tcg", cpu: str = "qemu64", http_port: int | None = None, gdb_port: int | None = None,
          timeout: float | None = None, progress: Progress = lambda _m: None, ram: str = "file",
          gdb: bool = True, tap: str = "", netns: str = "", arch_events: bool = False,
          arch_events_writes: bool = True) -> Guest:
    """Boot `image` as guest `name`, wait until its init reports ready, and write its manifest.

    `mem` None takes the profile's default (512M; disk profiles 1G); `timeout` None waits 180 s for an
    initramfs guest and DISK_TIMEOUT for a disk guest (systemd under TCG is slow: ready = agent answers,
    `systemctl is-system-running --wait` done, every profile unit active).

    `ram`: "file" (shared /dev/shm RAM file), "anon" (plain `-m`, RAM only in the QEMU process), "memfd", or
    "hugetlb" (memfd on 2 MiB huge pages from vm.nr_hugepages);
    `gdb` False starts no gdbstub (trap/watch then start one on demand through the monitor);
    `tap` attaches the guest's NIC to that existing tap device (in `netns`, where QEMU then runs) instead of
    user networking: the guest gets no DHCP there, so the caller configures its address (`set_address`).
    `arch_events` loads the archevents TCG plugin (its socket: `Guest.arch_events_socket`), tracking stores
    unless `arch_events_writes` is false."""
    check_name(name)
    if ram not in RAM_KINDS:
        raise LabError(f"--ram must be one of {', '.join(RAM_KINDS)}, not {ram!r}")
    if smp < 1 or smp > 8:
        raise LabError("--smp must be between 1 and 8")
    cleanup_stale()
    existing = load_guest(name)
    if existing is not None and existing.alive():
        raise LabError(f"guest {name!r} is already running (pid {existing.pid}); "
                       f"use `nephoscope lab down {name}` first or pick another name")
    mem_mib = parse_size(mem or image.meta.get("mem") or DEFAULT_MEM, ram)
    timeout = timeout or (DISK_TIMEOUT if image.is_disk else 180.0)
    gdb_at = 0 if not gdb else _check_port(gdb_port, "gdbstub") if gdb_port else _free_port()
    http = _check_port(http_port, "web") if http_port else _free_port()
    ssh = _free_port()
    guest = Guest(name=name, profile=image.meta["profile"], pid=0, mem_mib=mem_mib, smp=smp, kaslr=kaslr,
                  accel=accel, cpu=cpu, gdb_port=gdb_at, http_port=http, ssh_port=ssh,
                  image=str(image.directory), started=time.time(), ram=ram, tap=tap, netns=netns,
                  arch_events=arch_events, arch_events_writes=arch_events_writes)
    try:
        guest.directory.mkdir(parents=True, exist_ok=False)
    except FileExistsError as exc:
        raise LabError(f"guest {name!r} is being started by another command (or {guest.directory} "
                       "is left over; `nephoscope lab down` removes it)") from exc
    try:
        if image.is_disk:
            from nephoscope.lab.server import make_overlay

            make_overlay(image, guest.directory)
        argv = launch_argv(guest, qemu_command(guest, image))
        (guest.directory / "qemu.argv").write_text(json.dumps(argv))
        with (guest.directory / "qemu.log").open("wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        guest.pid = proc.pid
        (guest.directory / "state.json").write_text(json.dumps(asdict(guest), indent=1))
        progress(f"qemu pid {proc.pid} booting {image.meta['kernel']['release']}")
        if image.is_disk:
            manifest = _disk_ready(guest, image, proc, timeout, progress)
        else:
            report = _wait_ready(guest, proc, timeout, progress)
            manifest = parse_report(report, guest, image)
        guest.manifest_path.write_text(json.dumps(manifest, indent=1))
        return guest
    except BaseException:
        stop(name, quiet=True)
        raise


def _disk_ready(guest: Guest, image: Image, proc: subprocess.Popen, timeout: float, progress: Progress) -> dict:
    """Wait for a disk guest's agent and systemd, then read its ground truth through the agent."""
    from nephoscope.hypervisor.qga import GuestAgent
    from nephoscope.lab import server

    def stopped() -> str | None:
        if proc.poll() is None:
            return None
        log = (guest.directory / "qemu.log").read_text(errors="replace")[-800:].strip()
        return f"QEMU exited with status {proc.returncode} before the guest was ready: {log}"

    units = [s["unit"] for s in image.meta.get("services", [])]
    server.wait_ready(lambda: GuestAgent(guest.qga_socket, timeout=5), units, timeout, guest.serial_log,
                      stopped, progress)
    return server.disk_manifest(guest, image, lambda: GuestAgent(guest.qga_socket, timeout=120),
                                progress=progress)


def _wait_ready(guest: Guest, proc: subprocess.Popen, timeout: float, progress: Progress) -> str:
    deadline = time.monotonic() + timeout
    stage = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = (guest.directory / "qemu.log").read_text(errors="replace")[-800:]
            raise LabError(f"QEMU exited with status {proc.returncode} before the guest was ready: {log.strip()}")
        text = guest.serial_log.read_text(errors="replace") if guest.serial_log.exists() else ""
        if READY_MARK in text:
            return text
        stages = re.findall(r"NPH-STAGE (\w+)", text)
        if stages and stages[-1] != stage:
            stage = stages[-1]
            progress(f"guest init: {stage}")
        if "Kernel panic" in text:
            raise LabError("guest kernel panicked: " + text[text.index("Kernel panic"):][:400])
        time.sleep(0.1)
    raise LabError(f"guest {guest.name} was not ready after {timeout:.0f}s; see {guest.serial_log}")


def set_address(guest: Guest, cidr: str, gateway: str = "", timeout: float = 60.0) -> None:
    """Give a tap-networked guest a static IPv4 address on its first ethernet NIC through its agent."""
    from nephoscope.hypervisor.qga import GuestAgent

    with GuestAgent(guest.qga_socket, timeout=timeout) as agent:
        rc, out, err = agent.exec(["/bin/sh", "-c", "ls /sys/class/net | grep -E '^(en|eth)' | head -1"])
        nic = out.decode().strip()
        if rc != 0 or not nic:
            raise LabError(f"guest {guest.name} has no ethernet interface: {err.decode(errors='replace')[:200]}")
        script = f"ip link set {nic} up && ip addr replace {cidr} dev {nic}"
        if gateway:
            script += f" && ip route replace default via {gateway}"
        rc, _out, err = agent.exec(["/bin/sh", "-c", script])
        if rc != 0:
            raise LabError(f"cannot set {cidr} on {guest.name}:{nic}: {err.decode(errors='replace')[:300]}")
    (guest.directory / "address.json").write_text(json.dumps({"cidr": cidr, "gateway": gateway, "nic": nic}))


def find_address(guest: Guest) -> str | None:
    """Return the IPv4 address `set_address` gave a tap-networked guest, or None."""
    try:
        return str(json.loads((guest.directory / "address.json").read_text())["cidr"]).split("/")[0]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def guest_for(name: str | None, profile: str = "clean", **options: object) -> Iterator[Guest]:
    """Yield running guest `name`, or boot a throw-away one of `profile` and always stop it afterwards."""
    if name is not None:
        yield get_guest(name)
        return
    from nephoscope.lab.build import build_image
    from nephoscope.lab.profile import load_profile

    name = f"tmp-{profile}-{os.getpid()}"
    guest = start(name, build_image(load_profile(profile)), **options)  # type: ignore[arg-type]
    try:
        yield guest
    finally:
        stop(name, quiet=True)


def stop(name: str, quiet: bool = False) -> bool:
    """Stop guest `name` (QMP quit, then signals) and remove everything it left; return if it ran."""
    guest = load_guest(name)
    ran = False
    if guest is not None and guest.pid and guest.alive():
        ran = True
        with contextlib.suppress(Exception):
            from nephoscope.hypervisor.qmp import Qmp

            with Qmp(guest.qmp_socket, timeout=3) as qmp:
                qmp.command("quit")
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(guest.pid, sig)
            for _ in range(50):
                if not guest.alive():
                    break
                time.sleep(0.05)
            if not guest.alive():
                break
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(guest.pid, os.WNOHANG)
    elif guest is None and not (run_root() / name).exists() and not quiet:
        raise LabError(f"no lab guest {name!r}; `nephoscope lab list` shows the known ones")
    _cleanup(name)
    return ran
