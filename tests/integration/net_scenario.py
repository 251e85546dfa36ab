"""The network scenario of the tampered guest, started at test time through the agent (the shared image is not
changed): a spammer (python3 calling itself exim4, holding many SMTP connections to a sink the test runs on
the host) and a process holding raw and packet sockets. Their scripts ship in lab/helpers/.

With user-mode networking the guest reaches the host's loopback as 10.0.2.2, so the sink listens on
127.0.0.1 at an SMTP port (25, 587 or 465: whichever is free; binding them needs root).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from nephoscope.core.errors import ConnectorError
from nephoscope.hypervisor.qga import GuestAgent

HELPERS = Path(__file__).resolve().parents[2] / "src" / "nephoscope" / "lab" / "helpers"
SMTP_PORTS = (25, 587, 465)
GUEST_HOST = "10.0.2.2"  # slirp: the host's loopback


class SmtpSink:
    """A host-side SMTP sink on 127.0.0.1: greets, then holds every connection open until stopped."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for port in SMTP_PORTS:
            try:
                self.server.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        else:
            self.server.close()
            raise OSError(f"none of the SMTP ports {SMTP_PORTS} is free on 127.0.0.1 (or not root)")
        self.port = self.server.getsockname()[1]
        self.server.listen(64)
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            conn.sendall(b"220 sink.example ESMTP\r\n")
            self.conns.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for c in self.conns:
            c.close()
        self.server.close()


def start_helper(agent: GuestAgent, script: str, *args: str) -> int:
    """Start lab/helpers/`script` in the guest with python3 (in the background); return its pid."""
    code = (HELPERS / script).read_text()
    quoted = " ".join("'" + a.replace("'", "") + "'" for a in args)
    rc, out, err = agent.exec(["/bin/sh", "-c", f'/usr/bin/python3 -c "$0" {quoted} >/tmp/{script}.log 2>&1 & '
                               "echo $!", code], timeout=60)
    if rc != 0 or not out.strip().isdigit():
        raise RuntimeError(f"could not start {script}: {rc} {out!r} {err!r}")
    return int(out.strip())


def wait_for(agent: GuestAgent, script: str, word: str, timeout: float = 60) -> str:
    """Wait until the helper's log says `word` (it is ready); return the log."""
    deadline = time.monotonic() + timeout
    log = ""
    while time.monotonic() < deadline:
        try:
            log = agent.read_file(f"/tmp/{script}.log").decode("utf-8", "replace")
        except ConnectorError:  # not written yet
            log = ""
        if word in log or "Error" in log:
            return log
        time.sleep(0.5)
    return log


def stop_helper(agent: GuestAgent, pid: int) -> None:
    """Kill a helper started by start_helper."""
    agent.exec(["/bin/kill", "-9", str(pid)], timeout=30)
