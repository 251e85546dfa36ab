"""A lab network in namespaces: a host-side namespace holding the VM's tap, and a client namespace.

Routed (the default):

    client ns (10.78.0.2) ──veth── host ns (10.78.0.1 | 10.77.0.1) ──tap── guest (10.77.0.2)

Bridged (`bridged=True`): the tap and the client's veth are ports of one bridge in the host namespace,
so client → VM frames are switched, never routed (the libvirt virbr0 / provider br0 case); a second,
routed client stands for clients outside the bridge that the host routes into it (libvirt's NAT network):

    client ns (10.77.0.3) ──veth── [bridge in host ns, 10.77.0.1] ──tap── guest (10.77.0.2)
    routed client ns (10.78.0.2) ──veth── host ns (10.78.0.1) ──routed into the bridge──┘

The host namespace stands for the hypervisor host: it routes between the client and the guest, and the
VM's filters (nft table, haproxy) live there. Routed rather than bridged on purpose: traffic to the VM
then passes the host's `forward` hook with the tap as its output device (no br_netfilter needed), which
is where the filters match. `kind="veth"` puts a third namespace at the tap's place (a stand-in VM for
benchmarks: a veth named like the tap). Everything is removed by deleting the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nephoscope.core.errors import LabError

GUEST_IP, HOST_TAP_IP, CLIENT_IP, HOST_CLIENT_IP = "10.77.0.2", "10.77.0.1", "10.78.0.2", "10.78.0.1"
BRIDGED_CLIENT_IP = "10.77.0.3"  # on a bridged lab network the client shares the guest's subnet


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS` and return it; raise LabError with its message when `check` and it fails."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


@dataclass(frozen=True, slots=True)
class NetLab:
    """The namespaces and devices of one lab network."""

    prefix: str
    kind: str = "tap"
    bridged: bool = False

    @property
    def host_ns(self) -> str:
        return f"{self.prefix}-host"

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}-cli"

    @property
    def vm_ns(self) -> str:
        """The stand-in VM's namespace (kind "veth" only)."""
        return f"{self.prefix}-vm"

    @property
    def tap(self) -> str:
        return f"{self.prefix[:10]}-tap"

    @property
    def bridge(self) -> str:
        """The bridge in the host namespace (bridged networks only, else "")."""
        return f"{self.prefix[:10]}-br" if self.bridged else ""

    @property
    def client_ip(self) -> str:
        return BRIDGED_CLIENT_IP if self.bridged else CLIENT_IP

    @property
    def routed_client_ns(self) -> str:
        """A client outside the bridge, routed into it by the host (bridged networks only, else "")."""
        return f"{self.prefix}-rcli" if self.bridged else ""

    def namespaces(self) -> list[str]:
        return [self.host_ns, self.client_ns, *([self.vm_ns] if self.kind == "veth" else []),
                *([self.routed_client_ns] if self.bridged else [])]


def create(prefix: str, kind: str = "tap", bridged: bool = False) -> NetLab:
    """Create the lab network (removing a left-over one of the same prefix first)."""
    net = NetLab(prefix, kind, bridged)
    destroy(net)
    try:
        for ns in net.namespaces():
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        h, c = net.host_ns, net.client_ns
        if kind == "tap":
            ip("-n", h, "tuntap", "add", "dev", net.tap, "mode", "tap")
        else:
            ip("link", "add", net.tap, "netns", h, "type", "veth", "peer", "name", "eth0", "netns", net.vm_ns)
            ip("-n", net.vm_ns, "addr", "add", f"{GUEST_IP}/24", "dev", "eth0")
            ip("-n", net.vm_ns, "link", "set", "eth0", "up")
            ip("-n", net.vm_ns, "route", "add", "default", "via", HOST_TAP_IP)
        ip("link", "add", "cli0", "netns", c, "type", "veth", "peer", "name", "hcli0", "netns", h)
        if bridged:
            ip("-n", h, "link", "add", net.bridge, "type", "bridge")
            ip("-n", h, "addr", "add", f"{HOST_TAP_IP}/24", "dev", net.bridge)
            for port in (net.tap, "hcli0"):
                ip("-n", h, "link", "set", port, "master", net.bridge)
            ip("-n", h, "link", "set", net.bridge, "up")
            ip("-n", c, "addr", "add", f"{BRIDGED_CLIENT_IP}/24", "dev", "cli0")
            r = net.routed_client_ns
            ip("link", "add", "rcli0", "netns", r, "type", "veth", "peer", "name", "hrcli0", "netns", h)
            ip("-n", r, "addr", "add", f"{CLIENT_IP}/24", "dev", "rcli0")
            ip("-n", h, "addr", "add", f"{HOST_CLIENT_IP}/24", "dev", "hrcli0")
            ip("-n", r, "link", "set", "rcli0", "up")
            ip("-n", h, "link", "set", "hrcli0", "up")
            ip("-n", r, "route", "add", "default", "via", HOST_CLIENT_IP)
        else:
            ip("-n", h, "addr", "add", f"{HOST_TAP_IP}/24", "dev", net.tap)
            ip("-n", c, "addr", "add", f"{CLIENT_IP}/24", "dev", "cli0")
            ip("-n", h, "addr", "add", f"{HOST_CLIENT_IP}/24", "dev", "hcli0")
        ip("-n", h, "link", "set", net.tap, "up")
        ip("-n", c, "link", "set", "cli0", "up")
        ip("-n", h, "link", "set", "hcli0", "up")
        if not bridged:
            ip("-n", c, "route", "add", "default", "via", HOST_CLIENT_IP)
        subprocess.run(["ip", "netns", "exec", h, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True,
                       capture_output=True, timeout=30)
    except BaseException:
        destroy(net)
        raise
    return net


def destroy(net: NetLab) -> None:
    """Delete the lab network's namespaces (and with them every device in them)."""
    for ns in net.namespaces():
        ip("netns", "del", ns, check=False)


@contextlib.contextmanager
def lab_network(prefix: str, kind: str = "tap", bridged: bool = False) -> Iterator[NetLab]:
    """Yield a fresh lab network and always remove it afterwards."""
    net = create(prefix, kind, bridged)
    try:
        yield net
    finally:
        destroy(net)


def run_in(ns: str, function: str, *args: Any, timeout: float = 120.0) -> Any:
    """Call `nephoscope.lab.h2client.FUNCTION(*args)` in namespace `ns` (a child process); return its JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "nephoscope.lab.h2client", function,
                           json.dumps(list(args))], capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)
    if proc.returncode != 0:
        raise LabError(f"{function} in {ns} failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout)


ORIGIN_CONFIG = """global
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend http1
  bind :80
  http-request return status 200 content-type text/plain string "origin http/1.1"
frontend h2c
  bind :8080 proto h2
  http-request return status 200 content-type text/plain string "origin h2c"
"""


@contextlib.contextmanager
def origin_server(net: NetLab, directory: Any) -> Iterator[int]:
    """Run a stand-in VM's web server in the veth VM namespace (haproxy: HTTP/1.1 on 80, h2c on 8080)."""
    from pathlib import Path

    if net.kind != "veth":
        raise LabError("an origin server stands in for a VM only on a veth lab network")
    d = Path(directory)
    cfg, pidfile = d / "origin.cfg", d / "origin.pid"
    cfg.write_text(ORIGIN_CONFIG)
    subprocess.run(["ip", "netns", "exec", net.vm_ns, "haproxy", "-D", "-f", str(cfg), "-p", str(pidfile)],
                   check=True, capture_output=True, timeout=30)
    pid = int(pidfile.read_text().split()[0])
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 15)
