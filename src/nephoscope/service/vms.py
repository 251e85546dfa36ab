"""The `vms` use case: every VM on this host and which methods can reach it."""

from __future__ import annotations

import time
from typing import Any

from nephoscope.hypervisor.discover import Discovery, discover


def host_vms(uri: str | None = None) -> Discovery:
    """Return every VM on this host (libvirt domains, other QEMU processes, lab guests); contacts only libvirt."""
    return discover(uri)


def host_vms_dict(uri: str | None = None) -> dict[str, Any]:
    """Return `host_vms` as a JSON-ready dict with the time the discovery took."""
    started = time.monotonic()
    found = host_vms(uri)
    return {"vms": [vm.to_dict() for vm in found.vms], "skipped": found.skipped,
            "elapsed_s": round(time.monotonic() - started, 3)}
