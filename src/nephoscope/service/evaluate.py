"""The evaluation the seed only argued: every method on the clean and tampered lab guests, measured.

Power: share of the ground truth's executing binaries each method sees, and identifies with the exact
package version. Robustness: per tampering technique, whether each method detects it, misses it, or
says it cannot tell. Unintrusiveness: guest-visible pause, slowdown of a CPU-bound loop inside the guest
while the method runs repeatedly, and host CPU time.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from nephoscope.core.errors import ConnectorError
from nephoscope.core.payloads import Image, Process, UnknownCode
from nephoscope.core.records import Verdict
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.lab import runner
from nephoscope.lab.build import build_image
from nephoscope.lab.profile import load_profile
from nephoscope.service.methods import get_method
from nephoscope.service.scan import ScanResult, run_scan
from nephoscope.service.targets import resolve_target
from nephoscope.store.sqlite import Store

if TYPE_CHECKING:
    from nephoscope.knowledge.sync import SyncReport

Progress = Callable[[str], None]
BENCH_LOOP = 60000
BENCH_SCRIPT = ("read s x < /proc/uptime; i=0; while [ $i -lt {n} ]; do i=$((i+1)); done; "
                "read e x < /proc/uptime; echo $s $e")
DETECTED, MISSED, UNVERIFIABLE = "detected", "missed", "unverifiable"


@dataclass(slots=True)
class MethodScore:
    """One method's measured numbers on one profile."""

    method: str
    profile: str
    truth_processes: int = 0
    seen: int = 0
    identified: int = 0  # with the exact package version
    techniques: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    pause_s: float = 0.0
    guest_slowdown: float | None = None  # in-guest time of the CPU loop, ratio to undisturbed
    wall_slowdown: float | None = None  # host-observed time of the same loop (includes pauses)
    findings: list[str] = field(default_factory=list)
    unverifiable: list[str] = field(default_factory=list)
    short_lived: str = ""  # event-driven methods (driver): how a 50 ms process was seen ("" = not measured)
    event_cost_ns: dict[str, int] = field(default_factory=dict)  # driver: guest kernel ns per event, by kind

    @property
    def power_seen(self) -> float:
        return self.seen / self.truth_processes if self.truth_processes else 0.0

    @property
    def power_identified(self) -> float:
        return self.identified / self.truth_processes if self.truth_processes else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {**asdict(self), "power_seen": round(self.power_seen, 3),
                "power_identified": round(self.power_identified, 3)}


def truth_processes(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the long-lived user processes of a manifest (the ground truth every method should see)."""
    return [p for p in manifest["processes"]
            if p["exe"] and not (p["comm"] == "sleep" and p["cmdline"][-1:] == ["3600"])]


def _basename(path: str) -> str:
    return os.path.basename(path.removesuffix(" (deleted)"))


def score_power(result: ScanResult, truth: list[dict[str, Any]]) -> tuple[int, int]:
    """Return (seen, identified with exact version) for the truth processes in a scan."""
    seen = identified = 0
    views = result.view.processes
    for t in truth:
        view = views.get(t["pid"])
        if view is None:
            continue
        seen += 1
        if t["package"] and any(b.get("package") == t["package"] and t["version"] in b.get("versions", [])
                                and _basename(b.get("path", "")) == _basename(t["binary"]) for b in view.binaries):
            identified += 1
    return seen, identified


def _finding_pids(result: ScanResult, kind: str) -> set[int]:
    pids: set[int] = set()
    for f in result.view.findings:
        if f.kind != kind:
            continue
        for ev in f.evidence:
            if "pid" in ev:
                pids.add(int(ev["pid"]))
            cr3 = (ev.get("data") or {}).get("cr3") if isinstance(ev.get("data"), dict) else None
            if cr3 is not None:
                pids |= {pid for pid, v in result.view.processes.items()
                         if any(b.get("cr3") == cr3 for b in v.binaries)}
    return pids


def _pids_with_status(result: ScanResult, status: str) -> set[int]:
    return {pid for pid, v in result.view.processes.items() if any(b.get("status") == status for b in v.binaries)}


def score_techniques(result: ScanResult, manifest: dict[str, Any]) -> dict[str, str]:
    """Return technique id -> detected / missed / unverifiable for one single-method scan."""
    procs = result.view.processes
    children = {p["pid"]: p["ppid"] for p in manifest["processes"]}

    def family(pid: int) -> set[int]:
        return {pid} | {c for c in children if children.get(c) == pid}

    unknown = _pids_with_status(result, "unknown")
    modified = _pids_with_status(result, "modified") | _finding_pids(result, "modified-binary")
    rules: dict[str, Callable[[set[int]], bool]] = {
        "masquerade": lambda f: bool(f & (_finding_pids(result, "masquerading") | true_binary_seen)),
        "deleted-binary": lambda f: bool(f & _finding_pids(result, "deleted-binary")),
        "fileless-memfd": lambda f: bool(f & _finding_pids(result, "fileless")),
        "code-injection": lambda f: bool(f & (unknown | _finding_pids(result, "anonymous-exec"))),
        "trojaned-binary": lambda f: bool(f & modified),
        "preload-hidden": lambda f: bool(f & set(procs)),
        "unpackaged-binary": lambda f: bool(f & (unknown | _finding_pids(result, "unknown-code"))),
    }
    kinds = {f.kind for f in result.view.findings}
    hidden_modules = {str(ev.get("module")) for f in result.view.findings if f.kind == "hidden-module"
                      for ev in f.evidence}
    # the driver's table against inspect: the task it lacks is the hidden one (analysis/driver.py)
    hidden_pids = _finding_pids(result, "hidden-process") | _finding_pids(result, "driver-view-mismatch")
    rules.update({  # the rootkit profile's kernel techniques (lab/rootkit/nphrk.c)
        "dkom-hidden-task": lambda f: bool(f & hidden_pids),
        # the /proc entry is gone but the task list keeps it: a hidden-process finding (the guest's ls misses
        # a task a kernel view has), or the ftrace hook itself
        "ftrace-hidden-process": lambda f: bool(f & hidden_pids) or bool(kinds & {"ftrace-hook", "kprobe-hook"})
        or code["ftrace-hidden-process"],
    })
    code = kernel_code_detections(result, manifest)
    kernel_rules: dict[str, Callable[[dict[str, Any]], bool]] = {
        "hidden-module": lambda t: t.get("module", "") in hidden_modules or "?" in hidden_modules
        or code["hidden-module"],
        "syscall-hook": lambda t: "syscall-hook" in kinds,
        "inline-patch": lambda t: "inline-hook" in kinds or code["inline-patch"],
    }
    out = {}
    nothing_seen = not procs
    masq = next((t for t in manifest.get("techniques", []) if t["id"] == "masquerade"), None)
    true_binary_seen = identified_as(result, _basename(masq["binary"])) if masq else set()
    for tech in manifest.get("techniques", []):
        if tech.get("kind") == "kernel":  # no process of its own: judged by the kernel findings
            if tech["id"] in kernel_rules:
                out[tech["id"]] = DETECTED if kernel_rules[tech["id"]](tech) else \
                    (UNVERIFIABLE if nothing_seen else MISSED)
            continue
        rule = rules.get(tech["id"])
        if rule is None:
            continue
        if nothing_seen:
            out[tech["id"]] = UNVERIFIABLE
        else:
            out[tech["id"]] = DETECTED if rule(family(tech["pid"])) else MISSED
    return out


def _kernel_log(manifest: dict[str, Any], pattern: str) -> list[re.Match[str]]:
    return [m for line in manifest.get("kernel_log", []) if (m := re.search(pattern, line))]


def _kernel_changes(result: ScanResult) -> list[dict[str, Any]]:
    """Return the changed byte runs (function, site) of every modified-kernel-code finding of arch."""
    out = []
    for f in result.view.findings:
        if f.kind == "modified-kernel-code":
            for ev in f.evidence:
                data = ev.get("data")
                if isinstance(data, dict):
                    out += [c for c in data.get("changes", []) if isinstance(c, dict)]
    return out


def kernel_code_detections(result: ScanResult, manifest: dict[str, Any]) -> dict[str, bool]:
    """Return which rootkit techniques kernel code identity (arch's modified/unknown kernel code) shows.

    inline-patch: a changed run in the function nphrk logs as patched; ftrace-hidden-process: the fentry
    (mcount) site of the function it logs as hooked calls elsewhere; hidden-module: unknown kernel code
    holding an address nphrk logs as its own (the hook and jump targets), or any when it logged none."""
    changes = _kernel_changes(result)
    changed = {(str(c.get("function", "")).split("+")[0], str(c.get("site", ""))) for c in changes}
    patched = {m.group(1) for m in _kernel_log(manifest, r"(\S+) at \w+ now jumps to")}
    hooked = {m.group(1) for m in _kernel_log(manifest, r"ftrace hook on (\w+)")}
    own = {int(m.group(1), 16) for m in _kernel_log(manifest, r"(?:-> |jumps to )([0-9a-f]{8,16})\b")}
    unknown = [(int(ev["data"]["gva_start"]), int(ev["data"]["gva_end"])) for f in result.view.findings
               if f.kind == "unknown-kernel-code" for ev in f.evidence if isinstance(ev.get("data"), dict)]
    return {
        "inline-patch": any(fn in patched for fn, _site in changed),
        "ftrace-hidden-process": any(fn in hooked and site == "mcount" for fn, site in changed),
        "hidden-module": bool(unknown) and (not own or any(a <= x < b for x in own for a, b in unknown)),
    }


def identified_as(result: ScanResult, binary_name: str) -> set[int]:
    """Return pids whose executing code the method identified as the binary named `binary_name`."""
    return {pid for pid, v in result.view.processes.items()
            if any(_basename(b.get("path", "")) == binary_name and b.get("status") == "identified"
                   for b in v.binaries)}


def guest_cpu_loop(agent: GuestAgent, n: int = BENCH_LOOP) -> tuple[float, float]:
    """Run a CPU-bound shell loop in the guest; return (in-guest seconds, host-observed seconds)."""
    return timed_guest_script(agent, BENCH_SCRIPT.format(n=n), timeout=300)


def timed_guest_script(agent: GuestAgent, script: str, timeout: float) -> tuple[float, float]:
    """Run a shell `script` that echoes two /proc/uptime readings; return (in-guest seconds, host seconds)."""
    start = time.monotonic()
    code, out, err = agent.exec(["/bin/sh", "-c", script], timeout=timeout)
    wall = time.monotonic() - start
    if code != 0:
        raise ConnectorError(f"guest benchmark failed: {err[:200]!r}")
    try:
        s, e = (float(x) for x in out.split()[:2])
    except ValueError:
        raise ConnectorError(f"guest benchmark printed no two uptimes: {out[:200]!r}") from None
    return e - s, wall


def measure_slowdown(target_name: str, method_name: str, baseline: tuple[float, float] | None = None,
                     ) -> tuple[float, float]:
    """Run `method_name` repeatedly while the guest loop runs; return (guest, wall) slowdown ratios.

    The undisturbed loop is timed right before (unless `baseline` is given), so host noise that comes
    and goes between methods does not end up in the ratio."""
    target = resolve_target(target_name)
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                for _ in get_method(method_name).collect(target):
                    if stop.is_set():
                        break
            except Exception:  # the measurement must go on; errors show up in the scan itself
                time.sleep(0.1)

    thread = threading.Thread(target=hammer, daemon=True)
    with GuestAgent(target.qga_socket, timeout=60) as agent:  # type: ignore[arg-type]
        if baseline is None:
            runs = [guest_cpu_loop(agent) for _ in range(2)]
            baseline = (min(r[0] for r in runs), min(r[1] for r in runs))
        thread.start()
        try:
            guest_s, wall_s = guest_cpu_loop(agent)
        finally:
            stop.set()
            thread.join(timeout=120)
    return guest_s / baseline[0], wall_s / baseline[1]


def ensure_kernel_code(manifest: dict[str, Any], progress: Progress = lambda _m: None) -> str:
    """Make the default KB hold the code of the guest's kernel package (vmlinux, modules and their list), from
    the unpacked package the lab booted, so arch and inspect can verify kernel code; return a problem or ""."""
    from pathlib import Path

    from nephoscope.core.errors import KnowledgeError
    from nephoscope.knowledge.binaries import CodePageDB, PackageMeta
    from nephoscope.knowledge.kernelpkg import ingest_kernel_tree

    kernel = manifest.get("kernel") or {}
    if not all(kernel.get(k) for k in ("release", "package", "version", "source")):
        return "the manifest names no kernel package"
    root = Path(kernel["source"]).parent.parent  # .../unpacked/<deb>/root/boot/vmlinuz-*
    try:
        db = CodePageDB.open()
    except KnowledgeError as exc:
        return str(exc)
    try:
        store = db.kernel_store()
        if store.find_vmlinux(kernel["release"]) is not None and store.module_names(kernel["release"]) is not None:
            return ""
        if not (root / "boot").is_dir():
            return f"the unpacked kernel package {root} is gone"
        progress(f"storing the kernel code of {kernel['package']} {kernel['version']} in the KB")
        package_id = db.package_id(PackageMeta(kernel["package"], kernel["version"], "amd64"))
        _added, errors = ingest_kernel_tree(store, package_id, root, progress)
        db.commit()
        return "; ".join(f"{p}: {e}" for p, e in errors[:3])
    except KnowledgeError as exc:
        return str(exc)
    finally:
        db.close()


_CLAIMS: dict[str, int] = {}  # guest name -> the lock file descriptor this process holds on it


def claim_name(base: str) -> str:
    """Return `base`, or `base-PID` when another evaluation holds `base`: concurrent runs never share a guest.

    A kept guest (`--keep`) is reused by the next evaluation that claims its name; an evaluation running in
    another process (a test, a second operator) gets a guest of its own rather than stopping the other's.
    The claim is an flock on a file in the run directory, released when this process exits."""
    import fcntl

    lock_dir = runner.run_root() / "eval-locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    for name in (base, f"{base}-{os.getpid()}"):
        if name in _CLAIMS:
            return name
        fd = os.open(lock_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _CLAIMS[name] = fd
        return name
    raise ConnectorError(f"cannot claim an evaluation guest name for {base} in {lock_dir}")


def _guest(profile: str, keep: bool, progress: Progress) -> tuple[runner.Guest, bool]:
    name = claim_name(f"eval-{profile}")
    guest = runner.load_guest(name)
    if guest is not None and guest.alive():
        return guest, False
    progress(f"booting {name}")
    image = build_image(load_profile(profile), None, progress)
    return runner.start(name, image, progress=progress), not keep


def evaluate(methods: list[str], profiles: tuple[str, ...] = ("clean", "tampered"), *, slowdown: bool = True,
             keep: bool = False, sync_kb: bool | None = None, progress: Progress = lambda _m: None
             ) -> list[MethodScore]:
    """Run every method on every profile's lab guest and return the measured scores.

    `sync_kb`: fill the default KB from each guest (`kb sync`) before scoring it; None (the default) does
    it for disk profiles (full Debian systems, whose hundreds of packages no KB is fed in advance)."""
    scores: list[MethodScore] = []
    for profile in profiles:
        guest, owned = _synced_guest(profile, keep, sync_kb, progress)
        try:
            if {"arch", "inspect", "checkpoint"} & set(methods):
                problem = ensure_kernel_code(guest.manifest(), progress)
                if problem:
                    progress(f"kernel code of {profile} not in the KB, so not verified: {problem}")
            registry = [m for m in methods if m not in ("driver", "arch-events")]
            scores += score_guest(guest, registry, slowdown=slowdown, progress=progress)
            if "arch-events" in methods:  # a stream, not a registry method: its own guest with the TCG plugin
                from nephoscope.service.evaluate_archevents import score_arch_events

                scores.append(score_arch_events(profile, guest, slowdown=slowdown, keep=keep, progress=progress))
            if "driver" in methods:  # last: nphdrv is loaded for its own measurement only, then removed
                from nephoscope.service.driver_eval import score_driver

                scores += score_driver(guest, slowdown=slowdown, progress=progress)
        finally:
            if owned:
                runner.stop(guest.name, quiet=True)
    return scores


def _synced_guest(profile: str, keep: bool, sync_kb: bool | None, progress: Progress) -> tuple[runner.Guest, bool]:
    """Return `_guest`'s guest after a `kb sync` of it when `sync_kb` asks (None: disk profiles only)."""
    guest, owned = _guest(profile, keep, progress)
    if sync_kb or (sync_kb is None and load_profile(profile).boot == "disk"):
        try:
            sync_guest_kb(guest, progress)
        except BaseException:
            if owned:
                runner.stop(guest.name, quiet=True)
            raise
    return guest, owned


def sync_guest_kb(guest: runner.Guest, progress: Progress = lambda _m: None) -> SyncReport:
    """Fill the default KB with every version of the packages a running guest maps, and its kernel (`kb sync`).

    Pauses the guest as `scan` does (inspect, agent and arch scans, at most four)."""
    from nephoscope.service.kbsync import SYNC_METHODS, sync_and_rescan

    started = time.monotonic()
    _first, report, _after = sync_and_rescan(guest.name, SYNC_METHODS.split(","), 4, progress)
    progress(f"{guest.profile}: kb sync: {len(report.packages)} packages, {sum(map(len, report.packages.values()))} "
             f"versions, {report.ingest.pages_added} pages added, {len(report.errors)} errors, "
             f"{time.monotonic() - started:.0f} s")
    return report


def score_guest(guest: runner.Guest, methods: list[str], *, slowdown: bool = False, store: Store | None = None,
                progress: Progress = lambda _m: None) -> list[MethodScore]:
    """Run each method alone on a running lab guest and score it against the guest's manifest."""
    manifest = guest.manifest()
    truth = truth_processes(manifest)
    pid_cr3 = _pid_cr3(guest.name, methods, progress)
    scores = []
    for method in methods:
        progress(f"{guest.profile}: {method}")
        result = run_scan(resolve_target(guest.name), [method], store=store or Store())
        _link_cr3(result, pid_cr3)
        seen, identified = score_power(result, truth)
        t = result.timings.get(method, {})
        score = MethodScore(method, guest.profile, len(truth), seen, identified,
                            score_techniques(result, manifest), t.get("wall_s", 0.0), t.get("cpu_s", 0.0),
                            float(t.get("pause_s", 0.0)),
                            findings=sorted({f.kind for f in result.view.findings}),
                            unverifiable=[f"{u['what']}: {u['reason'][:120]}" for u in result.view.unverifiable])
        if slowdown:
            progress(f"{guest.profile}: {method} slowdown")
            score.guest_slowdown, score.wall_slowdown = (round(x, 3) for x in measure_slowdown(guest.name, method))
        scores.append(score)
    return scores


def _pid_cr3(name: str, methods: list[str], progress: Progress) -> dict[int, int]:
    """Map pids to page-table roots with inspect (evaluation only: arch alone knows no pids)."""
    if "arch" not in methods and "checkpoint" not in methods:
        return {}
    try:
        method = get_method("inspect")
    except Exception:  # without inspect, arch is scored per binary only
        return {}
    progress("mapping pids to page-table roots (inspect)")
    out = {}
    for o in method.collect(resolve_target(name)):
        if isinstance(o.payload, Process) and o.verdict != Verdict.UNVERIFIABLE and o.payload.cr3 is not None:
            out[o.payload.pid] = o.payload.cr3
    return out


def _link_cr3(result: ScanResult, pid_cr3: dict[int, int]) -> None:
    """Attach arch's per-address-space images to processes when the scan itself could not."""
    if not pid_cr3:
        return
    from nephoscope.analysis.merge import ProcessView

    spaces: dict[int, list[dict[str, Any]]] = {}
    for o in result.observations:
        p = o.payload
        if isinstance(p, (Image, UnknownCode)) and p.cr3 is not None:
            image = p.identity() if isinstance(p, Image) else {"path": "", "package": None, "versions": []}
            image["status"] = {"binary": "identified", "modified-binary": "modified"}.get(o.kind, "unknown")
            image["cr3"] = p.cr3
            spaces.setdefault(p.cr3, []).append(image)
    for pid, cr3 in pid_cr3.items():
        if cr3 in spaces:
            view = result.view.processes.setdefault(pid, ProcessView(pid))
            if not view.binaries:
                view.binaries = spaces[cr3]
                view.seen_by.setdefault(result.view.methods[0], "verified")
