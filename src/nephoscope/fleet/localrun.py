"""Run a fleet server as a child process on loopback (tests, the bench, a local demo) and stop it again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from nephoscope.fleet.pgcluster import PgError, free_port


@dataclass(slots=True)
class ServerProcess:
    """`nephoscope server` on 127.0.0.1:port over `db`; `operator_token` is read from its token file."""

    db: str
    workdir: Path
    port: int = field(default_factory=free_port)
    kb: Path | None = None
    vulns: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Return the server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def operator_token(self) -> str:
        """Return the first operator token the server wrote."""
        return (self.workdir / "operator.token").read_text().strip()

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until /healthz answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "nephoscope.cli.main", "server", "--db", self.db, "--port", str(self.port),
                "--token-file", str(self.workdir / "operator.token")]
        if self.kb is not None:
            argv += ["--kb", str(self.kb)]
        if self.vulns is not None:
            argv += ["--vulns", str(self.vulns)]
        log = (self.workdir / "server.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env={**os.environ}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PgError(f"the fleet server exited ({self.proc.returncode}); see {self.workdir / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise PgError(f"the fleet server did not answer within {timeout:.0f} s; see {self.workdir / 'server.log'}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def kill(self) -> None:
        """Kill the server abruptly (as a crash would)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
