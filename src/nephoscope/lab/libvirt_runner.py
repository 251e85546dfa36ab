"""Lab guests as libvirt domains: start the libvirt daemons where no init does, boot a transient TCG domain.

The domain boots the same kernel + initramfs as a plain lab guest (`runner.qemu_command`), but the way a
provider's VMs run: `<domain type='qemu'>`, plain anonymous RAM (no memory-backend-file), the guest agent on
the `org.qemu.guest_agent.0` virtio-serial channel held by libvirtd, and the serial console in a file so the
init's ground-truth report becomes the manifest. Transient: `destroy` removes it from libvirt entirely.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from nephoscope.core.errors import ConnectorError, LabError
from nephoscope.lab import runner
from nephoscope.lab.build import Image
from nephoscope.lab.manifest import parse_report

LIBVIRTD_PID = Path("/run/libvirtd.pid")
VIRTLOGD_PID = Path("/run/virtlogd.pid")
LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")


def state_root() -> Path:
    """Return where libvirt lab domains keep their state (beside the lab's run root, never inside it)."""
    root = runner.run_root()
    return root.with_name(root.name + "-libvirt")


# ---------------------------------------------------------------------------------------------- daemons

def _pid_alive(pid_file: Path, comm: str) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        return pid if Path(f"/proc/{pid}/comm").read_text().strip() == comm else None
    except (OSError, ValueError):
        return None


def daemon_status() -> dict[str, int | None]:
    """Return the pids of running virtlogd and libvirtd (None where one is not running)."""
    return {"virtlogd": _pid_alive(VIRTLOGD_PID, "virtlogd") if VIRTLOGD_SOCK.exists() else None,
            "libvirtd": _pid_alive(LIBVIRTD_PID, "libvirtd") if LIBVIRT_SOCK.exists() else None}


def _start(binary: str, pid_file: Path, sock: Path, comm: str, timeout: float = 15.0) -> int:
    exe = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if exe is None:
        raise LabError(f"{binary} is missing; run scripts/setup.sh (installs libvirt-daemon, "
                       "libvirt-daemon-driver-qemu)")
    # without libvirt-daemon-system nothing creates the log directory, and libvirtd gives up without it
    Path("/var/log/libvirt/qemu").mkdir(parents=True, exist_ok=True)
    done = subprocess.run([exe, "-d"], capture_output=True, text=True, timeout=timeout, check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = _pid_alive(pid_file, comm)
        if pid is not None and sock.exists():
            return pid
        time.sleep(0.1)
    log = Path(f"/var/log/libvirt/{binary}.log")
    tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
    raise LabError(f"{binary} did not start (exit {done.returncode}: {done.stderr.strip()[:200]}); "
                   f"{' | '.join(tail)[:400]} — scripts/setup.sh creates the libvirt-qemu user it needs")


def start_daemons() -> list[int]:
    """Start virtlogd and libvirtd (system instances) where not running; return the pids this call started."""
    if os.geteuid() != 0:
        raise LabError("starting the system libvirt daemons needs root; use a host where libvirtd runs")
    started = []
    status = daemon_status()
    if status["virtlogd"] is None:
        started.append(_start("virtlogd", VIRTLOGD_PID, VIRTLOGD_SOCK, "virtlogd"))
    if status["libvirtd"] is None:
        started.append(_start("libvirtd", LIBVIRTD_PID, LIBVIRT_SOCK, "libvirtd"))
    return started


def stop_daemons(pids: list[int]) -> None:
    """Stop the daemons `start_daemons` started (by pid; libvirtd first, as it talks to virtlogd)."""
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)


@contextlib.contextmanager
def libvirt_daemons() -> Iterator[list[int]]:
    """Run with libvirtd and virtlogd available; stop afterwards only what was started here."""
    pids = start_daemons()
    try:
        yield pids
    finally:
        stop_daemons(pids)


# ---------------------------------------------------------------------------------------------- domains

@dataclass(slots=True)
class LibvirtGuest(runner.GuestFiles):
    """A lab guest that runs as a transient libvirt domain (libvirt.json in its state directory)."""

    name: str
    uuid: str
    uri: str
    profile: str
    pid: int
    mem_mib: int
    smp: int
    kaslr: bool
    cpu: str
    image: str
    started: float

    @property
    def directory(self) -> Path:
        return state_root() / self.name

    def alive(self) -> bool:
        """Return whether the domain's QEMU process still runs."""
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"qemu-system" in cmdline and f"guest={self.name},".encode() in cmdline


def interface_xml(tap: str = "", bridge: str = "") -> str:
    """Return the domain's NIC: user networking, an existing tap (`ethernet`, managed='no'), or a port of `bridge`."""
    if tap:  # libvirt opens the tap and leaves it in place when the domain goes (as OpenStack's pre-made taps)
        return f"<interface type='ethernet'><target dev='{escape(tap)}' managed='no'/><model type='e1000'/></interface>"
    if bridge:  # libvirt creates the tap (vnetN), makes it a port of the bridge and deletes it with the domain
        return f"<interface type='bridge'><source bridge='{escape(bridge)}'/><model type='e1000'/></interface>"
    return "<interface type='user'><model type='e1000'/></interface>"


def domain_xml(name: str, image: Image, directory: Path, *, mem_mib: int, smp: int, kaslr: bool,
               cpu: str = "qemu64", nic: str = "") -> str:
    """Return the transient TCG domain XML booting `image` (plain RAM, agent channel, serial to a file).

    `nic` is the `<interface>` element (`interface_xml`; default: user networking)."""
    append = "console=ttyS0,115200 panic=-1 loglevel=4 " + ("kaslr" if kaslr else "nokaslr")
    qemu = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    e = escape
    disk = ""
    if image.is_disk:  # a Debian system on its own disk (a qcow2 over the cached image), root=/dev/vda
        from nephoscope.lab.server import disk_append

        append = disk_append(kaslr)
        disk = (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='unsafe'/>"
                f"<source file='{e(str(directory / 'disk.qcow2'))}'/><target dev='vda' bus='virtio'/></disk>\n    ")
    return f"""<domain type='qemu'>
  <name>{e(name)}</name>
  <memory unit='MiB'>{mem_mib}</memory>
  <vcpu>{smp}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{e(str(image.kernel))}</kernel>
    <initrd>{e(str(image.initrd))}</initrd>
    <cmdline>{e(append)}</cmdline>
  </os>
  <cpu mode='custom' match='exact' check='none'><model fallback='allow'>{e(cpu)}</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{e(qemu)}</emulator>
    {disk}    <serial type='file'><source path='{e(str(directory / "serial.log"))}'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    {nic or interface_xml()}
    <controller type='usb' model='none'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
  <!-- the image lives in root's cache (mode 0700): this lab domain's QEMU runs as root, files unrelabelled -->
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
"""


def load(name: str) -> LibvirtGuest | None:
    """Return the recorded state of libvirt lab guest `name`, or None."""
    try:
        return LibvirtGuest(**json.loads((state_root() / name / "libvirt.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def list_guests() -> list[LibvirtGuest]:
    """Return every libvirt lab guest with a state directory (running or stale)."""
    root = state_root()
    if not root.is_dir():
        return []
    return [g for d in sorted(root.iterdir()) if (g := load(d.name)) is not None]


def start(name: str, image: Image, *, mem: str | None = None, smp: int = 1, kaslr: bool = True,
          cpu: str = "qemu64", uri: str | None = None, timeout: float | None = None,
          progress: runner.Progress = lambda _m: None, tap: str = "", bridge: str = "") -> LibvirtGuest:
    """Boot `image` as transient libvirt domain `name`, wait until it is ready, write its manifest.

    `mem` None takes the profile's default; a disk image is ready when its agent answers and systemd is up.
    `tap` (an existing tap in the host's namespace) or `bridge` replace user networking (`interface_xml`):
    the guest gets no DHCP there, so the caller sets its address through the agent."""
    from nephoscope.hypervisor import libvirt as lv

    runner.check_name(name)
    mem_mib = runner.parse_size(mem or image.meta.get("mem") or runner.DEFAULT_MEM)
    timeout = timeout or (runner.DISK_TIMEOUT if image.is_disk else 240.0)
    uri = uri or lv.default_uri()
    try:
        conn = lv.connect(uri)
    except ConnectorError as exc:
        raise LabError(str(exc)) from exc
    try:
        if lv.lookup_domain(conn, name) is not None:
            raise LabError(f"a libvirt domain {name!r} exists already; `nephoscope lab down {name}` or pick "
                           "another name")
        directory = state_root() / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        if image.is_disk:
            from nephoscope.lab.server import make_overlay

            make_overlay(image, directory)
        xml = domain_xml(name, image, directory, mem_mib=mem_mib, smp=smp, kaslr=kaslr, cpu=cpu,
                         nic=interface_xml(tap, bridge))
        (directory / "domain.xml").write_text(xml)
        try:
            dom = conn.createXML(xml, 0)
        except Exception as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise LabError(f"libvirt could not start domain {name}: {exc}") from exc
        try:
            pid = lv.domain_pid(name) or 0
            guest = LibvirtGuest(name=name, uuid=dom.UUIDString(), uri=uri, profile=image.meta["profile"], pid=pid,
                                 mem_mib=mem_mib, smp=smp, kaslr=kaslr, cpu=cpu, image=str(image.directory),
                                 started=time.time())
            (directory / "libvirt.json").write_text(json.dumps(asdict(guest), indent=1))
            progress(f"libvirt domain {name} ({guest.uuid}), qemu pid {pid}, booting "
                     f"{image.meta['kernel']['release']}")
            record = runner.Guest(name=name, profile=guest.profile, pid=pid, mem_mib=mem_mib, smp=smp, kaslr=kaslr,
                                  accel="tcg", cpu=cpu, gdb_port=0, http_port=0, ssh_port=0, image=guest.image,
                                  started=guest.started)
            if image.is_disk:
                manifest = _disk_ready(guest, record, image, dom, timeout, progress)
            else:
                report = _wait_ready(guest, dom, timeout, progress)
                manifest = parse_report(report, record, image)
            manifest["vm"]["libvirt"] = {"uuid": guest.uuid, "uri": uri}
            guest.manifest_path.write_text(json.dumps(manifest, indent=1))
            return guest
        except BaseException:
            stop(name, quiet=True)
            raise
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _disk_ready(guest: LibvirtGuest, record: runner.Guest, image: Image, dom: Any, timeout: float,
                progress: runner.Progress) -> dict[str, Any]:
    """Wait for a disk domain's agent (libvirt's channel) and systemd, then read its ground truth."""
    from nephoscope.hypervisor.libvirt import LibvirtAgentChannel
    from nephoscope.hypervisor.qga import GuestAgent
    from nephoscope.lab import server

    def stopped() -> str | None:
        try:
            if dom.isActive():
                return None
        except Exception:  # libvirt gone: the domain is as good as stopped
            pass
        log = Path(f"/var/log/libvirt/qemu/{guest.name}.log")
        tail = log.read_text(errors="replace")[-600:].strip() if log.exists() else ""
        return f"libvirt domain {guest.name} stopped before the guest was ready: {tail}"

    def agent(timeout: float) -> Callable[[], GuestAgent]:
        return lambda: GuestAgent(LibvirtAgentChannel(guest.name, guest.uri, timeout=timeout))

    units = [s["unit"] for s in image.meta.get("services", [])]
    server.wait_ready(agent(5), units, timeout, guest.serial_log, stopped, progress)
    return server.disk_manifest(record, image, agent(120), progress=progress)


def _wait_ready(guest: LibvirtGuest, dom: Any, timeout: float, progress: runner.Progress) -> str:
    deadline = time.monotonic() + timeout
    stage = ""
    while time.monotonic() < deadline:
        try:
            active = dom.isActive()
        except Exception:
            active = False
        if not active:
            log = Path(f"/var/log/libvirt/qemu/{guest.name}.log")
            tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
            raise LabError(f"libvirt domain {guest.name} stopped before the guest was ready: {tail.strip()}")
        text = guest.serial_log.read_text(errors="replace") if guest.serial_log.exists() else ""
        if runner.READY_MARK in text:
            return text
        stages = re.findall(r"NPH-STAGE (\w+)", text)
        if stages and stages[-1] != stage:
            stage = stages[-1]
            progress(f"guest init: {stage}")
        if "Kernel panic" in text:
            raise LabError("guest kernel panicked: " + text[text.index("Kernel panic"):][:400])
        time.sleep(0.1)
    raise LabError(f"libvirt domain {guest.name} was not ready after {timeout:.0f}s; see {guest.serial_log}")


def stop(name: str, quiet: bool = False, uri: str | None = None) -> bool:
    """Destroy libvirt lab domain `name` (a transient domain then disappears) and remove its state."""
    from nephoscope.hypervisor import libvirt as lv

    guest = load(name)
    ran = False
    if guest is None and not (state_root() / name).exists():
        if quiet:
            return False
        raise LabError(f"no libvirt lab guest {name!r}")
    try:
        conn = lv.connect(uri or (guest.uri if guest else None))
    except ConnectorError:
        conn = None
    if conn is not None:
        try:
            dom = lv.lookup_domain(conn, guest.uuid if guest else name)
            if dom is not None and dom.isActive():
                dom.destroy()
                ran = True
        except Exception as exc:
            if not quiet:
                raise LabError(f"libvirt could not destroy {name}: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                conn.close()
    elif guest is not None and guest.alive():
        # libvirtd is gone but its QEMU is not: end the QEMU the lab asked libvirt to start
        with contextlib.suppress(ProcessLookupError):
            os.kill(guest.pid, signal.SIGTERM)
        ran = True
    shutil.rmtree(state_root() / name, ignore_errors=True)
    return ran
