"""The customer report: content, ranking, hostile guest strings, no host internals, no other VM's data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nephoscope.analysis.merge import merge
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.knowledge.vulns import VulnDB, VulnRecord
from nephoscope.service.report import build_report, report_from_store, scrub
from nephoscope.service.report_render import render_html, render_json, render_markdown
from nephoscope.store.sqlite import Store

HOSTILE = "<script>alert(1)</script>|**x**](http://evil)\x1b[31m"
CR3 = 0x1A2B3C4000
OWNER = {"/usr/lib/x86_64-linux-gnu/libssl.so.3": "libssl3", "/usr/sbin/nginx": "nginx"}.get


def _obs(vm: str, comm: str) -> list[Observation]:
    def o(method: str, kind: str, key: str, data: dict, verdict: Verdict = Verdict.REPORTED,
          reason: str = "") -> Observation:
        return Observation(kind, key, data, Provenance(method, vm, 1.0), verdict, reason)

    return [
        o("agent", "process", "pid:10", {"pid": 10, "ppid": 1, "comm": comm, "exe": "/usr/sbin/nginx",
                                         "cmdline": [comm]}),
        o("agent", "mapping", "pid:10:1", {"pid": 10, "path": "/usr/lib/x86_64-linux-gnu/libssl.so.3"}),
        o("agent", "package", "package:nginx", {"name": "nginx", "version": "1.0-1", "source": "nginx"}),
        o("agent", "package", "package:libssl3", {"name": "libssl3", "version": "3.0-1", "source": "openssl"}),
        o("agent", "package", "package:bash", {"name": "bash", "version": "5.0-1", "source": "bash"}),
        o("arch", "unknown-code", "u", {"cr3": CR3, "start": 0x7F0000001000, "end": 0x7F0000002000}, Verdict.VERIFIED),
        o("inspect", "unverifiable", "modules", {}, Verdict.UNVERIFIABLE,
          f"QMP at /run/nephoscope/{vm}/qmp.sock refused; cr3=0x{CR3:x}"),
    ]


@pytest.fixture()
def vulns(tmp_path: Path) -> VulnDB:
    db = VulnDB.open(tmp_path / "v.sqlite")
    db.replace("changelog", [VulnRecord("nginx", "CVE-2026-1111", "1.0-2", urgency="high"),
                             VulnRecord("bash", "CVE-2026-2222", "5.0-2")])
    db.replace("debian-tracker", [VulnRecord("openssl", "CVE-2026-3333", "3.0-5")])
    return db


def test_report_content_and_ranking(vulns: VulnDB) -> None:
    obs = _obs("vm-a", "nginx")
    view = merge(obs, ["agent", "arch", "inspect"], "vm-a")
    rep = build_report("vm-a", view, obs, vulns=vulns, owner=OWNER)
    assert [(v.package, v.running) for v in rep.vulnerable] == [("libssl3", True), ("nginx", True), ("bash", False)]
    nginx = rep.vulnerable[1]
    assert nginx.fixed_version == "1.0-2" and nginx.processes == [{"pid": 10, "comm": "nginx"}]
    assert [c["cve"] for c in nginx.cves] == ["CVE-2026-1111"]
    assert any(c.kind == "unknown-code" for c in rep.code)
    assert any(u["what"] == "unknown code region(s)" or "unknown code" in u["what"] for u in rep.unverified)
    assert rep.summary["running_vulnerable"] == 2 and rep.summary["cves"] == 3


def test_no_host_internals(vulns: VulnDB) -> None:
    obs = _obs("vm-a", "nginx")
    rep = build_report("vm-a", merge(obs, ["agent", "arch"], "vm-a"), obs, vulns=vulns, owner=OWNER)
    for text in (render_markdown(rep), render_html(rep), render_json(rep)):
        assert "/run/nephoscope" not in text and "qmp.sock" not in text
        assert f"{CR3:x}" not in text.lower() and str(CR3) not in text
    assert scrub("cannot open /dev/shm/nephoscope-x.ram or /root/.cache/y") == "cannot open <host> or <host>"


def test_hostile_guest_strings_escaped(vulns: VulnDB) -> None:
    obs = _obs("vm-a", HOSTILE)
    rep = build_report("vm-a", merge(obs, ["agent", "arch"], "vm-a"), obs, vulns=vulns, owner=OWNER)
    page = render_html(rep)
    assert "<script>" not in page and "&lt;script&gt;" in page and "\x1b" not in page
    md = render_markdown(rep)
    assert "<script>" not in md and "](http" not in md and "\x1b" not in md and "\\*\\*x" in md
    assert json.loads(render_json(rep))["vulnerable"][0]["processes"][0]["comm"] == HOSTILE


def test_from_store_only_that_vm(tmp_path: Path, vulns: VulnDB) -> None:
    store = Store(tmp_path / "s.sqlite")
    for vm, comm in (("vm-a", "nginx"), ("vm-b", "SECRET-OF-B")):
        obs = _obs(vm, comm)
        view = merge(obs, ["agent", "arch"], vm)
        store.save_scan(vm, ["agent", "arch"], obs, view.findings, view.summary(), 1.0)
    rep = report_from_store("vm-a", store, vulns=vulns, owner=OWNER)
    text = render_json(rep) + render_html(rep) + render_markdown(rep)
    assert "SECRET-OF-B" not in text and "vm-b" not in text and rep.vm == "vm-a"
    assert [(v.package, v.running) for v in rep.vulnerable] == [("libssl3", True), ("nginx", True), ("bash", False)]


def test_unknown_regions_scanned_for_known_bad_code(tmp_path: Path, vulns: VulnDB) -> None:
    from test_yara_rules import _one_page_space, injected_page

    ram = tmp_path / "guest.ram"
    ram.write_bytes(bytes(_one_page_space(injected_page()).read(0, 0x6000)))
    obs = [Observation("process", "pid:42", {"pid": 42, "comm": "bash", "exe": "/usr/bin/bash", "cr3": 0x1000},
                       Provenance("inspect", "vm-a", 1.0), Verdict.VERIFIED),
           Observation("unknown-code", "u", {"cr3": 0x1000, "start": 0x5000, "end": 0x6000},
                       Provenance("arch", "vm-a", 1.0), Verdict.VERIFIED)]
    rep = build_report("vm-a", merge(obs, ["arch", "inspect"], "vm-a"), obs, vulns=vulns, ram_path=ram,
                       host_strings=(str(ram),), owner=OWNER)
    bad = [c for c in rep.code if c.kind == "malicious-code"]
    assert {d.get("rule") for c in bad for d in c.details} >= {"nephoscope_injected_stub", "nephoscope_injected_marker"}
    assert all(d["pids"] == [42] and "cr3" not in d for c in bad for d in c.details)
    assert bad[0].severity == "critical" and str(ram) not in render_json(rep)


def test_from_result_scrubs_its_own_handles(tmp_path: Path, vulns: VulnDB) -> None:
    from nephoscope.hypervisor.target import VmTarget
    from nephoscope.service.report import report_from_result
    from nephoscope.service.scan import ScanResult

    sock = tmp_path / "odd-place" / "agent-channel"
    gone = Observation("unverifiable", "processes", {}, Provenance("agent", "vm-a"), Verdict.UNVERIFIABLE,
                       f"guest agent unreachable at {sock}")
    obs = [*_obs("vm-a", "nginx"), gone]
    target = VmTarget("vm-a", qga_socket=sock)
    result = ScanResult(target, merge(obs, ["agent"], "vm-a"), obs, scan_id=7)
    rep = report_from_result(result, vulns=vulns)
    assert rep.scan_id == 7 and str(sock) not in render_json(rep)


def test_network_behaviour_and_kernel_hooks_reach_the_customer(vulns: VulnDB) -> None:
    from nephoscope.core.records import Finding

    obs = _obs("vm-a", "nginx")
    view = merge(obs, ["agent", "arch", "inspect"], "vm-a")
    who = {"pid": 10, "comm": HOSTILE, "exe": "/usr/bin/python3.11", "binary": "/usr/bin/python3.11",
           "package": "python3.11-minimal", "identity": "verified"}
    socks = [{"proto": "tcp", "state": "ESTABLISHED", "local": "10.0.2.15", "local_port": 40000 + i,
              "remote": "10.0.2.2", "remote_port": 25, "inode": 7, "host_flows": ["127.0.0.1:5525 via /run/x.sock"]}
             for i in range(25)]
    view.findings += [
        Finding("outbound-smtp", "high", f"pid 10 ({HOSTILE}) has 25 outbound SMTP connections", "vm-a",
                [{**who, "sockets": socks}]),
        Finding("unexplained-flow", "high", "the host sees a tcp flow to 192.0.2.9:25", "vm-a",
                [{"proto": "tcp", "remote": "192.0.2.9", "remote_port": 25, "source": "/run/nephoscope/vm-a/x"}]),
        Finding("syscall-hook", "critical", "sys_call_table[62] points outside kernel text", "vm-a",
                [{"method": "inspect", "check": "syscall-table", "where": "sys_call_table[62]",
                  "target": 0xFFFFFFFFC0001000, "owner": "elsewhere"}]),
    ]
    rep = build_report("vm-a", view, obs, vulns=vulns, owner=OWNER)
    assert [c.kind for c in rep.behaviour] == ["outbound-smtp", "unexplained-flow"]
    smtp = rep.behaviour[0]
    assert smtp.details[0]["processes"][0].startswith("pid 10 ")
    assert len(smtp.details[0]["sockets"]) == 21 and smtp.details[0]["sockets"][0] == \
        "tcp 10.0.2.15:40000 -> 10.0.2.2:25 (ESTABLISHED)"
    assert rep.summary["network_behaviour"] == 2
    hook = next(c for c in rep.code if c.kind == "syscall-hook")
    assert hook.details[0]["where"] == "sys_call_table[62]" and hook.details[0]["target"] == "0xffffffffc0001000"
    html, markdown = render_html(rep), render_markdown(rep)
    for text in (html, markdown, render_json(rep)):
        assert "/run/nephoscope" not in text and "5525" not in text  # the host's end of a flow is not shown
    assert "<script>" not in html and "Network behaviour" in html and "## Network behaviour" in markdown
    from io import StringIO

    from rich.console import Console

    from nephoscope.cli.views import render_report

    buf = StringIO()
    render_report(rep, Console(file=buf, width=200, force_terminal=False))
    term = buf.getvalue()
    assert "Network behaviour" in term and "outbound-smtp" in term and "\x1b[31m" not in term
