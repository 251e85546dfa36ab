"""`net` on real lab guests: it equals the guest's own socket view on the clean guest (kernels 6.1 and 6.12)
with no finding; on the tampered guest the spammer and the raw-socket process are found with their pids and
code identity, and every host flow is attributed to the spammer; a corrupted socket structure in a copy of a
real dump gives an unverifiable view, not a made-up connection.
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from net_scenario import GUEST_HOST, SmtpSink, start_helper, stop_helper, wait_for
from typer.testing import CliRunner

from nephoscope.cli.main import app
from nephoscope.core.errors import ConnectorError
from nephoscope.hypervisor.flows import parse_proc_net, parse_proc_unix
from nephoscope.hypervisor.qga import GuestAgent
from nephoscope.introspect.net import AGENT_TABLES
from nephoscope.lab.runner import Guest
from nephoscope.memory.physical import open_memory, parse_elf_segments
from nephoscope.os.linux.model import LinuxKernel
from nephoscope.os.linux.net import net_view
from nephoscope.service.net import network_report
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest
SPAM_CONNECTIONS = 12


def _guest_view(guest: Guest) -> tuple[set[tuple[Any, ...]], set[int]]:
    """Return the guest's own /proc/net/{tcp,udp,raw}{,6} sockets and /proc/net/unix inodes."""
    entries: set[tuple[Any, ...]] = set()
    with GuestAgent(guest.qga_socket, timeout=60) as agent:
        for name in AGENT_TABLES:
            try:
                text = agent.read_file(f"/proc/net/{name}").decode()
            except ConnectorError:  # udplite6 without IPv6 ...
                continue
            rows, bad = parse_proc_net(name, text)
            assert not bad, (name, bad)
            entries |= {(*e.key(), e.state, e.inode) for e in rows}
        unix = {u.inode for u in parse_proc_unix(agent.read_file("/proc/net/unix").decode())[0]}
    return entries, unix


def _net_json(guest: Guest, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["net", guest.name, "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _equals_guest_view(guest: Guest) -> dict[str, Any]:
    before, unix = _guest_view(guest)
    data = _net_json(guest)
    after, _unix = _guest_view(guest)
    assert data["complete"] and data["views"]["cross_view"]["verdict"] == "verified", data["views"]
    tables = {(r["proto"], r["local"], r["local_port"], r["remote"], r["remote_port"], r["state"], r["inode"])
              for r in data["sockets"] if len(r["views"]) > 1 or r["views"][0] != "files"}
    stable = before & after  # what the guest showed both before and after the walk
    assert stable <= tables, stable - tables
    assert tables <= before | after, tables - (before | after)
    assert stable, "the clean guest listens on ports 22, 80 and 8000: its /proc/net is not empty"
    held_unix = {r["inode"] for r in data["sockets"] if r["family"] == "unix"}
    assert held_unix and held_unix <= unix
    return data


def test_net_equals_the_guest_view_on_clean(clean_guest: Guest, default_kb: None) -> None:
    data = _equals_guest_view(clean_guest)
    assert data["findings"] == [], [f["title"] for f in data["findings"]]
    listening = {(r["proto"], r["local_port"]): r for r in data["sockets"] if r["state"] == "LISTEN"}
    assert {("tcp", 22), ("tcp6", 22), ("tcp", 80)} <= set(listening)  # python3 -m http.server starts late
    manifest = {p["pid"]: p for p in clean_guest.manifest()["processes"]}
    for r in listening.values():  # every listener is held by a process of the manifest, identified as its package
        for owner in r["owners"]:
            ident = data["identities"][str(owner["pid"])]
            assert ident["status"] == "identified", (owner, ident)
            truth = manifest.get(owner["pid"])
            if truth is not None:
                assert ident["package"] == truth["package"], (owner, ident, truth)
    assert data["views"]["agent"]["complete"] and data["views"]["agent"]["not_in_guest_view"] == 0


def test_net_equals_the_guest_view_on_612(clean_guest_612: Guest, default_kb: None) -> None:
    data = _equals_guest_view(clean_guest_612)
    assert data["findings"] == [], [f["title"] for f in data["findings"]]


@pytest.fixture(scope="module")
def scenario(tampered_guest: Guest) -> Any:
    try:
        sink = SmtpSink()
    except OSError as exc:
        pytest.skip(str(exc))
    with GuestAgent(tampered_guest.qga_socket, timeout=60) as agent:
        spam = start_helper(agent, "spam.py", GUEST_HOST, str(sink.port), str(SPAM_CONNECTIONS))
        raw = start_helper(agent, "rawsock.py")
        try:
            assert "connected" in wait_for(agent, "spam.py", "connected")
            assert "raw" in wait_for(agent, "rawsock.py", "raw")
            yield {"spam": spam, "raw": raw, "port": sink.port}
        finally:
            stop_helper(agent, spam)
            stop_helper(agent, raw)
            sink.close()


def test_spammer_and_raw_socket_found_with_pid_and_identity(tampered_guest: Guest, default_kb: None,
                                                          scenario: dict[str, int]) -> None:
    report = network_report(resolve_target(tampered_guest.name))
    by_kind: dict[str, list[Any]] = {}
    for f in report.findings:
        by_kind.setdefault(f.kind, []).append(f)
    smtp = by_kind["outbound-smtp"]
    assert [f.evidence[0]["pid"] for f in smtp] == [scenario["spam"]]
    who = smtp[0].evidence[0]
    assert who["comm"] == "exim4"  # it claims to be a mail server; its code says python3.11
    assert who["binary"] == "/usr/bin/python3.11" and who["package"] == "python3.11-minimal"
    assert who["identity"] == "identified" and who["verdict"] == "verified"
    assert len(who["sockets"]) == SPAM_CONNECTIONS
    assert all(s["remote"] == GUEST_HOST and s["remote_port"] == scenario["port"] for s in who["sockets"])
    raw = by_kind["raw-socket"]
    assert [f.evidence[0]["pid"] for f in raw] == [scenario["raw"]]
    assert {(s["proto"], s["state"]) for s in raw[0].evidence[0]["sockets"]} >= {("raw", "CLOSE")}
    assert raw[0].evidence[0]["package"] == "python3.11-minimal"
    manifest = tampered_guest.manifest()
    backdoor = next(t["pid"] for t in manifest["techniques"] if t["id"] == "unpackaged-binary")
    assert [f.evidence[0]["pid"] for f in by_kind["unknown-listener"]] == [backdoor]
    assert not by_kind.get("hidden-socket") and not by_kind.get("unexplained-flow")
    # the host's view (QEMU's own sockets): each SMTP flow is attributed to the spammer
    out = [f for f in report.flows if not f["inbound"] and f["remote_port"] == scenario["port"]]
    assert len(out) == SPAM_CONNECTIONS
    assert all([o["pid"] for o in f["attributed"]] == [scenario["spam"]] for f in out)


def _listen_80(clean_dump: Path) -> tuple[int, int, int]:
    """Return the gpas of the port-80 listening sock's skc_family and skc_node, and its kernel gva."""
    from nephoscope.os.linux.net import net_layout

    phys = open_memory(clean_dump)
    try:
        k = LinuxKernel.open(phys)
        view = net_view(k)
        assert view.files.complete and view.tables.complete, view.views()
        target = next(e for e in view.files if e.socket.local_port == 80 and e.socket.state == "LISTEN")
        off = net_layout(k).off
        sk = target.socket.sock_gva
        return (k.kernel.translate(sk + off["sock_common.skc_family"]),
                k.kernel.translate(sk + off["sock_common.skc_node"]), sk + off["sock_common.skc_node"])
    finally:
        phys.close()


def _corrupt(clean_dump: Path, tmp_path: Path, edits: list[tuple[int, bytes]]) -> dict[str, Any]:
    """Copy the dump, write `edits` (gpa, bytes), run `net --json` on the copy and return its output."""
    copy = tmp_path / "corrupt.elf"
    shutil.copyfile(clean_dump, copy)
    copy.chmod(0o600)
    with copy.open("r+b") as fh:
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            segments = parse_elf_segments(mm, str(copy))
        for gpa, data in edits:
            fh.seek(next(off + gpa - s for s, e, off in segments if s <= gpa < e))
            fh.write(data)
    result = CliRunner().invoke(app, ["net", str(copy), "--json", "--no-identify"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_corrupt_socket_in_a_real_dump_is_unverifiable(clean_dump: Path, tmp_path: Path) -> None:
    family, _node, _gva = _listen_80(clean_dump)
    data = _corrupt(clean_dump, tmp_path, [(family, struct.pack("<H", 0xBEEF))])
    assert not data["complete"]
    assert "unverifiable" in data["views"]["files"]["problem"] and "family" in data["views"]["files"]["problem"]
    assert data["views"]["cross_view"]["verdict"] == "unverifiable" and data["views"]["cross_view"]["hidden"] == 0
    assert 80 not in {r["local_port"] for r in data["sockets"]}  # left out, not made up
    assert {r["local_port"] for r in data["sockets"] if r["state"] == "LISTEN"} >= {22, 8000}
    assert not [f for f in data["findings"] if f["kind"] == "hidden-socket"]


def test_cyclic_listen_chain_in_a_real_dump_makes_no_claim(clean_dump: Path, tmp_path: Path) -> None:
    _family, node, node_gva = _listen_80(clean_dump)
    data = _corrupt(clean_dump, tmp_path, [(node, struct.pack("<Q", node_gva))])  # next -> itself
    assert not data["views"]["tables"]["complete"] and "revisits" in data["views"]["tables"]["problem"]
    assert data["views"]["cross_view"]["verdict"] == "unverifiable"
    assert not [f for f in data["findings"] if f["kind"] == "hidden-socket"]


@pytest.mark.parametrize("seed", range(4))
def test_garbage_over_a_real_sock_never_crashes_or_claims(clean_dump: Path, tmp_path: Path, seed: int) -> None:
    import random

    family, _node, _gva = _listen_80(clean_dump)
    rng = random.Random(seed)
    start = family - 16 + 8 * rng.randrange(0, 12)
    data = _corrupt(clean_dump, tmp_path, [(start, rng.randbytes(rng.choice([8, 64, 256])))])
    assert not [f for f in data["findings"] if f["kind"] == "hidden-socket"]
    assert {r["local_port"] for r in data["sockets"] if r["state"] == "LISTEN"} >= {22, 8000}
