"""Sockets in the scan: the merged view judges inspect's sockets with the owners' identity from arch, compares
listeners with the agent's /proc/net, and makes no claim from an unsound view."""

from __future__ import annotations

from nephoscope.analysis.merge import merge
from nephoscope.core.payloads import Image, Process, Socket, Unverifiable
from nephoscope.core.records import Observation, Provenance, Verdict

CR3 = 0x5000


def _obs(method: str, kind: str, key: str, payload: object, verdict: Verdict = Verdict.VERIFIED,
         reason: str = "") -> Observation:
    return Observation(kind, key, payload, Provenance(method, "vm"), verdict, reason)  # type: ignore[arg-type]


def _scan(*extra: Observation, agent_listener: bool = True) -> list[Observation]:
    obs = [
        _obs("inspect", "process", "pid:50", Process(50, 50, 1, "exim4", "/usr/bin/python3.11", ("exim4",), cr3=CR3)),
        _obs("agent", "process", "pid:50", Process(50, ppid=1, comm="exim4", exe="/usr/bin/python3.11"),
             Verdict.REPORTED),
        _obs("arch", "binary", "img", Image(CR3, None, 0x1000, 0x2000, 0x1000, 1, "/usr/bin/python3.11",
                                            (("python3.11-minimal", "3.11.2"),))),
        _obs("inspect", "socket", "sock:1", Socket("tcp", "inet", "stream", "ESTABLISHED", "10.0.2.15", 40000,
                                                   "10.0.2.2", 25, inode=11, views=("files", "tcp-established"),
                                                   owners=(50,))),
        _obs("inspect", "socket", "sock:2", Socket("tcp", "inet", "stream", "LISTEN", "0.0.0.0", 31337,
                                                   "0.0.0.0", 0, inode=12, views=("files", "tcp-listen"),
                                                   owners=(50,))),
        _obs("agent", "socket", "tcp:11", Socket("tcp", "inet", "", "ESTABLISHED", "10.0.2.15", 40000, "10.0.2.2",
                                                 25, inode=11, views=("proc-net",)), Verdict.REPORTED),
    ]
    if agent_listener:
        obs.append(_obs("agent", "socket", "tcp:12", Socket("tcp", "inet", "", "LISTEN", "0.0.0.0", 31337,
                                                            "0.0.0.0", 0, inode=12, views=("proc-net",)),
                        Verdict.REPORTED))
    return obs + list(extra)


def _kinds(obs: list[Observation]) -> list[tuple[str, object]]:
    view = merge(obs, ["inspect", "arch", "agent"], "vm")
    return sorted((f.kind, f.evidence[0].get("pid")) for f in view.findings if f.kind not in ("masquerading",))


def test_smtp_from_a_masquerading_interpreter_is_found_with_its_identity() -> None:
    view = merge(_scan(), ["inspect", "arch", "agent"], "vm")
    smtp = [f for f in view.findings if f.kind == "outbound-smtp"]
    assert len(smtp) == 1
    ev = smtp[0].evidence[0]
    assert (ev["pid"], ev["comm"], ev["binary"], ev["package"], ev["identity"]) == (
        50, "exim4", "/usr/bin/python3.11", "python3.11-minimal", "identified")
    assert not [f for f in view.findings if f.kind == "hidden-socket"]


def test_listener_the_guest_does_not_show_is_hidden() -> None:
    assert ("hidden-socket", None) in [(k, None) for k, _ in _kinds(_scan(agent_listener=False))]


def test_unsound_views_make_no_socket_claims() -> None:
    broken_agent = _obs("agent", "unverifiable", "sockets", Unverifiable("sockets"), Verdict.UNVERIFIABLE, "x")
    assert "hidden-socket" not in dict(_kinds(_scan(broken_agent, agent_listener=False)))
    broken_kernel = _obs("inspect", "unverifiable", "socket-tables", Unverifiable("socket-tables"),
                         Verdict.UNVERIFIABLE, "cycle")
    hidden = _obs("inspect", "socket", "sock:3", Socket("tcp", "inet", "stream", "ESTABLISHED", "10.0.2.15", 1,
                                                        "192.0.2.1", 6667, inode=13, views=("tcp-established",),
                                                        hidden=True))
    assert "hidden-socket" not in dict(_kinds(_scan(broken_kernel, hidden)))
    assert "hidden-socket" in dict(_kinds(_scan(hidden)))
