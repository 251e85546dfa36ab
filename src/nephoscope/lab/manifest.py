"""Turn what the guest's init reported over the serial console into the ground-truth manifest."""

from __future__ import annotations

import base64
import binascii
import re
import time
from typing import TYPE_CHECKING, Any

from nephoscope.core.errors import LabError

if TYPE_CHECKING:
    from nephoscope.lab.build import Image
    from nephoscope.lab.runner import Guest

_LINE = re.compile(r"(NPH-[A-Z]+)(?: (.*))?$")


def _b64(text: str) -> str:
    try:
        return base64.b64decode(text, validate=False).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return ""


def _records(report: str) -> list[tuple[str, list[str]]]:
    out = []
    for raw in report.splitlines():
        i = raw.find("NPH-")
        if i < 0:
            continue
        m = _LINE.match(raw[i:].rstrip("\r"))
        if m:
            out.append((m.group(1), (m.group(2) or "").split(" ")))
    return out


def true_binary(exe: str, service: dict[str, Any] | None) -> str:
    """Return the path of the binary a process really executes (deleted/memfd exes map to the service's)."""
    if service and service.get("binary") and (exe.endswith(" (deleted)") or exe.startswith("/memfd:")
                                              or service.get("technique")):
        return str(service["binary"])
    return exe


def parse_report(report: str, guest: Guest, image: Image) -> dict[str, Any]:
    """Build the manifest dict from the serial report of a booted guest."""
    services = {s["tag"]: s for s in image.meta.get("services", [])}
    tags: dict[int, str] = {}
    procs: list[dict[str, Any]] = []
    kernel: dict[str, Any] = {}
    kernel_log: list[str] = []
    for kind, fields in _records(report):
        if kind == "NPH-KLOG":  # what a lab kernel module said it did (dmesg lines, addresses included)
            kernel_log.append(" ".join(fields))
        if kind == "NPH-KERNEL" and len(fields) >= 2:
            kernel = {"release": _b64(fields[0]).strip(), "cmdline": _b64(fields[1]).strip()}
        elif kind == "NPH-TAG" and len(fields) == 2 and fields[1].isdigit():
            tags[int(fields[1])] = fields[0]
        elif kind == "NPH-PROC" and len(fields) >= 4 and fields[0].isdigit():
            cmdline = _b64(fields[4]) if len(fields) > 4 else ""
            procs.append({
                "pid": int(fields[0]),
                "ppid": int(fields[1]) if fields[1].isdigit() else 0,
                "comm": _b64(fields[2]).rstrip("\n"),
                "exe": _b64(fields[3]),
                "cmdline": [a for a in cmdline.split("\0") if a] if cmdline else [],
            })
    if not kernel or not procs:
        raise LabError(f"the guest's report on {guest.serial_log} is incomplete (no kernel or process lines)")
    by_pid = {p["pid"]: p for p in procs}
    for p in procs:
        tag, started, node, depth = "", False, p, 0
        while node is not None and depth < 64:
            if node["pid"] in tags:
                tag, started = tags[node["pid"]], node is p
                break
            node, depth = by_pid.get(node["ppid"]), depth + 1
        service = services.get(tag) if started else None
        binary = true_binary(p["exe"], service)
        owner = image.owner_of(binary)
        p.update({
            "tag": tag,
            "started_by_init": started,
            "binary": binary,
            "package": owner[0] if owner else None,
            "version": owner[1] if owner else None,
            "technique": service.get("technique", "") if service else "",
        })
    techniques = []
    for pid, tag in tags.items():
        svc = services.get(tag, {})
        if svc.get("technique"):
            techniques.append({"id": svc["technique"], "tag": tag, "pid": pid, "expect": svc.get("expect", ""),
                               "binary": svc.get("binary") or (by_pid.get(pid) or {}).get("exe", ""),
                               "alive": pid in by_pid})
    for kt in image.meta.get("kernel_techniques", []):
        techniques.append({**kt, "kind": "kernel", "expect": kt.get("expect", "")})
    return {
        "name": guest.name,
        "profile": guest.profile,
        "created": time.time(),
        "kernel": {**image.meta["kernel"], **kernel, "kaslr": guest.kaslr,
                   "kaslr_requested": guest.kaslr and "nokaslr" not in kernel.get("cmdline", "")},
        "vm": {"mem_mib": guest.mem_mib, "smp": guest.smp, "accel": guest.accel, "cpu": guest.cpu,
               "http_port": guest.http_port, "ssh_port": guest.ssh_port, "gdb_port": guest.gdb_port},
        "packages": image.meta["packages"],
        "unpackaged": image.meta.get("unpackaged", []),
        "processes": sorted(procs, key=lambda p: p["pid"]),
        "techniques": techniques,
        "kernel_log": kernel_log,
    }
