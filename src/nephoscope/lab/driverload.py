"""Build nphdrv (lab/driver/, the `driver` method's kernel module) and load or unload it through the guest agent.

The module is built like the rootkit (lab/kmodules.py, the lab kernel's own Debian headers, cached) and
put into a running guest at run time: written with guest-file-write, then `insmod` through guest-exec. No
lab image carries it, so every profile's ground truth stays what it was; a guest that should have the
driver gets it from the test fixture, `evaluate` or `bench/driver.py`. Nothing here pauses the VM.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING

from nephoscope.core.errors import ConnectorError, LabError
from nephoscope.lab.kmodules import build_module

if TYPE_CHECKING:
    from nephoscope.hypervisor.qga import GuestAgent
    from nephoscope.lab.build import KernelChoice

DRIVER_DIR = Path(__file__).parent / "driver"
MODULE = "nphdrv"
GUEST_PATH = "/tmp/nphdrv.ko"


def build_driver(kernel: KernelChoice) -> bytes:
    """Return nphdrv.ko built for `kernel` (cached by release and source hash)."""
    return build_module(MODULE, kernel, DRIVER_DIR)


def put_file(agent: GuestAgent, path: str, data: bytes, chunk: int = 48 << 10) -> None:
    """Write `data` to `path` in the guest through the agent's file calls."""
    handle = agent.call("guest-file-open", path=path, mode="w")
    try:
        for at in range(0, len(data), chunk):
            agent.call("guest-file-write", handle=handle,
                       **{"buf-b64": base64.b64encode(data[at:at + chunk]).decode()})
    finally:
        agent.call("guest-file-close", handle=handle)


def driver_loaded(agent: GuestAgent) -> bool:
    """Return whether the guest shows nphdrv's /proc/nephoscope/stats."""
    try:
        agent.read_file("/proc/nephoscope/stats", limit=4096)
    except ConnectorError:
        return False
    return True


def load_driver(agent: GuestAgent, ko: bytes, timeout: float = 60) -> None:
    """Copy nphdrv.ko into the guest and insmod it (nothing when it is loaded already); LabError if that fails."""
    if driver_loaded(agent):
        return
    try:
        put_file(agent, GUEST_PATH, ko)
        code, out, err = agent.exec(["/bin/sh", "-c", f"insmod {GUEST_PATH}"], timeout=timeout)
    except ConnectorError as exc:
        raise LabError(f"cannot load {MODULE} through the guest agent: {exc}") from exc
    if code != 0 or not driver_loaded(agent):
        raise LabError(f"insmod {MODULE} failed in the guest (exit {code}): {(err or out)[-300:]!r}")


def unload_driver(agent: GuestAgent, timeout: float = 60) -> None:
    """Remove nphdrv from the guest (rmmod); LabError if it stays."""
    try:
        code, out, err = agent.exec(["/bin/sh", "-c", f"rmmod {MODULE}"], timeout=timeout)
    except ConnectorError as exc:
        raise LabError(f"cannot unload {MODULE} through the guest agent: {exc}") from exc
    if driver_loaded(agent):
        raise LabError(f"rmmod {MODULE} failed in the guest (exit {code}): {(err or out)[-300:]!r}")


def manifest_kernel(manifest: dict) -> KernelChoice:
    """Return the KernelChoice a lab guest booted, from its manifest's release, package and version (else LabError)."""
    from nephoscope.lab.build import KernelChoice

    kernel = manifest.get("kernel") or {}
    if not all(isinstance(kernel.get(k), str) and kernel.get(k) for k in ("release", "package", "version")):
        raise LabError("the guest's manifest names no Debian kernel package: nphdrv cannot be built for it")
    return KernelChoice(kernel["release"], Path(kernel.get("source") or ""), None, kernel["package"],
                        kernel["version"])
