"""Plan, apply, remove, expire and collect a VM's filters, each change audited in the scan store.

Order of an apply, so that a kill at any point leaves nothing behind that `gc` does not reap: record where
the filters go (the VM's state directory: tap, netns, bridge) and start the VM's haproxy, then one nft
transaction for the VM's whole table (inet or bridge family), then one store transaction recording the
filters and the audit rows; only then is a VM without haproxy forgotten from the state directory. An
exception, Ctrl-C or SIGTERM on the way puts the previous table and haproxy back; a SIGKILL leaves at most
a tracked haproxy or a tracked table without a store row, and `gc` (run by every apply and every scan that
expires filters) removes both.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nephoscope.analysis.merge import merge
from nephoscope.analysis.vulnerable import Owner, Running, installed_from, mapped_paths, running_from_view
from nephoscope.core.errors import NephoscopeError
from nephoscope.core.payloads import Socket
from nephoscope.core.records import Observation, Verdict
from nephoscope.response import haproxy, nft
from nephoscope.response.nft import FilterError, NftFilter, VmNet
from nephoscope.response.policy import Mitigation

TABLES = """
CREATE TABLE IF NOT EXISTS filters (
  vm TEXT NOT NULL, mitigation TEXT NOT NULL, cve TEXT NOT NULL, package TEXT NOT NULL, version TEXT NOT NULL,
  fixed TEXT NOT NULL, introduced TEXT NOT NULL, kind TEXT NOT NULL, ports TEXT NOT NULL, params TEXT NOT NULL,
  proxy_ports TEXT NOT NULL, net TEXT NOT NULL, reason TEXT NOT NULL, scan_id INTEGER, applied_at REAL NOT NULL,
  applied_by TEXT NOT NULL, does TEXT NOT NULL DEFAULT '', does_not_stop TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (vm, mitigation));
CREATE TABLE IF NOT EXISTS filter_audit (
  id INTEGER PRIMARY KEY, at REAL NOT NULL, who TEXT NOT NULL, vm TEXT NOT NULL, action TEXT NOT NULL,
  mitigation TEXT NOT NULL, cve TEXT NOT NULL, package TEXT NOT NULL, version TEXT NOT NULL, reason TEXT NOT NULL,
  rules TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS filter_audit_vm ON filter_audit(vm, id);
"""
APPLIED, REMOVED, EXPIRED, COLLECTED = "applied", "removed", "expired", "collected"


@dataclass(frozen=True, slots=True)
class FilterChange:
    """A filter change that happened: the event a notice is sent for (applied, removed, expired, collected).

    `rules_summary` is one line per nft rule (or haproxy limit) in force or taken away; `reason` says why
    (the CVE and the running evidence, or why the filter expired); `at` is a Unix time; `does` and
    `does_not_stop` are the policy entry's honest account. For `response.notices.notify_filter_change`
    use `notice_action` ("applied" or "removed") and `notice_summary()`."""

    vm: str
    action: str
    mitigation: str
    cve: str
    package: str
    version: str
    kind: str
    ports: tuple[int, ...]
    rules_summary: tuple[str, ...]
    reason: str
    who: str
    at: float
    does: str = ""
    does_not_stop: str = ""

    @property
    def notice_action(self) -> str:
        """Return "applied" or "removed" (expired and collected filters are removed ones), as notices take it."""
        return APPLIED if self.action == APPLIED else REMOVED

    def notice_summary(self) -> str:
        """Return what the change means for the customer: what, why, what it does and does not stop."""
        verb = "now filters" if self.action == APPLIED else "no longer filters"
        parts = [f"{self.mitigation} ({self.kind}) {verb} TCP port(s) {', '.join(map(str, self.ports))} for "
                 f"{self.cve}: {self.reason}"]
        if self.action == APPLIED:
            parts += [f"What it does: {self.does}" if self.does else "",
                      f"What it does not stop: {self.does_not_stop}" if self.does_not_stop else ""]
        return "\n".join(p for p in parts if p)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        d = asdict(self)
        d["ports"], d["rules_summary"] = list(self.ports), list(self.rules_summary)
        return d


@dataclass(slots=True)
class PlannedFilter:
    """One mitigation the latest scan calls for: the policy entry, the running version and the evidence."""

    mitigation: Mitigation
    version: str
    ports: tuple[int, ...]
    evidence: dict[str, Any] = field(default_factory=dict)

    def reason(self) -> str:
        """Return why this filter is wanted, in one line."""
        ev = self.evidence
        procs = ", ".join(f"{p['pid']} {p['comm']}".strip() for p in ev.get("processes", [])[:6]) or "?"
        return (f"{self.mitigation.cve}: {self.mitigation.package} {self.version} is executing (pids {procs}; "
                f"{', '.join(ev.get('methods', [])) or '?'}, {ev.get('verdict', '?')}) in scan {ev.get('scan_id')}; "
                f"fixed in {self.mitigation.fixed}; ports {', '.join(map(str, self.ports))} ({ev.get('ports_from')})")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"mitigation": self.mitigation.to_dict(), "version": self.version, "ports": list(self.ports),
                "evidence": self.evidence, "reason": self.reason()}


@dataclass(slots=True)
class FilterPlan:
    """What `apply` would put in force for a VM, and the matches it left out (with why)."""

    vm: str
    scan_id: int | None
    filters: list[PlannedFilter] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    net: VmNet | None = None  # where the plan was checked to be expressible (None: not checked)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"vm": self.vm, "scan_id": self.scan_id, "filters": [f.to_dict() for f in self.filters],
                "skipped": self.skipped, "net": self.net.to_dict() if self.net else None}


def who_am_i() -> str:
    """Return who is acting, for the audit (the sudo user when there is one)."""
    user = os.environ.get("SUDO_USER") or ""
    try:
        user = user or getpass.getuser()
    except (KeyError, OSError):
        user = user or str(os.geteuid())
    return f"{user}@{os.uname().nodename}"


def _db(store: Any) -> Any:
    store.db.executescript(TABLES)
    return store.db


# --- planning --------------------------------------------------------------------------------------

def running_packages(observations: list[Observation], methods: list[str], vm: str,
                     owner: Owner | None = None) -> dict[str, Running]:
    """Return the binary packages executing in a scan's observations (as the running-vulnerable findings see it)."""
    view = merge(observations, methods, vm)
    return running_from_view(view, installed_from(observations), {}, mapped_paths(observations), owner, observations)


def listening_ports(observations: Iterable[Observation], pids: set[int]) -> set[int] | None:
    """Return the TCP ports `pids` listen on, or None when the scan saw no socket owned by them."""
    seen, ports = False, set()
    for o in observations:
        s = o.payload
        if not isinstance(s, Socket) or o.verdict == Verdict.UNVERIFIABLE or not set(s.owners) & pids:
            continue
        seen = True
        if s.proto.startswith("tcp") and s.state == "LISTEN" and s.local_port:
            ports.add(s.local_port)
    return ports if seen else None


def plan(vm: str, observations: list[Observation], methods: list[str], policy: dict[str, Mitigation], *,
         scan_id: int | None = None, owner: Owner | None = None, net: VmNet | None = None) -> FilterPlan:
    """Return the filters a scan's running code calls for under `policy` (no host change).

    With `net` (where the VM's traffic passes), a kind that cannot be put in force there (e.g. haproxy on
    a bridged tap, `ct count` without conntrack in the bridge) is left out with the reason."""
    out = FilterPlan(vm, scan_id, net=net)
    running = running_packages(observations, methods, vm, owner)
    procs = {o.payload.pid: o.payload.comm for o in observations if o.kind == "process" and hasattr(o.payload, "pid")}
    for m in sorted(policy.values(), key=lambda m: m.id):
        run = running.get(m.package)
        if run is None:
            continue
        covered = sorted(v for v in run.versions if m.covers(v))
        if not covered:
            out.skipped.append({"mitigation": m.id, "why": f"{m.package} {', '.join(sorted(run.versions))} runs, "
                                f"not in the vulnerable range (fixed in {m.fixed})"})
            continue
        listening = listening_ports(observations, run.pids)
        if listening is None:
            ports, source = m.ports, "from the policy: the scan saw no socket of these processes"
        else:
            ports, source = tuple(p for p in m.ports if p in listening), "listening in the scan"
        if not ports:
            heard = ", ".join(map(str, sorted(listening or ())))
            out.skipped.append({"mitigation": m.id, "why": f"{m.package} listens on none of ports "
                                f"{', '.join(map(str, m.ports))} (listening: {heard})"})
            continue
        why = nft.refusal(m.kind, net) if net is not None else None
        if why:
            out.skipped.append({"mitigation": m.id, "why": f"{m.kind} refused: {why}"})
            continue
        out.filters.append(PlannedFilter(m, covered[-1], ports, {
            "scan_id": scan_id, "processes": [{"pid": p, "comm": procs.get(p, "")} for p in sorted(run.pids)],
            "paths": sorted(run.paths), "methods": sorted(run.methods), "verdict": run.verdict,
            "versions": sorted(run.versions), "ports_from": source}))
    return out


def plan_latest(store: Any, vm: str, policy: dict[str, Mitigation], owner: Owner | None = None,
                net: VmNet | None = None) -> FilterPlan:
    """Return the plan from the latest stored scan of `vm` that obtained anything (checked against `net`)."""
    for rec in store.scans(vm, limit=20):
        if rec.summary.get("status", "ok") != "unverifiable":
            return plan(vm, store.load_observations(rec.id, vm), rec.methods, policy, scan_id=rec.id, owner=owner,
                        net=net)
    raise FilterError(f"no usable stored scan of {vm!r}; run `nephoscope scan {vm}` first")


# --- what is in force ------------------------------------------------------------------------------

@dataclass(slots=True)
class ActiveFilter:
    """A filter in force for a VM, as the store records it."""

    vm: str
    mitigation: str
    cve: str
    package: str
    version: str
    fixed: str
    introduced: str
    kind: str
    ports: tuple[int, ...]
    params: dict[str, Any]
    proxy_ports: tuple[int, ...]
    net: VmNet
    reason: str
    scan_id: int | None
    applied_at: float
    applied_by: str
    does: str = ""
    does_not_stop: str = ""

    def nft(self) -> NftFilter:
        """Return the nftables view of this filter."""
        return NftFilter(self.mitigation, self.cve, self.kind, self.ports, self.params, self.proxy_ports)

    def covers(self, version: str) -> bool:
        """Return whether `version` is still in the vulnerable range this filter was applied for."""
        return Mitigation(self.mitigation, self.cve, self.package, self.fixed, self.kind, self.ports, self.params,
                          introduced=self.introduced).covers(version)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        d = asdict(self)
        d["net"] = self.net.to_dict()
        d["ports"], d["proxy_ports"] = list(self.ports), list(self.proxy_ports)
        return d


def active(store: Any, vm: str | None = None) -> list[ActiveFilter]:
    """Return the filters in force (of one VM, or all), oldest first."""
    q = ("SELECT vm, mitigation, cve, package, version, fixed, introduced, kind, ports, params, proxy_ports, net, "
         "reason, scan_id, applied_at, applied_by, does, does_not_stop FROM filters")
    rows = _db(store).execute(q + (" WHERE vm = ?" if vm else "") + " ORDER BY applied_at",
                              (vm,) if vm else ()).fetchall()
    out = []
    for r in rows:
        net = json.loads(r[11])
        out.append(ActiveFilter(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], tuple(json.loads(r[8])),
                                json.loads(r[9]), tuple(json.loads(r[10])),
                                VmNet.from_dict(net), r[12], r[13], r[14],
                                r[15], r[16], r[17]))
    return out


def audit_log(store: Any, vm: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """Return the newest audit rows (of one VM, or all), newest first."""
    q = "SELECT id, at, who, vm, action, mitigation, cve, package, version, reason, rules FROM filter_audit"
    rows = _db(store).execute(q + (" WHERE vm = ?" if vm else "") + " ORDER BY id DESC LIMIT ?",
                              (vm, limit) if vm else (limit,)).fetchall()
    keys = ("id", "at", "who", "vm", "action", "mitigation", "cve", "package", "version", "reason", "rules")
    return [{**dict(zip(keys, r, strict=True)), "rules": json.loads(r[10])} for r in rows]


def rules_summary(f: NftFilter, net: VmNet) -> tuple[str, ...]:
    """Return the nft rules (and haproxy limits) one filter puts in force, one line each."""
    try:
        table = nft.ruleset("x", net, [f])
    except FilterError:  # a bridged tap (or its namespace) gone: the rules it had, without asking the kernel
        table = nft.ruleset("x", net, [f], nft.BridgeCaps(reject=True, conntrack=True),
                            nft.PortFacts("(the tap's MAC)", (f"{net.guest_ip or '0.0.0.0'}/0",)))
    lines = [ln.strip() for ln in table.splitlines() if f'comment "{f.mitigation} ' in ln]
    if f.kind == "haproxy-h2":
        lines += [f"haproxy: max {f.params['max_concurrent_streams']} concurrent streams; drop a connection "
                  f"opening more than {f.params['streams_per_conn_10s']} streams in 10 s; upstream "
                  f"{f.params['upstream']} to {net.guest_ip}:{port}" for port in f.ports]
    return tuple(lines)


# --- changing what is in force ---------------------------------------------------------------------

def store_owner(store: Any) -> str:
    """Return the short id tagging what `store` puts on the host (tables, haproxy state): its resolved path's hash.

    Two stores on one host (two `NEPHOSCOPE_DB`s, a test run beside the operator's) get different ids, and
    `gc` collects only what carries its own id or none (tables from before the tag)."""
    path = getattr(store, "path", None)
    return hashlib.sha256(str(Path(path).resolve() if path else "").encode()).hexdigest()[:12]


def _put_in_force(vm: str, net: VmNet, filters: list[NftFilter], owner: str = "") -> None:
    """Start/stop the VM's haproxy and replace its nft table so exactly `filters` are in force."""
    l7 = [f for f in filters if f.kind == "haproxy-h2"]
    haproxy.track(vm, net, owner)
    if l7:
        haproxy.start(vm, net, l7, owner)
    nft.apply_table(vm, net, filters, owner)
    if not l7:  # keep net.json until the store has the rows: a table in another netns stays findable by gc
        haproxy.stop(vm, keep_track=True)


def _record(store: Any, changes: list[FilterChange], upserts: list[ActiveFilter], deletes: list[tuple[str, str]]
            ) -> None:
    db = _db(store)
    with db:
        for a in upserts:
            db.execute("INSERT OR REPLACE INTO filters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (a.vm, a.mitigation, a.cve, a.package, a.version, a.fixed, a.introduced, a.kind,
                        json.dumps(list(a.ports)), json.dumps(a.params), json.dumps(list(a.proxy_ports)),
                        json.dumps(a.net.to_dict()), a.reason, a.scan_id, a.applied_at, a.applied_by, a.does,
                        a.does_not_stop))
        for vm, mitigation in deletes:
            db.execute("DELETE FROM filters WHERE vm = ? AND mitigation = ?", (vm, mitigation))
        db.executemany("INSERT INTO filter_audit (at, who, vm, action, mitigation, cve, package, version, reason, "
                       "rules) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [(c.at, c.who, c.vm, c.action, c.mitigation, c.cve, c.package, c.version, c.reason,
                         json.dumps(list(c.rules_summary))) for c in changes])


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Make SIGTERM raise SystemExit while a change is under way, so the rollback below runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _transition(store: Any, vm: str, net: VmNet, before: list[ActiveFilter], after: list[ActiveFilter],
                changes: list[FilterChange]) -> None:
    """Put `after` in force instead of `before`, then record it; on any failure put `before` back."""
    with _sigterm_unwinds():
        _change(store, vm, net, before, after, changes)


def _change(store: Any, vm: str, net: VmNet, before: list[ActiveFilter], after: list[ActiveFilter],
            changes: list[FilterChange]) -> None:
    try:
        _put_in_force(vm, net, [a.nft() for a in after], store_owner(store))
        keep = {a.mitigation for a in after}
        _record(store, changes, after, [(vm, b.mitigation) for b in before if b.mitigation not in keep])
        if not any(a.kind == "haproxy-h2" for a in after):
            haproxy.untrack(vm)  # the store rows now say where the table is
    except BaseException as exc:
        with contextlib.suppress(NephoscopeError):  # if even that fails, gc compares the store with what is live
            _put_in_force(vm, before[0].net if before else net, [b.nft() for b in before], store_owner(store))
            if not any(b.kind == "haproxy-h2" for b in before):
                haproxy.untrack(vm)
        if isinstance(exc, NephoscopeError | KeyboardInterrupt | SystemExit):
            raise
        raise FilterError(f"applying filters of {vm} failed: {exc}") from exc


def apply(store: Any, vm: str, net: VmNet, planned: FilterPlan, *, only: Iterable[str] = (), who: str | None = None,
          alive: Callable[[str], bool] | None = None) -> list[FilterChange]:
    """Put the planned filters (or `only` those mitigation ids) in force for `vm`; return what changed.

    Idempotent: filters already in force with the same rules are not changed or audited again (the VM's
    table is still rewritten, which repairs a table someone deleted by hand)."""
    gc(store, alive)
    who = who or who_am_i()
    wanted = [p for p in planned.filters if not only or p.mitigation.id in set(only)]
    missing = set(only) - {p.mitigation.id for p in planned.filters}
    if missing:
        why = "; ".join(f"{s['mitigation']}: {s['why']}" for s in planned.skipped if s["mitigation"] in missing)
        raise FilterError(f"not in the plan of {vm}: {', '.join(sorted(missing))}" + (f" ({why})" if why else "")
                          + f"; `nephoscope filters plan {vm}`")
    before = active(store, vm)
    if before and before[0].net != net:
        raise FilterError(f"{vm}'s filters are in force on {before[0].net.to_dict()}, not {net.to_dict()}; "
                          f"`nephoscope filters remove {vm}` first")
    now = time.time()
    after = {b.mitigation: b for b in before}
    changes = []
    for p in wanted:
        m = p.mitigation
        proxies = tuple(haproxy.proxy_port(vm, port) for port in p.ports) if m.kind == "haproxy-h2" else ()
        new = ActiveFilter(vm, m.id, m.cve, m.package, p.version, m.fixed, m.introduced, m.kind, p.ports,
                           dict(m.params), proxies, net, p.reason(), planned.scan_id, now, who, m.does, m.does_not_stop)
        old = after.get(m.id)
        if old is not None and old.nft() == new.nft():
            continue
        after[m.id] = new
        changes.append(FilterChange(vm, APPLIED, m.id, m.cve, m.package, p.version, m.kind, p.ports,
                                    rules_summary(new.nft(), net), new.reason, who, now, m.does, m.does_not_stop))
    _transition(store, vm, net, before, list(after.values()), changes)
    return changes


def remove(store: Any, vm: str, mitigations: Iterable[str] = (), *, reason: str = "removed by the operator",
           who: str | None = None, action: str = REMOVED) -> list[FilterChange]:
    """Take `vm`'s filters (all, or the named mitigation ids) out of force; return what changed."""
    before = active(store, vm)
    names = set(mitigations)
    unknown = names - {b.mitigation for b in before}
    if unknown:
        raise FilterError(f"{vm} has no filter {', '.join(sorted(unknown))} in force; `nephoscope filters list`")
    gone = [b for b in before if not names or b.mitigation in names]
    if not gone:
        return []
    who, now = who or who_am_i(), time.time()
    changes = [FilterChange(vm, action, b.mitigation, b.cve, b.package, b.version, b.kind, b.ports,
                            rules_summary(b.nft(), b.net), reason, who, now, b.does, b.does_not_stop) for b in gone]
    _transition(store, vm, gone[0].net, before, [b for b in before if b not in gone], changes)
    return changes


def expire(store: Any, vm: str, observations: list[Observation], methods: list[str], *,
           owner: Owner | None = None) -> list[FilterChange]:
    """Remove `vm`'s filters a new scan no longer justifies (fixed version running, or the code not running).

    "Not running" needs a scan that could have seen it: process executables observed and a path -> package
    lookup (`owner`). A scan that obtained nothing, saw no process or had no lookup expires nothing on
    absence (absence of evidence is not evidence), only on a fixed version seen running."""
    before = active(store, vm)
    if not before or not any(o.kind == "process" and o.verdict != Verdict.UNVERIFIABLE for o in observations):
        return []
    running = running_packages(observations, methods, vm, owner)
    could_see = owner is not None and bool(mapped_paths(observations))
    changes: list[FilterChange] = []
    for b in before:
        run = running.get(b.package)
        if run is None and not could_see:
            continue
        if run is None:
            why = f"{b.package} is no longer executing in the latest scan"
        elif not any(b.covers(v) for v in run.versions):
            why = f"{b.package} {', '.join(sorted(run.versions))} is executing: the fixed version ({b.fixed} or later)"
        else:
            continue
        changes += remove(store, vm, [b.mitigation], reason=f"expired: {why}", who="nephoscope scan",
                          action=EXPIRED)
    return changes


def net_present(net: VmNet) -> bool:
    """Return whether the VM's tap device still exists (in its namespace): False means the VM is gone."""
    argv = ["ip", *(["-n", net.netns] if net.netns else []), "link", "show", "dev", net.tap]
    try:
        return subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: keep the filter


def gc(store: Any, alive: Callable[[str], bool] | None = None) -> list[FilterChange]:
    """Remove the filters of VMs that are gone, and reap haproxy processes and tables no filter owns."""
    changes: list[FilterChange] = []
    rows = active(store)
    for vm in sorted({a.vm for a in rows}):
        mine = [a for a in rows if a.vm == vm]
        gone = not net_present(mine[0].net) or (alive is not None and not alive(vm))
        if gone:
            try:
                changes += remove(store, vm, reason="collected: the VM (or its tap device) is gone",
                                  who="nephoscope gc", action=COLLECTED)
            except FilterError:  # its namespace went with it: nothing live is left to take away
                _record(store, [], [], [(vm, a.mitigation) for a in mine])
    rows = active(store)
    with_l7 = {a.vm for a in rows if a.kind == "haproxy-h2"}
    spaces = {a.net.netns for a in rows} | {""}
    mine = store_owner(store)
    for vm, directory, net in haproxy.iter_tracked():
        if haproxy.tracked_owner(directory) not in ("", mine):
            continue  # another store's filter state (a second NEPHOSCOPE_DB on this host): not ours to reap
        if net is not None:
            spaces.add(net.netns)
        if vm not in with_l7:
            haproxy.stop_dir(directory)  # a VM with only nft filters needs no state: its rows name its netns
    owned = {nft.table_name(a.vm) for a in rows}
    for netns in sorted(spaces):
        try:
            for name in nft.live_tables(netns) - owned:
                if nft.table_owner(netns, name) in ("", mine):  # None: gone meanwhile; another id: another store's
                    nft.delete_table_named(netns, name)
        except FilterError:
            continue
    return changes
