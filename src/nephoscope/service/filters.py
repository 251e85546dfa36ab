"""The filters use case: plan, apply, list and remove a VM's host-side filters; expire them after scans.

Where a VM's traffic passes (tap device, address, network namespace) comes from the operator's options or,
for a lab guest on tap networking, from its run state. See docs/filters.md.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from nephoscope.core.errors import NephoscopeError
from nephoscope.core.records import Observation
from nephoscope.response import engine
from nephoscope.response.engine import FilterChange, FilterPlan
from nephoscope.response.nft import FilterError, VmNet
from nephoscope.response.policy import Mitigation, load_policy
from nephoscope.service.report import kb_owner
from nephoscope.store.sqlite import Store


def policy(paths: list[Path] | None = None) -> dict[str, Mitigation]:
    """Return the policy library: built-in entries plus the provider's files or directories."""
    return load_policy(paths)


def taps_from_domain_xml(xml: str) -> list[tuple[str, str]]:
    """Return (tap device, interface type) of a libvirt domain's interfaces (`<target dev=...>`), in order."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return []
    return [(t.get("dev", ""), iface.get("type", "")) for iface in root.iterfind("./devices/interface")
            if (t := iface.find("target")) is not None and t.get("dev")]


def _libvirt_tap(vm: str) -> str | None:
    """Return the routed tap of libvirt domain `vm` (an `ethernet` interface), or None when there is no domain.

    A tap that is a bridge port (`bridge`, `network` interfaces) is refused: bridged frames do not pass the
    inet `forward` hook the filters use (docs/filters.md)."""
    try:
        from nephoscope.hypervisor import libvirt

        dom = libvirt.lookup_domain(libvirt.shared_connection(), vm)
        taps = taps_from_domain_xml(dom.XMLDesc(0)) if dom is not None else []
    except Exception:  # libvirt missing or unreachable: the operator gives --tap
        return None
    routed = [dev for dev, kind in taps if kind == "ethernet"]
    if not routed and taps:
        raise FilterError(f"{vm}'s NIC {taps[0][0]} is a {taps[0][1]} port: bridged traffic does not pass the "
                          "forward hook nephoscope's nft filters use; give a routed tap with --tap")
    return routed[0] if routed else None


def vm_net(vm: str, tap: str | None = None, guest_ip: str | None = None, netns: str | None = None) -> VmNet:
    """Return where `vm`'s traffic passes: the options given, completed from a lab guest or libvirt domain."""
    from nephoscope.lab import runner

    guest = runner.load_guest(vm)
    if guest is not None and guest.tap:
        tap = tap or guest.tap
        netns = guest.netns if netns is None else netns
        guest_ip = guest_ip or runner.find_address(guest) or ""
    elif not tap and (guest is None or not guest.alive()):
        tap = _libvirt_tap(vm)
    if not tap:
        raise FilterError(f"where does {vm}'s traffic pass? give --tap (and --guest-ip, --netns); lab guests on "
                          "user networking have no tap device to filter")
    return VmNet(tap, guest_ip or "", netns or "")


def plan_vm(vm: str, policy_paths: list[Path] | None = None, store: Store | None = None) -> FilterPlan:
    """Return what `filters apply` would put in force for `vm`, from its latest stored scan."""
    return engine.plan_latest(store or Store(), vm, policy(policy_paths), kb_owner())


def apply_vm(vm: str, net: VmNet, *, only: list[str] | None = None, policy_paths: list[Path] | None = None,
             store: Store | None = None) -> list[FilterChange]:
    """Put `vm`'s planned filters in force (atomically, idempotently); return the changes, audited."""
    store = store or Store()
    return notify(engine.apply(store, vm, net, plan_vm(vm, policy_paths, store), only=only or ()), store)


def remove_vm(vm: str, mitigations: list[str] | None = None, reason: str = "removed by the operator",
              store: Store | None = None) -> list[FilterChange]:
    """Take `vm`'s filters (all, or the named ones) out of force; return the changes, audited."""
    store = store or Store()
    return notify(engine.remove(store, vm, mitigations or (), reason=reason), store)


def list_filters(vm: str | None = None, store: Store | None = None) -> list[dict[str, Any]]:
    """Return the filters in force (of one VM, or all) with the rules each put in force."""
    return [{**a.to_dict(), "rules": list(engine.rules_summary(a.nft(), a.net))}
            for a in engine.active(store or Store(), vm)]


def audit(vm: str | None = None, store: Store | None = None) -> list[dict[str, Any]]:
    """Return the audit trail of filter changes, newest first."""
    return engine.audit_log(store or Store(), vm)


def gc(store: Store | None = None) -> list[FilterChange]:
    """Remove the filters of VMs that are gone; reap left-over haproxy processes and tables."""
    store = store or Store()
    return notify(engine.gc(store), store)


def after_scan(store: Store, vm: str, observations: list[Observation], methods: list[str]) -> list[FilterChange]:
    """Expire `vm`'s filters the scan no longer justifies and collect gone VMs' ones (never fails a scan)."""
    try:
        if not engine.active(store):
            return []
        changes = engine.expire(store, vm, observations, methods, owner=kb_owner()) + engine.gc(store)
    except (NephoscopeError, sqlite3.Error):
        return []  # the filters stay; `nephoscope filters list` / `gc` show and retry
    return notify(changes, store)


def notify(changes: list[FilterChange], store: Store) -> list[FilterChange]:
    """Tell each changed VM's tenant that a filter was applied or removed on its behalf; return `changes`.

    Only when notices are configured (a tenants file exists, docs/notices.md); a VM no tenant owns is
    skipped. Delivery is retried and recorded by the notices (`nephoscope notices list`); a failed or
    impossible notice never undoes or fails the filter change itself."""
    if not changes:
        return changes
    from nephoscope.response.tenants import find_tenants
    from nephoscope.service.notices import filter_changed

    try:
        tenants = find_tenants()
    except NephoscopeError:
        return changes  # an invalid tenants file: `nephoscope notices tenants` says why
    if tenants is None:
        return changes
    for change in changes:
        try:
            filter_changed(change.vm, change.notice_action, change.cve, change.notice_summary(), store=store,
                           tenants=tenants)
        except (NephoscopeError, sqlite3.Error):
            continue
    return changes
