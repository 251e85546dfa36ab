"""One finding per fact: findings that several methods (or several checks) made about the same thing, merged.

A fact about code is a guest-virtual range in one address space. The address space is named by its
page-table root, a guest-physical address: `arch` on live RAM and `checkpoint`'s `arch` on a copy of the
same RAM find the same roots, and `inspect`'s processes carry the root of their `mm`, so every method's
finding about one range of one process lands on the same key. Findings whose ranges overlap in one
address space are one fact: an unknown region, the YARA rules and known-bad pages that match inside it,
and the anonymous executable mapping `inspect` sees there. The merged finding keeps every piece of
evidence and the kind that says most (known-bad code, then modified binary, then unknown code).

Any other finding is one fact per (kind, title, address space), the rule the scan view always used.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nephoscope.core.payloads import Process
from nephoscope.core.records import Finding, Observation

# the kinds whose findings are about code at a guest-virtual range, most telling first
LOCATED_KINDS = ("malicious-code", "modified-binary", "unknown-code", "anonymous-exec")
SEVERITY_RANK = {"critical": 0, "high": 1, "medium": 2, "low": 3}
_IN_PID = re.compile(r"\b(in )?pids? \d")


@dataclass(frozen=True, slots=True)
class Location:
    """A guest-virtual range [gva_start, gva_end) in the address space rooted at `cr3` (a gpa)."""

    cr3: int
    gva_start: int
    gva_end: int


def pids_by_root(observations: Iterable[Observation]) -> dict[int, list[int]]:
    """Return page-table root (gpa) -> pids of the processes running on it, from process observations."""
    out: dict[int, set[int]] = {}
    for o in observations:
        if isinstance(o.payload, Process) and o.payload.cr3 is not None:
            out.setdefault(o.payload.cr3, set()).add(o.payload.pid)
    return {cr3: sorted(pids) for cr3, pids in out.items()}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def evidence_location(kind: str, ev: Mapping[str, Any], root_of_pid: Mapping[int, int]) -> Location | None:
    """Return where one piece of evidence of a `kind` finding is, or None when it names no range.

    Evidence comes in three shapes: an arch observation (`data` with cr3 and gva_start/gva_end), a
    malware hit (cr3 and the scanned `region`), an inspect mapping (pid and start/end; the root comes
    from the process's observed cr3)."""
    data = ev.get("data") if isinstance(ev.get("data"), dict) else ev
    cr3 = _int(data.get("cr3"))
    if kind == "anonymous-exec" and cr3 is None:
        pid = _int(data.get("pid"))
        cr3 = root_of_pid.get(pid) if pid is not None else None
    if cr3 is None:
        return None
    region = data.get("region")
    if isinstance(region, (list, tuple)) and len(region) == 2:
        start, end = _int(region[0]), _int(region[1])
    else:
        start = _int(data.get("gva_start", data.get("start")))
        end = _int(data.get("gva_end", data.get("end")))
    if start is None or end is None or end <= start:
        return None
    return Location(cr3, start, end)


def finding_location(f: Finding, root_of_pid: Mapping[int, int]) -> Location | None:
    """Return the range a code finding is about (the hull of its evidence), or None for other findings."""
    if f.kind not in LOCATED_KINDS:
        return None
    spots = [loc for ev in f.evidence if isinstance(ev, dict)
             if (loc := evidence_location(f.kind, ev, root_of_pid)) is not None]
    if not spots or len({s.cr3 for s in spots}) != 1:
        return None
    return Location(spots[0].cr3, min(s.gva_start for s in spots), max(s.gva_end for s in spots))


def _space(f: Finding) -> Any:
    first = f.evidence[0] if f.evidence else {}
    data = first.get("data") if isinstance(first.get("data"), dict) else first
    return data.get("cr3")


def _pids(pids: list[int]) -> str:
    return f"pid{'s' if len(pids) > 1 else ''} {', '.join(map(str, pids))}"


def _match_label(ev: Mapping[str, Any]) -> str | None:
    """Return what a malware hit matched: 'YARA rule X' or 'known-bad page (what)'."""
    if ev.get("rule"):
        return f"YARA rule {ev['rule']}"
    if ev.get("sha256"):
        return f"known-bad page ({ev.get('description') or ev['sha256']})"
    return None


def _merge_group(group: list[Finding], loc: Location, pids: list[int]) -> Finding:
    """Return one finding for findings about overlapping code in one address space."""
    if len(group) == 1 and (not pids or _IN_PID.search(group[0].title)):
        return Finding(group[0].kind, group[0].severity, group[0].title, group[0].vm, list(group[0].evidence))
    ranked = sorted(group, key=lambda f: LOCATED_KINDS.index(f.kind))
    severity = min((f.severity for f in group), key=lambda s: SEVERITY_RANK.get(s, 9))
    regions = [f for f in ranked if f.kind != "malicious-code"]
    matches = list(dict.fromkeys(label for f in group if f.kind == "malicious-code" for ev in f.evidence
                                 if isinstance(ev, dict) and (label := _match_label(ev))))
    if regions:
        title = regions[0].title
        if pids and not _IN_PID.search(title):
            title += f" ({_pids(pids)})"
        if matches:
            title += f"; matches {', '.join(matches)}"
    else:
        title = ranked[0].title
        if len(matches) > 1:
            title = f"known-bad code at {loc.gva_start:#x}-{loc.gva_end:#x}" + (
                f" ({_pids(pids)})" if pids else "") + f": {', '.join(matches)}"
    evidence = [ev for f in ranked for ev in f.evidence]
    return Finding(ranked[0].kind, severity, title, group[0].vm, evidence)


def dedupe(findings: list[Finding], pids_of_root: Mapping[int, list[int]] | None = None) -> list[Finding]:
    """Merge findings about the same fact into one, keeping every method's evidence (order of first sight).

    `pids_of_root` maps a page-table root (gpa) to the pids running on it; it names the processes of a
    code finding and places inspect's mappings (which carry a pid, not a root) in their address space."""
    pids_of_root = pids_of_root or {}
    root_of_pid = {pid: cr3 for cr3, pids in pids_of_root.items() for pid in pids}
    out: list[Finding | int] = []  # a finding, or the root whose code facts go at this place
    plain: dict[tuple[str, str, Any], Finding] = {}
    located: dict[int, list[tuple[Location, Finding]]] = {}
    for f in findings:
        loc = finding_location(f, root_of_pid)
        if loc is not None:
            if loc.cr3 not in located:
                out.append(loc.cr3)
            located.setdefault(loc.cr3, []).append((loc, f))
            continue
        key = (f.kind, f.title, _space(f))  # the same title in two address spaces is two findings
        if key in plain:
            plain[key].evidence.extend(f.evidence)
        else:
            plain[key] = Finding(f.kind, f.severity, f.title, f.vm, list(f.evidence))
            out.append(plain[key])
    result: list[Finding] = []
    for slot in out:
        if isinstance(slot, Finding):
            result.append(slot)
        else:
            result += _merge_space(located[slot], list(pids_of_root.get(slot, [])))
    return result


def _merge_space(items: list[tuple[Location, Finding]], pids: list[int]) -> list[Finding]:
    """Return one finding per set of overlapping ranges of one address space (in order of first sight)."""
    order = sorted(range(len(items)), key=lambda i: (items[i][0].gva_start, i))
    groups: list[tuple[Location, list[int]]] = []
    for i in order:
        loc = items[i][0]
        if groups and loc.gva_start < groups[-1][0].gva_end:
            hull, members = groups[-1]
            members.append(i)
            groups[-1] = (Location(loc.cr3, hull.gva_start, max(hull.gva_end, loc.gva_end)), members)
        else:
            groups.append((loc, [i]))
    groups.sort(key=lambda g: min(g[1]))
    return [_merge_group([items[i][1] for i in sorted(members)], hull, pids) for hull, members in groups]
