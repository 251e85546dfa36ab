"""Merging observations, parsing the agent's listing, and the scan store, on synthetic inputs."""

from __future__ import annotations

import base64

from nephoscope.analysis.merge import _masquerading, merge
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.introspect.agent import SEP, installed_packages, parse_listing
from nephoscope.service.scan import diff_scans
from nephoscope.store.sqlite import Store


def _obs(method: str, kind: str, data: dict, verdict: Verdict = Verdict.REPORTED) -> Observation:
    return Observation(kind, f"pid:{data.get('pid')}", data, Provenance(method, "vm"), verdict)


def _listing(records: list[tuple[int, int, str, str, str, str]], tail: str = "") -> str:
    text = "".join(f"{SEP}P {pid} {ppid}{SEP}{comm}\n{SEP}{exe}\n{SEP}{cmd}{SEP}{maps}"
                   for pid, ppid, comm, exe, cmd, maps in records)
    return base64.b64encode((text + tail).encode()).decode()


def test_listing_parser_survives_garbage_and_marks_agent_children() -> None:
    maps = "7f00-7f10 r-xp 00001000 08:01 42 /usr/bin/bash\n7f10-7f20 rw-p 0 0:0 0\nnonsense line\n"
    text = _listing([(1, 0, "init", "/bin/busybox", "init\0", ""),
                     (50, 1, "qemu-ga", "/usr/sbin/qemu-ga", "qemu-ga\0", ""),
                     (60, 50, "bash", "/usr/bin/bash", "bash\0-c\0", maps),
                     (2, 0, "kthreadd", "", "", "")], tail=f"{SEP}P notapid{SEP}\x1b[2J garbage")
    procs, anomalies = parse_listing(text)
    assert set(procs) == {1, 50, 60, 2}
    assert procs[60]["agent_own"] and not procs[1]["agent_own"]
    assert procs[2]["kernel_thread"]
    assert procs[60]["cmdline"] == ["bash", "-c"]
    assert procs[60]["maps"] == [{"start": 0x7F00, "end": 0x7F10, "perms": "r-xp", "offset": 0x1000,
                                  "path": "/usr/bin/bash"}]
    assert len(anomalies) == 2
    assert parse_listing("%%% not base64")[1] == ["the listing is not valid base64"]
    truncated = _listing([(7, 1, "x", "/x", "x", "")])[:-8]
    parse_listing(truncated)  # must not raise


def test_dpkg_status_parsing_keeps_source_and_skips_removed() -> None:
    status = ("Package: libssl3\nStatus: install ok installed\nSource: openssl\nVersion: 3.0.17-1~deb12u2\n\n"
              "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\nPackage: nginx\n"
              "Status: install ok installed\nVersion: 1.22.1-9\n")
    pk = installed_packages(status)
    assert pk == {"libssl3": {"version": "3.0.17-1~deb12u2", "source": "openssl", "arch": ""},
                  "nginx": {"version": "1.22.1-9", "source": "nginx", "arch": ""}}


def test_masquerading_rules() -> None:
    assert _masquerading("sshd", "/usr/bin/python3.11", ["/usr/sbin/sshd -D"])
    assert not _masquerading("python3", "/usr/bin/python3.11", ["/usr/bin/python3", "-m", "http.server"])
    assert not _masquerading("sh", "/usr/bin/busybox", ["sh"])
    assert not _masquerading("nginx", "/usr/sbin/nginx", ["nginx: worker process"])
    assert not _masquerading("3", "/memfd:x (deleted)", ["sleep"])


def test_merge_flags_hidden_only_when_the_agent_listing_is_credible() -> None:
    inspect = [_obs("inspect", "process", {"pid": p, "comm": c, "exe": e, "cmdline": [c]}, Verdict.VERIFIED)
               for p, c, e in [(10, "nginx", "/usr/sbin/nginx"), (11, "kdevtmpfsi", "/usr/bin/python3.11")]]
    agent = [_obs("agent", "process", {"pid": 10, "comm": "nginx", "exe": "/usr/sbin/nginx", "cmdline": ["nginx"]})]
    view = merge(inspect + agent, ["inspect", "agent"], "vm")
    kinds = {(f.kind, f.evidence[0].get("pid")) for f in view.findings}
    assert ("hidden-process", 11) in kinds and ("hidden-process", 10) not in kinds
    assert view.processes[10].seen_by == {"inspect": "verified", "agent": "reported"}
    dead_agent = Observation("unverifiable", "processes", {}, Provenance("agent", "vm"), Verdict.UNVERIFIABLE, "down")
    view = merge([*inspect, dead_agent], ["inspect", "agent"], "vm")
    assert not [f for f in view.findings if f.kind == "hidden-process"]
    assert view.unverifiable[0]["reason"] == "down"


def test_store_round_trip_and_diff(tmp_path) -> None:
    store = Store(tmp_path / "s.sqlite")
    a = [_obs("agent", "process", {"pid": 1, "comm": "init", "exe": "/bin/busybox"})]
    b = [*a, _obs("agent", "process", {"pid": 7, "comm": "evil", "exe": "/tmp/evil"})]
    one = store.save_scan("vm", ["agent"], a, [], {"processes": 1}, 1.0)
    two = store.save_scan("vm", ["agent"], b, [], {"processes": 2}, 2.0)
    assert [s.id for s in store.scans("vm")] == [two, one]
    d = diff_scans(store, one, two)
    assert [p["pid"] for p in d["processes_started"]] == [7] and not d["processes_gone"]
    assert store.observations(two, "process")[1]["data"]["comm"] == "evil"
