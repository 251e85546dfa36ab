"""`nephoscope vms`: list every VM on this host and which introspection methods can reach it."""

from __future__ import annotations

import typer

from nephoscope.cli.render import console, emit_json, table
from nephoscope.service.vms import host_vms_dict


def vms(json_out: bool = typer.Option(False, "--json", help="print JSON"),
        uri: str = typer.Option(None, "--uri", help="libvirt URI (default: NEPHOSCOPE_LIBVIRT_URI or qemu:///system)"),
        why: bool = typer.Option(False, "--why", help="say why each unsupported method cannot run")) -> None:
    """List libvirt domains, other QEMU processes and lab guests with the methods each supports."""
    found = host_vms_dict(uri)
    if json_out:
        emit_json(found)
        return
    table(f"VMs on this host ({len(found['vms'])})", ["name", "kind", "uuid", "pid", "state", "methods"],
          [[v["name"], v["kind"], v["uuid"] or "", v["pid"] or "", v["state"], ",".join(v["supported"]) or "-"]
           for v in found["vms"]])
    if why:
        for v in found["vms"]:
            for method, reason in v["unsupported"].items():
                console.print(f"{v['name']}: {method}: {reason}", highlight=False)
    for source, reason in found["skipped"].items():
        console.print(f"[yellow]{source} skipped: {reason}[/yellow]", highlight=False)
