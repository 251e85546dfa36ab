"""`nephoscope filters`: host-side, vulnerability-specific filters on a VM's network path (docs/filters.md)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from nephoscope.cli.render import console, emit_json, err_console, fail, table
from nephoscope.core.errors import NephoscopeError

app = typer.Typer(help="Vulnerability-specific filters on a VM's network path: nftables on its tap, haproxy for L7.",
                  no_args_is_help=True)
POLICY = typer.Option(None, "--policy", help="extra policy file or directory of *.toml (repeatable)")
TAP = typer.Option(None, "--tap", help="the VM's tap device (default: a lab guest's own)")
GUEST_IP = typer.Option(None, "--guest-ip", help="the VM's IPv4 address on the tap (needed by haproxy filters)")
NETNS = typer.Option(None, "--netns", help="network namespace holding the tap (default: the host's)")
JSON = typer.Option(False, "--json", help="print JSON")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _changes(changes: list, json_out: bool, none: str) -> None:
    if json_out:
        emit_json([c.to_dict() for c in changes])
    elif not changes:
        err_console.print(none, markup=False, highlight=False)
    else:
        table("filter changes", ["action", "mitigation", "cve", "package", "ports", "rules", "reason"],
              [[c.action, c.mitigation, c.cve, f"{c.package} {c.version}", ",".join(map(str, c.ports)),
                "\n".join(c.rules_summary), c.reason] for c in changes])


@app.command("plan")
def plan(vm: str = typer.Argument(..., help="VM name (as in its stored scans)"), policy: list[Path] = POLICY,
         tap: str = TAP, guest_ip: str = GUEST_IP, netns: str = NETNS, json_out: bool = JSON) -> None:
    """Show what `apply` would put in force for a VM and why: CVE and running evidence from its latest scan.

    When the VM's tap is known (a lab guest, a libvirt domain, --tap), each kind is also checked against it:
    routed or bridge port, and what this kernel's bridge family can do; a kind that cannot work is refused."""
    from nephoscope.service import filters

    note = ""
    try:
        try:
            net = filters.vm_net(vm, tap, guest_ip, netns)
        except NephoscopeError as exc:
            net, note = None, f"not checked against the VM's tap: {exc}"
        p = filters.plan_vm(vm, policy, net=net)
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json(p.to_dict())
        return
    if p.net is not None:
        where = f"bridged tap {p.net.tap} (port of {p.net.bridge})" if p.net.bridge else f"routed tap {p.net.tap}"
        note = f"checked against {where}" + (f" in netns {p.net.netns}" if p.net.netns else "")
    table(f"filters plan for {vm} (scan {p.scan_id})", ["mitigation", "cve", "kind", "ports", "running"],
          [[f.mitigation.id, f.mitigation.cve, f.mitigation.kind, ",".join(map(str, f.ports)),
            f"{f.mitigation.package} {f.version}"] for f in p.filters])
    for f in p.filters:
        for label, text in (("why", f.reason()), ("does", f.mitigation.does),
                            ("does not stop", f.mitigation.does_not_stop), ("source", f.mitigation.source)):
            console.print(f"{f.mitigation.id}: {label}: {text}", markup=False, highlight=False)
    for s in p.skipped:
        console.print(f"not planned: {s['mitigation']}: {s['why']}", markup=False, highlight=False)
    err_console.print(note, markup=False, highlight=False)


@app.command("apply")
def apply(vm: str = typer.Argument(..., help="VM name"),
          only: list[str] = typer.Option(None, "--only", help="apply only this mitigation id (repeatable)"),
          policy: list[Path] = POLICY, tap: str = TAP, guest_ip: str = GUEST_IP, netns: str = NETNS,
          json_out: bool = JSON) -> None:
    """Put the planned filters in force: one nft transaction for the VM's table, haproxy for L7; audited."""
    from nephoscope.service import filters

    try:
        changes = filters.apply_vm(vm, filters.vm_net(vm, tap, guest_ip, netns), only=only, policy_paths=policy)
    except NephoscopeError as exc:
        fail(exc)
    _changes(changes, json_out, f"{vm}: nothing to change (the planned filters are in force)")


@app.command("remove")
def remove(vm: str = typer.Argument(..., help="VM name"),
           mitigation: list[str] = typer.Option(None, "--mitigation", help="remove only this one (repeatable)"),
           reason: str = typer.Option("removed by the operator", "--reason", help="why, for the audit"),
           json_out: bool = JSON) -> None:
    """Take a VM's filters (all, or the named ones) out of force; audited."""
    from nephoscope.service import filters

    try:
        changes = filters.remove_vm(vm, mitigation, reason)
    except NephoscopeError as exc:
        fail(exc)
    _changes(changes, json_out, f"{vm}: no filter in force")


@app.command("list")
def list_(vm: str = typer.Argument(None, help="VM name (default: every VM)"),
          audit: bool = typer.Option(False, "--audit", help="show the audit trail instead"),
          json_out: bool = JSON) -> None:
    """List the filters in force (or the audit trail: who, when, why, rules)."""
    from nephoscope.service import filters

    try:
        rows = filters.audit(vm) if audit else filters.list_filters(vm)
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json(rows)
    elif audit:
        table("filter audit", ["when", "who", "vm", "action", "mitigation", "reason", "rules"],
              [[_when(r["at"]), r["who"], r["vm"], r["action"], f"{r['mitigation']} {r['cve']}", r["reason"],
                "\n".join(r["rules"])] for r in rows])
    else:
        table("filters in force", ["vm", "mitigation", "cve", "since", "by", "tap", "rules"],
              [[r["vm"], r["mitigation"], r["cve"], _when(r["applied_at"]), r["applied_by"],
                f"{r['net']['tap']}" + (f" on bridge {r['net']['bridge']}" if r["net"].get("bridge") else "")
                + (f" (netns {r['net']['netns']})" if r["net"]["netns"] else "")
                + (f"\nlibvirt domain {r['net']['domain']}" if r["net"].get("domain") else ""),
                "\n".join(r["rules"])] for r in rows])


@app.command("gc")
def gc(json_out: bool = JSON) -> None:
    """Remove the filters of VMs that are gone; reap left-over haproxy processes and nft tables."""
    from nephoscope.service import filters

    try:
        changes = filters.gc()
    except NephoscopeError as exc:
        fail(exc)
    _changes(changes, json_out, "nothing to collect")
