"""A monitor that answers the first capabilities negotiation with an error (what QEMU does when the previous
client's session was not yet torn down) is retried with a fresh session; one that always refuses gives a
ConnectorError that says so."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from nephoscope.core.errors import ConnectorError
from nephoscope.hypervisor.qmp import NEGOTIATION_ATTEMPTS, Qmp

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}
ALREADY = {"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete"}}


def _recv_json(conn: socket.socket) -> dict | None:
    """Read one JSON object (QMP clients need not end a message with a newline)."""
    buf = b""
    while True:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        buf += chunk
        try:
            obj, _ = json.JSONDecoder().raw_decode(buf.decode().strip())
            return obj
        except ValueError:
            continue


def _monitor(path: Path, refusals: int) -> list[int]:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    sessions: list[int] = []

    def reply(conn: socket.socket, cmd: dict, body: dict) -> None:
        conn.sendall(json.dumps(body | ({"id": cmd["id"]} if "id" in cmd else {})).encode() + b"\n")

    def serve() -> None:
        with srv:
            while True:
                conn, _ = srv.accept()
                sessions.append(1)
                with conn:
                    conn.sendall(json.dumps(GREETING).encode() + b"\n")
                    cmd = _recv_json(conn)
                    if cmd is None:
                        continue
                    if len(sessions) <= refusals:
                        reply(conn, cmd, ALREADY)
                        continue
                    reply(conn, cmd, {"return": {}})
                    while (cmd := _recv_json(conn)) is not None:
                        reply(conn, cmd, {"return": {"running": True}})
                    return

    threading.Thread(target=serve, daemon=True).start()
    return sessions


def test_a_refused_negotiation_is_retried_with_a_fresh_session(tmp_path: Path) -> None:
    sessions = _monitor(tmp_path / "qmp.sock", refusals=1)
    with Qmp(tmp_path / "qmp.sock") as qmp:
        assert qmp.command("query-status") == {"running": True}
    assert len(sessions) == 2


def test_a_monitor_that_always_refuses_is_a_clear_error(tmp_path: Path) -> None:
    sessions = _monitor(tmp_path / "qmp.sock", refusals=99)
    with pytest.raises(ConnectorError, match="sessions tried"):
        Qmp(tmp_path / "qmp.sock")
    assert len(sessions) == NEGOTIATION_ATTEMPTS
