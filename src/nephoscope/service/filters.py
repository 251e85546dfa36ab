"""The filters use case: plan, apply, list and remove a VM's host-side filters; expire them after scans.

Where a VM's traffic passes (tap device, address, network namespace) comes from the operator's options or,
for a lab guest on tap networking, from its run state, or from a libvirt domain's XML; whether the tap is
routed or a bridge port is asked of the kernel. A libvirt domain's filters go when the domain does (`gc`).
See docs/filters.md.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nephoscope.core.errors import NephoscopeError
from nephoscope.core.records import Observation
from nephoscope.response import engine
from nephoscope.response.engine import FilterChange, FilterPlan
from nephoscope.response.nft import FilterError, VmNet, find_bridge
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


TAP_INTERFACES = ("ethernet", "bridge", "network")  # libvirt interface types backed by a host tap device


def pick_tap(vm: str, taps: list[tuple[str, str]]) -> str | None:
    """Return the tap to filter among a domain's (device, interface type): its first tap-backed NIC.

    `ethernet` (a routed tap), `bridge` and `network` (a tap on a bridge such as virbr0/br0) are taps;
    `direct` (macvtap), `vhostuser` and the like have no tap whose traffic the host's nft hooks see."""
    usable = [dev for dev, kind in taps if kind in TAP_INTERFACES]
    if not usable and taps:
        raise FilterError(f"{vm}'s NIC {taps[0][0]} is a libvirt {taps[0][1]!r} interface, not a tap device "
                          "(routed or on a bridge): nephoscope's nft filters cannot see its traffic; give --tap")
    return usable[0] if usable else None


def _libvirt_domain(vm: str) -> tuple[str, list[tuple[str, str]]] | None:
    """Return (UUID, its NICs' (tap, interface type)) of libvirt domain `vm` (live XML), or None when there is none."""
    try:
        from nephoscope.hypervisor import libvirt

        dom = libvirt.lookup_domain(libvirt.shared_connection(), vm)
        return (str(dom.UUIDString()), taps_from_domain_xml(dom.XMLDesc(0))) if dom is not None else None
    except Exception:  # libvirt missing or unreachable: the operator gives --tap
        return None


def _libvirt_tap(vm: str) -> str | None:
    """Return the tap of libvirt domain `vm` (`pick_tap`), or None when there is no such domain."""
    found = _libvirt_domain(vm)
    return pick_tap(vm, found[1]) if found is not None else None


def _libvirt_uuid(vm: str, tap: str) -> str:
    """Return the UUID of libvirt domain `vm` when `tap` is one of its NICs, else ""."""
    found = _libvirt_domain(vm)
    return found[0] if found is not None and tap in {dev for dev, _kind in found[1]} else ""


def vm_net(vm: str, tap: str | None = None, guest_ip: str | None = None, netns: str | None = None) -> VmNet:
    """Return where `vm`'s traffic passes: the options given, completed from a lab guest or libvirt domain.

    A tap that is a NIC of libvirt domain `vm` (in the host's namespace) carries the domain's UUID, so `gc`
    collects the filters when that domain is gone, stopped or no longer has the tap (a tap libvirt did not
    create outlives its domain, and a name such as vnet0 is handed to the next domain started)."""
    from nephoscope.lab import runner

    guest = runner.load_guest(vm)
    domain = ""
    if guest is not None and guest.tap:
        tap = tap or guest.tap
        netns = guest.netns if netns is None else netns
        guest_ip = guest_ip or runner.find_address(guest) or ""
    elif guest is None or not guest.alive():
        tap = tap or _libvirt_tap(vm)
        domain = _libvirt_uuid(vm, tap) if tap and not netns else ""
    if not tap:
        raise FilterError(f"where does {vm}'s traffic pass? give --tap (and --guest-ip, --netns); lab guests on "
                          "user networking have no tap device to filter")
    checked = VmNet(tap, guest_ip or "", netns or "", domain=domain)  # the names are valid before `ip` sees them
    bridge = find_bridge(checked.tap, checked.netns)
    return VmNet(checked.tap, checked.guest_ip, checked.netns, bridge or "", checked.domain)


def domain_present(net: VmNet) -> bool:
    """Return whether the libvirt domain `net` was found on still runs with its tap (True when libvirt cannot tell).

    False only on libvirt's word: no domain of that UUID, the domain not running, or its live XML without the
    tap. A `net` of no libvirt domain, or libvirt unreachable, counts as present (the tap check decides)."""
    if not net.domain:
        return True
    try:
        import libvirt as libvirt_api

        from nephoscope.hypervisor import libvirt

        try:
            dom = libvirt.shared_connection().lookupByUUIDString(net.domain)
        except libvirt_api.libvirtError as exc:
            return exc.get_error_code() != libvirt_api.VIR_ERR_NO_DOMAIN
        return bool(dom.isActive()) and net.tap in {dev for dev, _kind in taps_from_domain_xml(dom.XMLDesc(0))}
    except Exception:  # libvirt missing, unreachable or restarting: keep the filter, the next gc asks again
        return True


def _alive(store: Store) -> Callable[[str], bool]:
    """Return gc's liveness test: a VM whose filters sit on a libvirt domain's tap lives while that domain does."""
    nets = {a.vm: a.net for a in engine.active(store)}
    return lambda vm: vm not in nets or domain_present(nets[vm])


def plan_vm(vm: str, policy_paths: list[Path] | None = None, store: Store | None = None,
            net: VmNet | None = None) -> FilterPlan:
    """Return what `filters apply` would put in force for `vm`, from its latest stored scan (on `net` if known)."""
    return engine.plan_latest(store or Store(), vm, policy(policy_paths), kb_owner(), net)


def apply_vm(vm: str, net: VmNet, *, only: list[str] | None = None, policy_paths: list[Path] | None = None,
             store: Store | None = None) -> list[FilterChange]:
    """Put `vm`'s planned filters in force (atomically, idempotently); return the changes, audited.

    The plan is checked against `net`: a kind that cannot be expressed there is not applied (`plan` says why)."""
    store = store or Store()
    return notify(engine.apply(store, vm, net, plan_vm(vm, policy_paths, store, net), only=only or (),
                               alive=_alive(store)), store)


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
    """Remove the filters of VMs that are gone (tap deleted, libvirt domain gone); reap left-over haproxy and tables."""
    store = store or Store()
    return notify(engine.gc(store, _alive(store)), store)


def after_scan(store: Store, vm: str, observations: list[Observation], methods: list[str]) -> list[FilterChange]:
    """Expire `vm`'s filters the scan no longer justifies and collect gone VMs' ones (never fails a scan)."""
    try:
        if not engine.active(store):
            return []
        changes = engine.expire(store, vm, observations, methods, owner=kb_owner()) + engine.gc(store, _alive(store))
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
