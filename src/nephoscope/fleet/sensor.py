"""The sensor: scan this host's VMs by policy and push each scan to the fleet server, buffering on disk.

One sweep: discover the VMs (as `nephoscope vms`), pick per VM the methods that are due by the policy,
take the VM's lock (no VM is scanned twice at once, even by two sensor processes), scan, write the
scan document to the on-disk outbox, then push the outbox oldest first. A push that fails leaves the
document in the outbox for the next sweep; its idempotency key, fixed when the document was written,
makes a retry of a push that did land a no-op on the server. CPU and memory are bounded per host:
a sweep starts no new VM once its CPU budget is spent (the rest are deferred, not dropped, and go
first next sweep; every sweep scans at least one VM), and the
data segment is capped (RLIMIT_DATA) when the policy says so; each sweep reports what it used.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import re
import resource
import socket
import sqlite3
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nephoscope.core.errors import NephoscopeError
from nephoscope.hypervisor.discover import Discovery, HostVm

DEFAULT_POLICY = """\
# nephoscope sensor policy: which method runs how often on which VMs
interval_s = 60          # the sensor sweeps this often (`--once`: one sweep)
include = ["*"]          # VM names (globs) to scan
exclude = []
high_risk = []           # VM names flagged high-risk locally (the server's flag is added on each push)

[budget]
cpu_s_per_sweep = 120    # no further VM is started in a sweep once its CPU time exceeds this
memory_mib = 0           # cap on the data segment (RLIMIT_DATA), 0 = none
nice = 10                # scheduling niceness of the sensor

[[rule]]
method = "inspect"
every_s = 60

[[rule]]
method = "arch"
every_s = 600

[[rule]]
method = "checkpoint"
every_s = 86400          # nightly

[[rule]]
method = "trap"
every_s = 300
high_risk_only = true
"""


class SensorError(NephoscopeError):
    """The sensor's policy, state directory or server could not be used."""


@dataclass(frozen=True, slots=True)
class Rule:
    """Run `method` on a VM every `every_s` seconds (only on high-risk VMs when `high_risk_only`)."""

    method: str
    every_s: float
    high_risk_only: bool = False


@dataclass(slots=True)
class Policy:
    """What the sensor scans, how often, and within which budget."""

    rules: list[Rule]
    interval_s: float = 60.0
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    high_risk: list[str] = field(default_factory=list)
    cpu_s_per_sweep: float = 120.0
    memory_mib: int = 0
    nice: int = 10

    def wants(self, name: str) -> bool:
        """Return whether a VM of this name is to be scanned at all."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and \
            not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


def parse_policy(text: str) -> Policy:
    """Return the policy a TOML text describes; raise SensorError naming what does not fit."""
    try:
        raw = tomllib.loads(text)
        budget = raw.get("budget", {})
        rules = [Rule(str(r["method"]), float(r["every_s"]), bool(r.get("high_risk_only", False)))
                 for r in raw.get("rule", [])]
        policy = Policy(rules, float(raw.get("interval_s", 60)), [str(x) for x in raw.get("include", ["*"])],
                        [str(x) for x in raw.get("exclude", [])], [str(x) for x in raw.get("high_risk", [])],
                        float(budget.get("cpu_s_per_sweep", 120)), int(budget.get("memory_mib", 0)),
                        int(budget.get("nice", 10)))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SensorError(f"the sensor policy does not fit: {exc}; see docs/fleet.md for its form") from exc
    if not policy.rules:
        raise SensorError("the sensor policy has no [[rule]]: nothing would ever be scanned")
    return policy


def load_policy(path: Path | None) -> Policy:
    """Return the policy in `path` (TOML), or the default one."""
    if path is None:
        return parse_policy(DEFAULT_POLICY)
    try:
        return parse_policy(path.read_text())
    except OSError as exc:
        raise SensorError(f"cannot read the sensor policy {path}: {exc}") from exc


# ------------------------------------------------------------------------------------ on-disk outbox

class Outbox:
    """Scan documents waiting to be pushed: one JSON file each, written atomically, pushed oldest first."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def put(self, push: dict[str, Any]) -> Path:
        """Write one push (with its idempotency key) durably and return its file."""
        name = f"{time.time_ns():020d}-{push['idempotency_key']}.json"
        tmp = self.dir / f".{name}.tmp"
        with tmp.open("w") as f:
            json.dump(push, f, default=str)
            f.flush()
            os.fsync(f.fileno())
        path = self.dir / name
        os.replace(tmp, path)
        return path

    def pending(self) -> list[Path]:
        """Return the waiting documents, oldest first."""
        return sorted(p for p in self.dir.glob("*.json") if not p.name.startswith("."))

    def __len__(self) -> int:
        return len(self.pending())


# ------------------------------------------------------------------------------------ the server

class Client:
    """The sensor's HTTP client: pushes with a bearer token (stdlib only: a sensor needs no web stack)."""

    def __init__(self, server: str, token: str, timeout: float = 30.0) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout

    def push(self, push: dict[str, Any], path: str = "/api/v1/scans") -> dict[str, Any]:
        """POST one scan (or, with `path`, another push); return the answer; raise OSError when the server is away."""
        body = json.dumps(push, default=str).encode()
        req = urllib.request.Request(f"{self.server}{path}", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            if exc.code >= 500 or exc.code == 429:
                raise OSError(f"server error {exc.code}: {detail}") from exc
            if exc.code == 401:  # the token, not the scan: keep the outbox until a valid token is given
                raise OSError("the server refused this sensor's token (401: unknown or expired); the scans stay "
                              "in the outbox until the token file holds a valid one") from exc
            raise SensorError(f"the server refused the scan ({exc.code}): {detail}") from exc

    def fetch_kb(self, dest: Path) -> bool:
        """Download the central code-page DB to `dest` unless the cached copy is current; return if it changed."""
        return self._fetch("/api/v1/kb/snapshot", dest, "code-page KB")

    def fetch_vulns(self, dest: Path) -> bool:
        """Download the central vulnerability DB to `dest` unless the cached copy is current; return if it changed."""
        return self._fetch("/api/v1/kb/vulns", dest, "vulnerability DB")

    def _fetch(self, path: str, dest: Path, what: str) -> bool:
        etag_file = dest.with_suffix(dest.suffix + ".etag")
        headers = {"Authorization": f"Bearer {self.token}"}
        if dest.exists() and etag_file.exists():
            headers["If-None-Match"] = etag_file.read_text().strip()
        req = urllib.request.Request(f"{self.server}{path}", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=max(self.timeout, 300)) as resp:
                tmp = dest.with_suffix(".part")
                with tmp.open("wb") as f:
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                os.replace(tmp, dest)
                etag_file.write_text(resp.headers.get("ETag", ""))
                return True
        except urllib.error.HTTPError as exc:
            if exc.code == 304:
                return False
            raise SensorError(f"the server did not give its {what} ({exc.code})") from exc


def fetch_knowledge(client: Client, state_dir: Path) -> dict[str, bool]:
    """Bring the server's code-page KB and vulnerability DB into `state_dir` and make this process use them.

    Each is downloaded only when its ETag changed; the methods and the report then open them by their
    default paths (NEPHOSCOPE_KB, NEPHOSCOPE_VULNS). Returns which of them were downloaded anew. When the
    server is away, a copy cached by an earlier run is used; with none, SensorError."""
    changed = {}
    for key, env, fetch in (("kb", "NEPHOSCOPE_KB", client.fetch_kb), ("vulns", "NEPHOSCOPE_VULNS",
                                                                       client.fetch_vulns)):
        dest = state_dir / f"{key}.sqlite"
        try:
            changed[key] = fetch(dest)
        except OSError as exc:
            if not dest.exists():
                raise SensorError(f"cannot fetch the server's {key} and none is cached in {state_dir}: {exc}") from exc
            changed[key] = False
        os.environ[env] = str(dest)
    return changed


# ------------------------------------------------------------------------------------ the sweep

@dataclass(slots=True)
class SweepReport:
    """What one sweep did and what it cost."""

    scanned: dict[str, list[str]] = field(default_factory=dict)  # vm -> methods run
    skipped: dict[str, str] = field(default_factory=dict)  # vm -> why not scanned
    errors: dict[str, str] = field(default_factory=dict)
    pushed: int = 0
    buffered: int = 0  # documents left in the outbox
    push_error: str | None = None
    cpu_s: float = 0.0
    wall_s: float = 0.0
    max_rss_mib: float = 0.0
    scan_ids: dict[str, int] = field(default_factory=dict)  # idempotency key -> server scan id
    kb_sharing: dict[str, int] = field(default_factory=dict)  # the sweep's shared KB: asked vs looked up
    responses: int = 0  # VMs whose filters and notices were pushed

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


def _cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def vm_lock(directory: Path, vm: str) -> Iterator[bool]:
    """Hold the VM's scan lock (an flock: released if the sensor dies); yield False when another holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", vm)[:100] + "-" + uuid.uuid5(uuid.NAMESPACE_URL, vm).hex[:8]
    fd = os.open(directory / f"{safe}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


Scanner = Callable[[HostVm, list[str]], dict[str, Any]]  # returns the scan document to push
ResponseSource = Callable[[str], dict[str, list[dict[str, Any]]]]  # VM name -> its filters, audit, notices


def local_response(vm: str, store_path: Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """Return `vm`'s filters in force, filter audit rows and notices from this host's store (default: its own)."""
    from nephoscope.service.filters import audit, list_filters
    from nephoscope.service.notices import list_notices
    from nephoscope.store.sqlite import Store

    store = Store(store_path)
    try:
        return {"filters": list_filters(vm, store), "audit": audit(vm, store),
                "notices": [n.to_dict() for n in list_notices(vm, store=store)]}
    finally:
        with contextlib.suppress(Exception):
            store.close()


def local_scan(vm: HostVm, methods: list[str], kb: Any = None) -> dict[str, Any]:
    """Scan one VM with the given methods and return its document (no local store: the server is the store).

    `kb`: the sweep's shared code-page KB (fleet.sweepkb.SweepKb) for the arch method."""
    from nephoscope.service.scan import run_scan

    options: dict[str, dict[str, object]] | None = {"arch": {"db": kb}} if kb is not None else None
    return scan_document(run_scan(vm.target, methods, options=options))


def scan_document(result: Any) -> dict[str, Any]:
    """Return what is pushed for one scan: `scan --json`'s document, the raw observations and the owner's report."""
    doc: dict[str, Any] = {"scan": result.to_dict(), "observations": [o.to_dict() for o in result.observations]}
    try:
        from nephoscope.service.report import report_from_result

        doc["report"] = report_from_result(result).to_dict()
    except NephoscopeError as exc:
        doc["report"] = None
        doc["report_error"] = str(exc)
    return doc


class Sensor:
    """One host's sensor: policy, state directory (outbox, locks, schedule), server client."""

    def __init__(self, client: Client | None, policy: Policy, state_dir: Path, *, host: str | None = None,
                 discover: Callable[[], Discovery] | None = None, scanner: Scanner | None = None,
                 clock: Callable[[], float] = time.time, share_kb: bool = True,
                 response: ResponseSource | None = local_response) -> None:
        self.client = client
        self.policy = policy
        self.state_dir = state_dir
        self.host = host or socket.gethostname()
        self.outbox = Outbox(state_dir / "outbox")
        self.locks = state_dir / "locks"
        self.discover = discover or _discover
        self.scanner = scanner or self._scan_local
        self.share_kb = share_kb
        self.response = response  # None: filters and notices are not reported
        self.sweep_kb: Any = None  # the sweep's shared KB while a sweep runs (fleet.sweepkb)
        self.clock = clock
        self.state_file = state_dir / "state.json"
        self.state = self._load_state()

    def _load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            state = {}
        if not isinstance(state, dict):
            state = {}
        state.setdefault("last", {})
        state.setdefault("high_risk", {})
        state.setdefault("response_due", [])  # VMs whose filters and notices are to be pushed
        return state

    def _save_state(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.state_file)

    def high_risk(self, vm: str) -> bool:
        """Return whether a VM is flagged high-risk (by the local policy or by the server's last answer)."""
        return vm in self.policy.high_risk or bool(self.state["high_risk"].get(vm))

    def due(self, vm: HostVm, now: float) -> list[str]:
        """Return the methods due on `vm` now, in policy order, among those that can reach it."""
        last = self.state["last"].get(vm.name, {})
        out = []
        for rule in self.policy.rules:
            if rule.high_risk_only and not self.high_risk(vm.name):
                continue
            if vm.methods and vm.methods.get(rule.method, "unknown") is not None:
                continue  # the method cannot reach this VM (`nephoscope vms` says why)
            if now - float(last.get(rule.method, 0)) >= rule.every_s and rule.method not in out:
                out.append(rule.method)
        return out

    def _scan_local(self, vm: HostVm, methods: list[str]) -> dict[str, Any]:
        if "arch" in methods and self.share_kb and self.sweep_kb is None:
            from nephoscope.fleet.sweepkb import SweepKb
            from nephoscope.knowledge.binaries import CodePageDB

            with contextlib.suppress(NephoscopeError):  # no KB: arch says so itself, per VM
                self.sweep_kb = SweepKb(CodePageDB.open())
        return local_scan(vm, methods, self.sweep_kb)

    def sweep(self) -> SweepReport:
        """Scan every due VM once (within the CPU budget), buffer the documents, push the outbox."""
        report = SweepReport()
        wall, cpu0 = time.monotonic(), _cpu_s()
        try:
            self._sweep_vms(report, cpu0)
        finally:
            if self.sweep_kb is not None:
                report.kb_sharing = self.sweep_kb.sharing()
                self.sweep_kb.close()
                self.sweep_kb = None
        self._save_state()
        self.flush(report)
        report.cpu_s = round(_cpu_s() - cpu0, 3)
        report.wall_s = round(time.monotonic() - wall, 3)
        report.max_rss_mib = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return report

    def _sweep_vms(self, report: SweepReport, cpu0: float) -> None:
        found = self.discover()
        # least recently scanned first: a VM deferred by the CPU budget is first in line next sweep
        order = sorted(found.vms, key=lambda v: max(self.state["last"].get(v.name, {}).values(), default=0.0))
        for vm in order:
            if not self.policy.wants(vm.name):
                continue
            if not vm.running:
                report.skipped[vm.name] = f"not running ({vm.state})"
                continue
            started_one = bool(report.scanned or report.errors)  # every sweep makes progress on one VM
            if started_one and _cpu_s() - cpu0 >= self.policy.cpu_s_per_sweep:
                report.skipped[vm.name] = "deferred: this sweep's CPU budget is spent"
                continue
            methods = self.due(vm, self.clock())
            if not methods:
                report.skipped[vm.name] = "nothing due"
                continue
            with vm_lock(self.locks, vm.name) as mine:
                if not mine:
                    report.skipped[vm.name] = "being scanned by another sweep"
                    continue
                self._scan_one(vm, methods, report)

    def _scan_one(self, vm: HostVm, methods: list[str], report: SweepReport) -> None:
        started = self.clock()
        try:
            document = self.scanner(vm, methods)
        except (NephoscopeError, MemoryError) as exc:
            report.errors[vm.name] = f"{type(exc).__name__}: {exc}"
            return
        finished = self.clock()
        self.outbox.put({"idempotency_key": f"{self.host}.{uuid.uuid4().hex}", "host": self.host, "vm": vm.name,
                         "started": started, "finished": finished, "document": document})
        last = self.state["last"].setdefault(vm.name, {})
        for m in methods:
            last[m] = started
        report.scanned[vm.name] = methods
        if vm.name not in self.state["response_due"]:
            self.state["response_due"].append(vm.name)

    def flush(self, report: SweepReport | None = None) -> SweepReport:
        """Push every buffered document, oldest first; stop at the first failure (the server is away)."""
        report = report or SweepReport()
        if self.client is None:
            report.buffered = len(self.outbox)
            return report
        for path in self.outbox.pending():
            try:
                push = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                path.rename(path.with_suffix(".bad"))
                report.errors[path.name] = f"unreadable buffered scan set aside: {exc}"
                continue
            try:
                answer = self.client.push(push)
            except OSError as exc:
                report.push_error = str(exc)
                break
            except SensorError as exc:  # refused for good (4xx): keep it aside, do not retry forever
                path.rename(path.with_suffix(".refused"))
                report.errors[push.get("vm", path.name)] = str(exc)
                continue
            report.scan_ids[push["idempotency_key"]] = int(answer.get("scan_id", 0))
            self.state["high_risk"][push["vm"]] = bool(answer.get("high_risk"))
            path.unlink()
            report.pushed += 1
        if report.push_error is None:
            self._push_responses(report)
        self._save_state()
        report.buffered = len(self.outbox)
        return report

    def _push_responses(self, report: SweepReport) -> None:
        """Push the filters and notices of each VM scanned since the last successful push (a snapshot: a
        failed push is simply taken again next sweep, with the state of then)."""
        if self.client is None or self.response is None:
            return
        for vm in list(self.state["response_due"]):
            try:
                records = self.response(vm)
            except (NephoscopeError, sqlite3.Error, OSError) as exc:
                report.errors[f"{vm} (filters and notices)"] = f"{type(exc).__name__}: {exc}"
                continue
            try:
                self.client.push({"host": self.host, "vm": vm, **records}, path="/api/v1/response")
            except OSError as exc:
                report.push_error = str(exc)
                return
            except SensorError as exc:
                report.errors[f"{vm} (filters and notices)"] = str(exc)
            self.state["response_due"].remove(vm)
            report.responses += 1


def _discover() -> Discovery:
    from nephoscope.hypervisor.discover import discover

    return discover()


def apply_budget(policy: Policy) -> None:
    """Lower the sensor's priority and cap its data segment as the policy says (this process)."""
    if policy.nice:
        with contextlib.suppress(OSError):
            os.nice(policy.nice)
    if policy.memory_mib > 0:
        limit = policy.memory_mib << 20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
