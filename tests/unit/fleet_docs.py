"""Scan documents for the fleet tests: a stored real scan (tampered lab guest dump), and hostile variants."""

from __future__ import annotations

import copy
import gzip
import json
import uuid
from pathlib import Path
from typing import Any

STORED = Path(__file__).with_name("data") / "fleet-scan-tampered.json.gz"
HOSTILE_COMM = "<script>alert(1)</script><b>x</b>"


def stored_document() -> dict[str, Any]:
    """Return the stored scan document (inspect + arch on the tampered-6.1 dump, as a sensor pushes it)."""
    with gzip.open(STORED, "rt") as f:
        return json.load(f)  # type: ignore[no-any-return]


def hostile_document() -> dict[str, Any]:
    """Return the stored document with a process named with markup and script (guest strings are hostile)."""
    doc = copy.deepcopy(stored_document())
    procs = doc["scan"]["processes"]
    victim = next(p for p in procs if not p.get("kernel_thread"))
    victim["comm"] = HOSTILE_COMM
    victim["cmdline"] = [HOSTILE_COMM, "<img src=x onerror=alert(2)>"]
    return doc


def push(host: str, vm: str, document: dict[str, Any] | None = None, at: float = 1_700_000_000.0,
         key: str | None = None) -> dict[str, Any]:
    """Return one push body as the sensor sends it."""
    return {"idempotency_key": key or f"{host}.{uuid.uuid4().hex}", "host": host, "vm": vm, "started": at,
            "finished": at + 5, "document": document if document is not None else stored_document()}


TAP = "nphtap-secret7"
RULE_MARK = "tcp dport"


def response_store(path: Path, vm: str, operator: str = "root") -> None:
    """Write one VM's filter in force, its audit rows and two notices (one sent, one failed) into a host store.

    The records are the ones `nephoscope filters apply` and `notices send` write (response.engine's record
    types, store.notices' log), with host internals a tenant must not read: the tap device, the operator,
    a delivery error naming a host socket."""
    from nephoscope.response import engine
    from nephoscope.response.engine import ActiveFilter, FilterChange
    from nephoscope.response.nft import VmNet
    from nephoscope.store.notices import NoticeLog
    from nephoscope.store.sqlite import Store

    store = Store(path)
    net = VmNet(TAP, "10.0.7.2", "")
    f = ActiveFilter(vm, "cve-2023-44487-h2-rst", "CVE-2023-44487", "nginx", "1.22.1-9", "1.22.1-9+deb12u1", "",
                     "nft-rate", (443,), {"new_per_second": 20, "burst": 40}, (), net,
                     "nginx 1.22.1-9 runs (arch, verified) and listens on 443", None, 1_700_000_100.0, operator,
                     "limits new TCP connections to port 443", "a slow attack under the limit; other ports")
    change = FilterChange(vm, "applied", f.mitigation, f.cve, f.package, f.version, f.kind, f.ports,
                          engine.rules_summary(f.nft(), net), f.reason, operator, f.applied_at, f.does,
                          f.does_not_stop)
    engine._record(store, [change], [f], [])
    log = NoticeLog(store)
    ok = log.add("acme", vm, "filter-applied", "fp1", None, "email", "sec@acme.example")
    log.attempt(ok, None)
    bad = log.add("acme", vm, "problems", "fp2", None, "webhook", "https://hooks.acme.example/x")
    log.attempt(bad, "connection refused by /run/nephoscope/relay.sock")
    log.give_up(bad)
    store.close()


HOST_HANDLES = ("/run/nephoscope/guests/acme-vm/ram", "/run/nephoscope/guests/acme-vm/qmp.sock",
                "/dev/shm/nephoscope-acme-vm", "cr3:0x46e4000")


def host_leaking_document() -> dict[str, Any]:
    """Return the stored document with host-side handles in finding titles, evidence and unverifiable reasons."""
    doc = copy.deepcopy(stored_document())
    scan = doc["scan"]
    scan["unverifiable"].append({"method": "inspect", "what": "memory",
                                 "reason": f"cannot map {HOST_HANDLES[0]}: Permission denied"})
    scan["unverifiable"].append({"method": "trap", "what": "gdbstub",
                                 "reason": f"QMP at {HOST_HANDLES[1]} refused the connection"})
    scan["findings"][0]["title"] += f" (read from {HOST_HANDLES[2]})"
    scan["findings"][0]["evidence"][0]["reason"] = f"pages read through {HOST_HANDLES[2]} at {HOST_HANDLES[3]}"
    doc["report"]["unverified"].append({"what": "memory", "method": "inspect",
                                        "reason": f"cannot map {HOST_HANDLES[0]}: Permission denied"})
    doc["report"]["code"][0]["title"] += f" ({HOST_HANDLES[1]})"
    doc["report_error"] = f"no KB at {HOST_HANDLES[0]}"
    return doc
