"""`nephoscope lab`: build, start, stop, list and attach to lab guests."""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import termios
import time
import tty
from dataclasses import asdict

import typer

from nephoscope.cli.render import emit_json, err_console, fail, progress, table
from nephoscope.core.errors import NephoscopeError
from nephoscope.lab import libvirt_runner, runner
from nephoscope.lab.build import build_image
from nephoscope.lab.profile import list_profiles, load_profile

app = typer.Typer(help="Build and run lab guests: real QEMU VMs from real Debian packages.", no_args_is_help=True)


@app.command("build")
def build(
    profile: str = typer.Option("clean", "--profile", "-p", help="built-in profile name or .toml path"),
    kernel: str = typer.Option(None, "--kernel", help="Debian kernel release (6.1.0-56-amd64) or vmlinuz path"),
    force: bool = typer.Option(False, "--force", help="rebuild even if the image is cached"),
    json_out: bool = typer.Option(False, "--json", help="print the image description as JSON"),
) -> None:
    """Build a guest image (kernel + initramfs) from Debian packages; cached by package versions."""
    try:
        with progress("lab build", quiet=json_out) as log:
            image = build_image(load_profile(profile), kernel, log, force=force)
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json({k: v for k, v in image.meta.items() if k != "files"} | {"directory": str(image.directory)})
        return
    table(f"image {image.directory}", ["package", "version"], sorted(image.meta["packages"].items()))
    err_console.print(f"kernel {image.meta['kernel']['release']}, initramfs "
                      f"{image.meta['initrd_bytes'] / 2**20:.1f} MiB")


@app.command("up")
def up(
    name: str = typer.Argument(..., help="guest name (letters, digits, . _ -)"),
    profile: str = typer.Option("clean", "--profile", "-p", help="built-in profile name or .toml path"),
    kernel: str = typer.Option(None, "--kernel", help="Debian kernel release or vmlinuz path"),
    kaslr: bool = typer.Option(True, "--kaslr/--no-kaslr", help="boot with kernel address randomisation"),
    mem: str = typer.Option(None, "--mem", help="guest RAM, e.g. 512M or 1G (default: the profile's, 512M; server 1G)"),
    smp: int = typer.Option(1, "--smp", help="virtual CPUs"),
    accel: str = typer.Option("tcg", "--accel", help="QEMU accelerator: tcg (default) or kvm"),
    cpu: str = typer.Option("qemu64", "--cpu", help="QEMU CPU model (max enables 5-level paging)"),
    http_port: int = typer.Option(None, "--http-port", help="host port forwarded to the guest's port 80"),
    gdb_port: int = typer.Option(None, "--gdb-port", help="host port of the gdbstub"),
    json_out: bool = typer.Option(False, "--json", help="print the guest description as JSON"),
    libvirt: bool = typer.Option(False, "--libvirt",
                                 help="boot it as a transient libvirt TCG domain (plain RAM, agent via libvirt)"),
    arch_events: bool = typer.Option(False, "--arch-events",
                                     help="load the archevents TCG plugin (first execution of every code page; "
                                          "bare QEMU + TCG only; docs/arch-events.md)"),
) -> None:
    """Build if needed and boot a guest; return once its init reports ready (manifest written)."""
    started = time.monotonic()
    if libvirt:
        _up_libvirt(name, profile, kernel, kaslr, mem, smp, cpu, json_out)
        return
    try:
        runner.check_name(name)
        with progress(f"lab up {name}", quiet=json_out) as log:
            image = build_image(load_profile(profile), kernel, log)
            guest = runner.start(name, image, mem=mem, smp=smp, kaslr=kaslr, accel=accel, cpu=cpu,
                                 http_port=http_port, gdb_port=gdb_port, progress=log, arch_events=arch_events)
    except NephoscopeError as exc:
        fail(exc)
    info = _describe(guest)
    if json_out:
        emit_json(info)
        return
    table(f"guest {name} ready in {time.monotonic() - started:.1f}s", ["", ""], list(info.items()))


def _up_libvirt(name: str, profile: str, kernel: str | None, kaslr: bool, mem: str | None, smp: int, cpu: str,
                json_out: bool) -> None:
    started = time.monotonic()
    try:
        runner.check_name(name)
        with progress(f"lab up {name} --libvirt", quiet=json_out) as log:
            _remember_daemons(libvirt_runner.start_daemons())
            image = build_image(load_profile(profile), kernel, log)
            guest = libvirt_runner.start(name, image, mem=mem, smp=smp, kaslr=kaslr, cpu=cpu, progress=log)
    except NephoscopeError as exc:
        fail(exc)
    info = {"name": guest.name, "domain": guest.name, "uuid": guest.uuid, "uri": guest.uri, "pid": guest.pid,
            "profile": guest.profile, "mem_mib": guest.mem_mib, "smp": guest.smp, "kaslr": guest.kaslr,
            "serial": str(guest.serial_log), "manifest": str(guest.manifest_path)}
    if json_out:
        emit_json(info)
        return
    table(f"libvirt guest {name} ready in {time.monotonic() - started:.1f}s", ["", ""], list(info.items()))


def _remember_daemons(pids: list[int]) -> None:
    """Record the daemons a lab command started, so `lab libvirtd --stop` stops those and only those."""
    if not pids:
        return
    path = libvirt_runner.state_root() / "daemons.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(sorted(set(known) | set(pids))))


@app.command("libvirtd")
def libvirtd(stop: bool = typer.Option(False, "--stop", help="stop the daemons lab commands started"),
             json_out: bool = typer.Option(False, "--json")) -> None:
    """Start virtlogd and libvirtd where no init system runs them (system instances, root only)."""
    path = libvirt_runner.state_root() / "daemons.json"
    try:
        if stop:
            pids = json.loads(path.read_text()) if path.exists() else []
            libvirt_runner.stop_daemons(pids)
            path.unlink(missing_ok=True)
            started: list[int] = []
        else:
            started = libvirt_runner.start_daemons()
            _remember_daemons(started)
    except (NephoscopeError, ValueError) as exc:
        fail(exc if isinstance(exc, NephoscopeError) else NephoscopeError(f"{path} is unreadable: {exc}"))
    status = {**libvirt_runner.daemon_status(), "started": started}
    if json_out:
        emit_json(status)
    else:
        note = f" (started {started})" if started else ""
        err_console.print(f"virtlogd {status['virtlogd'] or 'not running'}, "
                          f"libvirtd {status['libvirtd'] or 'not running'}{note}")


def _describe(guest: runner.Guest) -> dict[str, object]:
    return {
        "name": guest.name, "profile": guest.profile, "pid": guest.pid, "alive": guest.alive(),
        "mem_mib": guest.mem_mib, "smp": guest.smp, "kaslr": guest.kaslr,
        "qmp": str(guest.qmp_socket), "qga": str(guest.qga_socket), "console": str(guest.console_socket),
        "ram": str(guest.ram_path), "gdb": f"127.0.0.1:{guest.gdb_port}",
        "http": f"http://127.0.0.1:{guest.http_port}/", "ssh": f"127.0.0.1:{guest.ssh_port}",
        "manifest": str(guest.manifest_path),
    } | ({"arch_events": str(guest.arch_events_socket)} if guest.arch_events else {})


@app.command("down")
def down(names: list[str] = typer.Argument(..., help="guest names"),
         ) -> None:
    """Stop guests and remove their sockets, shared RAM and state."""
    try:
        for name in names:
            if libvirt_runner.load(name) is not None:
                ran = libvirt_runner.stop(name)
                err_console.print(f"{name}: {'libvirt domain destroyed' if ran else 'cleaned up (was not running)'}")
                continue
            ran = runner.stop(name)
            err_console.print(f"{name}: {'stopped' if ran else 'cleaned up (was not running)'}")
    except NephoscopeError as exc:
        fail(exc)


@app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json")) -> None:
    """List lab guests (stale ones of crashed QEMUs are cleaned up first)."""
    stale = runner.cleanup_stale()
    guests = [_describe(g) for g in runner.list_guests()]
    if json_out:
        emit_json({"guests": guests, "cleaned": stale,
                   "libvirt": [{**asdict(g), "alive": g.alive()} for g in libvirt_runner.list_guests()]})
        return
    for name in stale:
        err_console.print(f"cleaned up stale guest {name}")
    table("lab guests", ["name", "profile", "pid", "alive", "http", "gdb"],
          [[g["name"], g["profile"], g["pid"], g["alive"], g["http"], g["gdb"]] for g in guests]
          + [[f"{g.name} (libvirt)", g.profile, g.pid, g.alive(), "", ""] for g in libvirt_runner.list_guests()])


@app.command("profiles")
def profiles(json_out: bool = typer.Option(False, "--json")) -> None:
    """List the built-in profiles."""
    rows = [(p, load_profile(p).description) for p in list_profiles()]
    if json_out:
        emit_json(dict(rows))
    else:
        table("profiles", ["profile", "description"], rows)


@app.command("manifest")
def manifest(name: str) -> None:
    """Print a guest's ground-truth manifest (what its init started, as the guest reported it)."""
    try:
        lv_guest = libvirt_runner.load(name)
        emit_json(lv_guest.manifest() if lv_guest is not None else runner.get_guest(name).manifest())
    except NephoscopeError as exc:
        fail(exc)


@app.command("console")
def console_cmd(name: str) -> None:
    """Attach the terminal to a guest's serial console (Ctrl-] detaches)."""
    try:
        guest = runner.get_guest(name)
    except NephoscopeError as exc:
        fail(exc)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(guest.console_socket))
    err_console.print(f"connected to {name}'s console; Ctrl-] detaches")
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    try:
        if saved is not None:
            tty.setraw(fd)
        sock.sendall(b"\n")
        while True:
            ready, _, _ = select.select([sock, fd], [], [])
            if sock in ready:
                data = sock.recv(4096)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if fd in ready:
                data = os.read(fd, 1024)
                if not data or b"\x1d" in data:
                    break
                sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sock.close()
