"""One finding per fact: arch and checkpoint (arch and inspect on a copy of the same RAM) see the same code.

The checkpoint copy is the same RAM, so its page-table roots are the same gpas; a YARA match, a known-bad
page, an unknown region and inspect's anonymous mapping at one range of one process are one fact.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nephoscope.analysis.code import main_binary, summarize_code
from nephoscope.analysis.facts import dedupe, pids_by_root
from nephoscope.analysis.merge import merge
from nephoscope.core.records import Finding, Observation, Provenance, Verdict
from nephoscope.knowledge.vulns import VulnDB
from nephoscope.service.report import build_report
from nephoscope.service.report_render import render_markdown

CR3, OTHER = 0x1000, 0x9000


def _o(method: str, kind: str, data: dict, verdict: Verdict = Verdict.VERIFIED) -> Observation:
    analysis = "inspect" if kind in ("process", "mapping") else "arch"
    extra = {"analysis": analysis} if method == "checkpoint" else {}
    return Observation(kind, f"{kind}:{data.get('pid', data.get('gva_start'))}", {**data, **extra},
                       Provenance(method, "vm-a", 1.0), verdict)


def _tampered(methods: tuple[str, ...] = ("arch", "checkpoint")) -> list[Observation]:
    """Return what arch, inspect and checkpoint see of one injected page at 0x5000 in pid 42 (root CR3)."""
    obs = []
    for method in ("inspect", "checkpoint"):
        obs += [_o(method, "process", {"pid": 42, "comm": "bash", "exe": "/usr/bin/bash", "cr3": CR3,
                                       "cmdline": ["bash"]}),
                _o(method, "process", {"pid": 77, "comm": "sleep", "exe": "/usr/bin/sleep", "cr3": OTHER,
                                       "cmdline": ["sleep"]}),
                _o(method, "mapping", {"pid": 42, "start": 0x5000, "end": 0x6000, "perms": "rwxp", "path": ""},
                   Verdict.REPORTED)]
    for method in methods:
        obs += [_o(method, "unknown-code", {"cr3": CR3, "gva_start": 0x5000, "gva_end": 0x6000, "pages": 1}),
                # the same range in another address space is another fact
                _o(method, "unknown-code", {"cr3": OTHER, "gva_start": 0x5000, "gva_end": 0x6000, "pages": 1})]
    return obs


def test_scan_view_one_finding_per_fact_with_every_method() -> None:
    obs = _tampered()
    view = merge(obs, ["inspect", "checkpoint", "arch"], "vm-a")
    code = [f for f in view.findings if f.kind in ("unknown-code", "anonymous-exec")]
    assert len(code) == 2, [f.title for f in code]
    injected = next(f for f in code if "pid 42" in f.title)
    assert injected.kind == "unknown-code" and "0x5000-0x6000" in injected.title
    methods = {ev.get("provenance", {}).get("method") or ev.get("method") for ev in injected.evidence}
    assert methods == {"arch", "checkpoint", "inspect"}
    assert "pid 77" in next(f for f in code if f is not injected).title


def test_dedupe_keeps_distinct_facts_apart() -> None:
    def unknown(start: int, end: int, cr3: int = CR3, method: str = "arch") -> Finding:
        return Finding("unknown-code", "high", f"code at {start:#x}-{end:#x}", "vm",
                       [_o(method, "unknown-code", {"cr3": cr3, "gva_start": start, "gva_end": end}).to_dict()])

    got = dedupe([unknown(0x1000, 0x3000), unknown(0x2000, 0x4000, method="checkpoint"),  # overlap: one fact
                  unknown(0x4000, 0x5000),  # adjacent, not overlapping: another
                  unknown(0x1000, 0x3000, cr3=OTHER),  # same range, other address space: another
                  Finding("masquerading", "medium", "pid 1 ...", "vm", [{"pid": 1}]),
                  Finding("masquerading", "medium", "pid 1 ...", "vm", [{"pid": 1}])],
                 {CR3: [42], OTHER: [77]})
    assert [(f.kind, len(f.evidence)) for f in got] == [("unknown-code", 2), ("unknown-code", 1),
                                                        ("unknown-code", 1), ("masquerading", 2)]
    assert got[0].title == "code at 0x1000-0x3000 (pid 42)" and got[2].title.endswith("(pid 77)")
    assert dedupe(got, {CR3: [42], OTHER: [77]})[0].title == got[0].title  # idempotent


def test_report_lists_each_fact_once_with_both_methods(tmp_path: Path) -> None:
    from test_yara_rules import _one_page_space, injected_page

    ram = tmp_path / "guest.ram"
    ram.write_bytes(bytes(_one_page_space(injected_page()).read(0, 0x6000)))
    obs = [o for o in _tampered() if o.data.get("cr3") != OTHER or o.kind == "process"]
    view = merge(obs, ["inspect", "checkpoint", "arch"], "vm-a")
    rep = build_report("vm-a", view, obs, vulns=VulnDB.open(tmp_path / "v.db"), ram_path=ram, owner={}.get)
    code = [c for c in rep.code if c.kind in ("malicious-code", "unknown-code", "anonymous-exec")]
    assert len(code) == 1 and rep.summary["suspicious_code"] == len(rep.code)
    item = code[0]
    assert item.kind == "malicious-code" and item.severity == "critical"
    assert item.methods == ["inspect", "checkpoint", "arch"]
    assert "(pid 42)" in item.title and "nephoscope_injected_stub" in item.title
    rules = [d["rule"] for d in item.details if "rule" in d]
    assert sorted(rules) == ["nephoscope_injected_marker", "nephoscope_injected_stub"]  # each match once
    assert all(d["methods"] == ["checkpoint", "arch"] for d in item.details if "rule" in d or "sha256" in d)
    assert all(d.get("pids") == [42] or d.get("pid") == 42 for d in item.details)
    assert render_markdown(rep).count("nephoscope\\_injected\\_stub") == 0  # intraword _ is not escaped
    assert render_markdown(rep).count("nephoscope_injected_stub") == 2  # title and its evidence line


def test_pids_by_root_reads_both_shapes() -> None:
    stored = Observation("process", "pid:5", {"pid": 5, "cr3": CR3}, Provenance("inspect", "vm-a", 1.0),
                         Verdict.VERIFIED)  # as the store gives it back: a JSON record read into its payload
    assert pids_by_root([*_tampered(), stored]) == {CR3: [5, 42],
                                                                                                  OTHER: [77]}


@pytest.mark.parametrize(("exe", "want"), [("/usr/sbin/nginx", "/usr/sbin/nginx"),
                                           ("/tmp/sleep (deleted)", "/bin/busybox"),
                                           ("/memfd:x (deleted)", "/bin/busybox")])
def test_main_binary_rule(exe: str, want: str) -> None:
    images = [{"path": "/usr/lib/x86_64-linux-gnu/libc.so.6", "package": "libc6", "gva_start": 0, "gva_end": 9 << 20},
              {"path": "/bin/busybox", "package": "busybox-static", "gva_start": 0, "gva_end": 1 << 20},
              {"path": "/usr/sbin/nginx", "package": "nginx", "gva_start": 0, "gva_end": 1 << 12}]
    if exe != "/usr/sbin/nginx":
        images = images[:2]
    assert (main_binary(exe, images) or {}).get("path") == want


def test_code_summary_counts_each_image_once_across_methods() -> None:
    images = []
    for method in ("arch", "checkpoint"):
        images += [{"path": "/usr/bin/bash", "package": "bash", "versions": ["5.2"], "status": "identified",
                    "gva_start": 0x1000, "gva_end": 0x9000, "method": method},
                   {"path": "/usr/lib/libc.so.6", "package": "libc6", "versions": ["2.36"], "status": "modified",
                    "method": method},
                   {"path": "", "package": None, "versions": [], "status": "unknown", "gva_start": 0x5000,
                    "gva_end": 0x6000, "method": method}]
    s = summarize_code("/usr/bin/bash", images)
    assert s.main is not None and (s.main.package, s.main.versions, s.main.modified) == ("bash", ("5.2",), False)
    assert (s.libraries, s.unknown_regions, s.modified_libraries) == (1, 1, 1)
    assert s.methods == ("arch", "checkpoint")


def test_unverifiable_said_once_across_methods(tmp_path: Path) -> None:
    why = "kernel text is patched at boot"
    obs = [Observation("kernel-code", "kernel", {}, Provenance(m, "vm-a", 1.0), Verdict.UNVERIFIABLE, why)
           for m in ("arch", "checkpoint")]
    obs.append(Observation("x", "modules", {}, Provenance("inspect", "vm-a", 1.0), Verdict.UNVERIFIABLE, "other"))
    rep = build_report("vm-a", merge(obs, ["arch", "checkpoint", "inspect"], "vm-a"), obs,
                       vulns=VulnDB.open(tmp_path / "v.db"), owner={}.get)
    said = [(u["what"], u["method"]) for u in rep.unverified if u["reason"] in (why, "other")]
    assert said == [("kernel", "arch, checkpoint"), ("modules", "inspect")]
