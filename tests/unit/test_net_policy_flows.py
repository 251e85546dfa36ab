"""The network policy (validated on load), the findings it drives, /proc/net and conntrack parsing, and the
join of host flows with guest sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nephoscope.analysis.network import DEFAULT_POLICY, NetworkFacts, analyze, load_policy
from nephoscope.core.errors import KnowledgeError
from nephoscope.hypervisor.flows import HostFlow, parse_conntrack, parse_proc_net, parse_proc_unix
from nephoscope.introspect.net import join_flows

TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 9969 1 0 100 0 0 10 0
   1: 0F02000A:8DF2 0202000A:0019 01 00000013:00000000 01:00000014 00000000     0        0 10798 1 0 20 4 30 10 -1
"""
TCP6 = """  sl  local_address  remote_address  st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 \
00:00000000 00000000     0        0 9970 1 0 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:C350 01 00000000:00000000 \
00:00000000 00000000  1000        0 4242 1 0 20 4 30 10 -1
"""
UNIX = """Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 9981 /run/x.sock
0000000000000000: 00000003 00000000 00000000 0001 03 9982
"""


def test_proc_net_parses_like_the_kernel_prints() -> None:
    rows, bad = parse_proc_net("tcp", TCP + "garbage line\n")
    assert bad == ["garbage line"]
    assert [(r.local, r.local_port, r.remote, r.remote_port, r.state, r.tx_queue, r.inode) for r in rows] == [
        ("0.0.0.0", 22, "0.0.0.0", 0, "LISTEN", 0, 9969), ("10.0.2.15", 36338, "10.0.2.2", 25, "ESTABLISHED", 19,
                                                             10798)]
    rows6, bad6 = parse_proc_net("tcp6", TCP6)
    assert not bad6
    assert [(r.local, r.local_port, r.remote, r.remote_port, r.uid) for r in rows6] == [
        ("::", 22, "::", 0, 0), ("127.0.0.1", 8080, "127.0.0.1", 50000, 1000)]
    unix, _ = parse_proc_unix(UNIX)
    assert [(u.inode, u.path) for u in unix] == [(9981, "/run/x.sock"), (9982, "")]


def test_conntrack_lines_give_the_guest_flows() -> None:
    text = ("ipv4     2 tcp      6 431999 ESTABLISHED src=192.168.122.10 dst=198.51.100.7 sport=40000 dport=25 "
            "src=198.51.100.7 dst=192.168.122.10 sport=25 dport=40000 [ASSURED] mark=0 zone=0 use=2\n"
            "ipv4     2 udp      17 20 src=192.168.122.1 dst=192.168.122.10 sport=53 dport=33000 "
            "src=192.168.122.10 dst=192.168.122.1 sport=33000 dport=53 mark=0 use=1\n"
            "ipv4     2 tcp      6 10 TIME_WAIT src=10.9.9.9 dst=10.8.8.8 sport=1 dport=2 src=10.8.8.8 "
            "dst=10.9.9.9 sport=2 dport=1\n")
    flows = parse_conntrack(text, "192.168.122.10")
    assert [(f.proto, f.remote, f.remote_port, f.state, f.inbound) for f in flows] == [
        ("tcp", "198.51.100.7", 25, "ESTABLISHED", False), ("udp", "192.168.122.1", 53, "ESTABLISHED", True)]


def _row(pid: int, comm: str, remote: str, rport: int, state: str = "ESTABLISHED", proto: str = "tcp",
         lport: int = 40000, sock_type: str = "stream", family: str = "inet", exe: str = "") -> dict[str, Any]:
    return {"proto": proto, "family": family, "type": sock_type, "state": state, "local": "10.0.2.15",
            "local_port": lport, "remote": remote, "remote_port": rport, "inode": 1000 + lport, "views": ["files"],
            "owners": [{"pid": pid, "comm": comm, "fd": 3, "exe": exe or f"/usr/bin/{comm}"}]}


def test_join_attributes_each_flow_and_names_the_unexplained() -> None:
    rows = [_row(50, "exim4", "10.0.2.2", 25, lport=40000 + i) for i in range(2)]
    flows = [HostFlow("qemu-socket", "tcp", "127.0.0.1", 50000 + i, "127.0.0.1", 25, "ESTABLISHED", False)
             for i in range(3)]
    flows.append(HostFlow("qemu-socket", "tcp", "127.0.0.1", 2222, "127.0.0.1", 41000, "ESTABLISHED", True))
    joined, unexplained = join_flows(flows, rows)
    assert [[o["pid"] for o in f["attributed"]] for f in joined] == [[50], [50], [], []]
    assert len(unexplained) == 1 and unexplained[0]["local_port"] == 50002
    assert all("host_flows" in r for r in rows)


def test_policy_findings_name_pid_binary_and_identity() -> None:
    policy = load_policy()
    spam = [_row(50, "exim4", "10.0.2.2", 25, lport=40000 + i, exe="/usr/bin/python3.11") for i in range(12)]
    mail = [_row(60, "exim4", "198.51.100.1", 25, exe="/usr/sbin/exim4")]
    scan = [_row(70, "scanner", f"198.51.100.{i}", 22, lport=41000 + i) for i in range(25)]
    listen = [_row(80, "backdoor", "0.0.0.0", 0, state="LISTEN", lport=4444)]
    raw = [_row(90, "python3", "0.0.0.0", 0, state="CLOSE", proto="raw", sock_type="raw", lport=1),
           _row(91, "ping", "0.0.0.0", 0, state="CLOSE", proto="raw", sock_type="raw", lport=1, exe="/usr/bin/ping")]
    ids = {50: {"path": "/usr/bin/python3.11", "package": "python3.11-minimal", "status": "identified",
                "verdict": "verified"},
           60: {"path": "/usr/sbin/exim4", "package": "exim4-daemon-light", "status": "identified"},
           80: {"status": "unknown", "verdict": "verified"}}
    facts = NetworkFacts(spam + mail + scan + listen + raw, ids)
    found = {(f.kind, f.evidence[0].get("pid")) for f in analyze(facts, policy, "vm")}
    assert found == {("outbound-smtp", 50), ("connection-flood", 50), ("fanout", 70), ("unknown-listener", 80),
                     ("raw-socket", 90)}
    smtp = next(f for f in analyze(facts, policy, "vm") if f.kind == "outbound-smtp")
    assert "exim4" in smtp.title and "/usr/bin/python3.11" in smtp.title and "python3.11-minimal" in smtp.title
    assert smtp.evidence[0]["identity"] == "identified" and len(smtp.evidence[0]["sockets"]) == 12
    # without identification, a listener proves nothing about its code: no claim
    assert not [f for f in analyze(NetworkFacts(listen, {}), policy, "vm") if f.kind == "unknown-listener"]


def test_blocklist_hidden_and_unexplained_findings(tmp_path: Path) -> None:
    block = tmp_path / "block.txt"
    block.write_text("# provider list\n203.0.113.0/24\n2001:db8::1\n")
    policy = load_policy(blocklist=block)
    facts = NetworkFacts([_row(50, "curl", "203.0.113.5", 443), _row(51, "curl", "198.51.100.5", 443)], {},
                         hidden=[{**_row(0, "", "192.0.2.1", 6667), "owners": []}],
                         unexplained_flows=[{"source": "qemu-socket", "proto": "tcp", "remote": "192.0.2.9",
                                             "remote_port": 80}])
    kinds = [f.kind for f in analyze(facts, policy, "vm")]
    assert sorted(kinds) == ["blocklisted-destination", "hidden-socket", "unexplained-flow"]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("ports = [25, 465, 587]", "ports = [25, 70000]", 1), "ports"),
    (lambda t: t.replace('severity = "high"', 'severity = "urgent"', 1), "severity"),
    (lambda t: t.replace("min_remote_hosts = 20", "min_remote_hosts = 1"), "at least 2"),
    (lambda t: t.replace("[fanout]", "[fanout]\nwindow = 3"), "unknown keys"),
    (lambda t: t + "\n[extra]\nx = 1\n", "unknown sections"),
    (lambda t: t.replace('"/usr/sbin/exim4"', '"exim4"'), "absolute"),
    (lambda t: t.replace("[hidden]", "[hiddenx]"), "missing"),
    (lambda t: t + "= broken", "network policy"),
])
def test_bad_policy_is_rejected_on_load(tmp_path: Path, edit: Any, message: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(edit(DEFAULT_POLICY.read_text()))
    with pytest.raises(KnowledgeError, match=message):
        load_policy(path)


def test_bad_blocklist_line_is_rejected(tmp_path: Path) -> None:
    block = tmp_path / "b.txt"
    block.write_text("10.0.0.0/8\nnot-an-address\n")
    with pytest.raises(KnowledgeError, match=r"b.txt:2"):
        load_policy(blocklist=block)


def test_net_terminal_output_escapes_guest_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from nephoscope.cli import net as net_cli
    from nephoscope.cli.main import app
    from nephoscope.introspect.net import NetReport

    evil = "\x1b]0;pwned\x07evil"
    row = {**_row(7, evil, "10.0.2.2", 25, exe="/tmp/\x1b[31mx"), "rx_queue": 0, "tx_queue": 0}
    report = NetReport("vm", [row], {"files": {"count": 1, "complete": True, "problem": ""}}, {}, [], [], {}, {})
    report.findings = analyze(NetworkFacts([row], {}), load_policy(), "vm")
    monkeypatch.setattr("nephoscope.service.net.network_report", lambda *a, **k: report)
    monkeypatch.setattr(net_cli, "resolve_target", lambda vm: vm)
    result = CliRunner().invoke(app, ["net", "vm"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b" in result.output and "outbound-smtp" in result.output
