"""Throw-away clones of a running QEMU VM: same devices, copied RAM, network cut, discarded after use.

The source VM is paused only while its RAM is copied (into a pre-faulted buffer) and its device state
is migrated to a file with `x-ignore-shared` (shared RAM is not streamed); then it resumes. A second
QEMU with the same command line — but the RAM copy, fresh sockets, no gdbstub and a restricted user
network — loads that state with `-incoming defer` and runs on its own.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from nephoscope.core.errors import ConnectorError
from nephoscope.hypervisor.qmp import Qmp

IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]
_VALUED = {"-name", "-object", "-chardev", "-qmp", "-netdev", "-pidfile", "-gdb", "-incoming", "-machine", "-accel",
           "-cpu", "-m", "-smp", "-kernel", "-initrd", "-append", "-display", "-monitor", "-serial", "-device",
           "-drive", "-nic", "-smbios", "-bios", "-boot", "-global", "-fw_cfg", "-rtc", "-vga", "-plugin", "-L"}


def qemu_argv(pid: int) -> list[str]:
    """Return the command line of QEMU process `pid`."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError as exc:
        raise ConnectorError(f"cannot read QEMU's command line (pid {pid}): {exc}") from exc
    argv = [a.decode() for a in raw.split(b"\0") if a]
    if not argv or "qemu-system" not in Path(argv[0]).name:
        raise ConnectorError(f"pid {pid} is not a QEMU process")
    return argv


def _rewrite(option: str, value: str, work: Path, ram_copy: Path) -> str | None:
    parts = value.split(",")
    if option == "-object" and parts[0] == "memory-backend-file":
        return ",".join(f"mem-path={ram_copy}" if p.startswith("mem-path=") else p for p in parts)
    if option == "-chardev":
        out = []
        for p in parts:
            if p.startswith("path="):
                p = f"path={work / Path(p[5:]).name}"
            elif p.startswith("logfile="):
                p = f"logfile={work / 'serial.log'}"
            elif p.startswith(("port=", "host=")):
                return None  # TCP chardevs would collide with the source's ports
            out.append(p)
        return ",".join(out)
    if option == "-qmp":
        return f"unix:{work / 'qmp.sock'},server=on,wait=off"
    if option == "-netdev":
        kept = [p for p in parts if not p.startswith(("hostfwd=", "guestfwd="))]
        return ",".join(kept) + ",restrict=on" if parts[0] == "user" else None
    if option == "-name":
        return value + "-clone"
    if option == "-pidfile":
        return str(work / "qemu.pid")
    return value


def clone_argv(argv: list[str], work: Path, ram_copy: Path) -> list[str]:
    """Return the clone's command line: same machine, RAM copy, new sockets, no gdbstub, network cut."""
    if not any(a.startswith("memory-backend-file") and "share=on" in a for a in argv):
        raise ConnectorError("the VM's RAM is not a shared memory-backend-file; it cannot be cloned cheaply")
    out = [argv[0]]
    i = 1
    while i < len(argv):
        option = argv[i]
        if option in _VALUED and i + 1 < len(argv):
            value = argv[i + 1]
            i += 2
            if option in ("-gdb", "-incoming", "-daemonize"):
                continue
            new = _rewrite(option, value, work, ram_copy)
            if new is not None:
                out += [option, new]
        else:
            if option not in ("-daemonize", "-S"):
                out.append(option)
            i += 1
    if "-qmp" not in out:
        out += ["-qmp", f"unix:{work / 'qmp.sock'},server=on,wait=off"]
    return [*out, "-incoming", "defer"]


def _wait_migration(qmp: Qmp, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = qmp.command("query-migrate").get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise ConnectorError(f"migration {status}: {qmp.command('query-migrate').get('error-desc', '')}")
        time.sleep(0.005)
    raise ConnectorError(f"migration did not complete within {timeout:.0f}s")


def save_device_state(qmp: Qmp, state_file: Path, timeout: float = 30.0) -> None:
    """Migrate a paused VM's device state (not its shared RAM) into `state_file`."""
    qmp.command("migrate-set-capabilities", capabilities=IGNORE_SHARED)
    qmp.command("migrate", uri=f"exec:cat > {state_file}")
    _wait_migration(qmp, timeout)


class Clone:
    """A running throw-away clone; use as a context manager (it is killed and its files removed)."""

    def __init__(self, argv: list[str], work: Path, state_file: Path, timeout: float = 60.0) -> None:
        self.work = work
        self.argv = argv
        self.qmp_socket = work / "qmp.sock"
        self.qga_socket = work / "qga.sock"
        with (work / "qemu.log").open("wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            deadline = time.monotonic() + 10
            while not self.qmp_socket.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise ConnectorError("the clone's QEMU did not start: "
                                         + (work / "qemu.log").read_text(errors="replace")[-400:])
                time.sleep(0.02)
            with Qmp(self.qmp_socket) as qmp:
                qmp.command("migrate-set-capabilities", capabilities=IGNORE_SHARED)
                qmp.command("migrate-incoming", uri=f"exec:cat {state_file}")
                _wait_migration(qmp, timeout)
                qmp.command("cont")
        except BaseException:
            self.close()
            raise

    def wait_agent(self, timeout: float = 15.0) -> None:
        """Wait until the guest agent inside the clone answers (its channel reconnects after the restore)."""
        from nephoscope.hypervisor.qga import GuestAgent

        deadline = time.monotonic() + timeout
        while True:
            try:
                with GuestAgent(self.qga_socket, timeout=2):
                    return
            except ConnectorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        """Kill the clone and remove its files."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception), Qmp(self.qmp_socket, timeout=2) as qmp:
                qmp.command("quit")
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> Clone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_workdir(name: str) -> Path:
    """Return a fresh directory in /dev/shm for a clone's RAM copy, state and sockets."""
    return Path(tempfile.mkdtemp(prefix=f"nephoscope-clone-{name}-", dir="/dev/shm"))
