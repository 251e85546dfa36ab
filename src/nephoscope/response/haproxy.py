"""The host-side haproxy of the L7 filters: one process per VM, its config, pid and VM in a state directory.

`<state>/<vm>/net.json` is written before any change to a VM's filters (where they go: tap, netns), and
haproxy's config and pid live next to it, so `gc` can reap a haproxy or an nft table whose filter never got
into the store (nephoscope killed mid-apply) or whose VM is gone. Only a pid whose command line names our
config file is ever signalled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from nephoscope.response.nft import FilterError, NftFilter, VmNet

PORT_BASE, PORT_SPAN = 40000, 20000


def state_root() -> Path:
    """Return where filter processes are tracked (<NEPHOSCOPE_RUN>/filters; /run/nephoscope/filters as root)."""
    default = "/run/nephoscope" if os.geteuid() == 0 else f"/tmp/nephoscope-{os.geteuid()}"
    return Path(os.environ.get("NEPHOSCOPE_RUN", default)) / "filters"


def vm_dir(vm: str) -> Path:
    """Return the state directory of `vm`'s haproxy (a name safe on any file system)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in vm)[:48]
    return state_root() / f"{safe}-{hashlib.sha256(vm.encode()).hexdigest()[:8]}"


def proxy_port(vm: str, port: int) -> int:
    """Return the port haproxy listens on for `vm`'s `port` (stable per VM and port)."""
    digest = hashlib.sha256(f"{vm}:{port}".encode()).digest()
    return PORT_BASE + int.from_bytes(digest[:4], "big") % PORT_SPAN


def config(vm: str, net: VmNet, filters: list[NftFilter]) -> str:
    """Return the haproxy configuration steering `vm`'s filtered ports to the VM with the HTTP/2 limits."""
    streams = min(int(f.params["max_concurrent_streams"]) for f in filters)
    out = [f"# nephoscope filters of VM {vm!r}: generated, do not edit", "global",
           "  maxconn 4096", f"  tune.h2.max-concurrent-streams {streams}", "defaults", "  mode http",
           "  timeout connect 5s", "  timeout client 60s", "  timeout server 60s", "  timeout http-request 15s"]
    steered = [(f, port, proxy) for f in filters for port, proxy in zip(f.ports, f.proxy_ports, strict=True)]
    for f, port, proxy in sorted(steered, key=lambda t: t[1]):
        proto = " proto h2" if f.params.get("upstream") == "h2" else ""
        out += [f"frontend port_{port}", f"  bind :{proxy}",
                # one entry per client connection (address:port): a reset burst is counted on its connection,
                # so the attacker's connection is dropped and other clients (or its next connection) are not
                "  stick-table type string len 64 size 200k expire 30s store http_req_rate(10s)",
                "  http-request set-var(txn.cport) src_port", "  http-request track-sc0 src,concat(:,txn.cport)",
                f"  http-request silent-drop if {{ sc_http_req_rate(0) gt {int(f.params['streams_per_conn_10s'])} }}",
                f"  default_backend vm_{port}", f"backend vm_{port}", f"  server vm {net.guest_ip}:{port}{proto}"]
    return "\n".join(out) + "\n"


def _argv(netns: str, *args: str) -> list[str]:
    exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
    return ["ip", "netns", "exec", netns, exe, *args] if netns else [exe, *args]


def find_pid(directory: Path) -> int | None:
    """Return the pid of the haproxy running the config in `directory`, or None."""
    try:
        pid = int((directory / "haproxy.pid").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if b"haproxy" in cmdline and str(directory / "haproxy.cfg").encode() in cmdline else None


def track(vm: str, net: VmNet, owner: str = "") -> Path:
    """Record where `vm`'s filters are about to go (before any change), so gc finds them after a kill.

    `owner`: the store doing it (`engine.store_owner`); another store's gc leaves the state alone."""
    d = vm_dir(vm)
    d.mkdir(parents=True, exist_ok=True)
    meta = d / "net.json"
    tmp = d / "net.json.tmp"
    tmp.write_text(json.dumps({"vm": vm, **net.to_dict(), "started": time.time(), "owner": owner}))
    tmp.replace(meta)
    return d


def start(vm: str, net: VmNet, filters: list[NftFilter], owner: str = "") -> int:
    """Start (or keep, when its config is unchanged) `vm`'s haproxy; return its pid."""
    d = track(vm, net, owner)
    text = config(vm, net, filters)
    cfg = d / "haproxy.cfg"
    pid = find_pid(d)
    if pid is not None and cfg.exists() and cfg.read_text() == text:
        return pid
    if pid is not None:
        stop_dir(d, keep=True)
    cfg.write_text(text)
    for args in (("-c", "-q", "-f", str(cfg)), ("-D", "-f", str(cfg), "-p", str(d / "haproxy.pid"))):
        try:
            proc = subprocess.run(_argv(net.netns, *args), capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FilterError(f"cannot run haproxy: {exc}; install haproxy (scripts/setup.sh)") from exc
        if proc.returncode != 0:
            raise FilterError(f"haproxy {args[0]} for {vm} failed: {(proc.stderr or proc.stdout).strip()[:600]}")
    for _ in range(50):
        pid = find_pid(d)
        if pid is not None:
            return pid
        time.sleep(0.05)
    raise FilterError(f"haproxy for {vm} did not write its pid file in {d}")


def stop_dir(directory: Path, keep: bool = False) -> bool:
    """Stop the haproxy tracked in `directory` (TERM, then KILL) and forget it; return whether one ran."""
    pid = find_pid(directory)
    if pid is not None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            for _ in range(40):
                if find_pid(directory) is None:
                    break
                time.sleep(0.05)
            if find_pid(directory) is None:
                break
    if not keep:
        shutil.rmtree(directory, ignore_errors=True)
    return pid is not None


def stop(vm: str, keep_track: bool = False) -> bool:
    """Stop `vm`'s haproxy and remove its state (`keep_track`: all but net.json); return whether one ran."""
    d = vm_dir(vm)
    if not keep_track:
        return stop_dir(d)
    ran = stop_dir(d, keep=True)
    for name in ("haproxy.cfg", "haproxy.pid"):
        (d / name).unlink(missing_ok=True)
    return ran


def untrack(vm: str) -> None:
    """Forget where `vm`'s filters go once the store records them (only when no haproxy of it runs)."""
    d = vm_dir(vm)
    if find_pid(d) is None:
        shutil.rmtree(d, ignore_errors=True)


def iter_tracked() -> Iterator[tuple[str, Path, VmNet | None]]:
    """Yield (vm, state directory, its network) of every tracked haproxy, running or left over."""
    root = state_root()
    if not root.is_dir():
        return
    for d in sorted(root.iterdir()):
        try:
            meta = json.loads((d / "net.json").read_text())
            yield str(meta["vm"]), d, VmNet.from_dict(meta)
        except (OSError, ValueError, KeyError, FilterError):
            yield "", d, None


def tracked_owner(directory: Path) -> str:
    """Return the owner tag `track` recorded in `directory` ("" when none or unreadable)."""
    try:
        return str(json.loads((directory / "net.json").read_text()).get("owner", "") or "")
    except (OSError, ValueError, AttributeError):
        return ""
