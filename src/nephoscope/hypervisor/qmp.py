"""A small synchronous QMP client over qemu.qmp, with errors that say what to do next."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from nephoscope.core.errors import ConnectorError


class Qmp:
    """A connected QMP monitor; use as a context manager."""

    def __init__(self, socket_path: str | Path, timeout: float = 10.0) -> None:
        self.path = str(socket_path)
        self.timeout = timeout
        self._mon = QEMUMonitorProtocol(self.path)
        try:
            self._mon.connect(negotiate=True)
        except (OSError, QMPError) as exc:
            raise ConnectorError(f"cannot connect to QMP at {self.path}: {exc}; is the VM running?") from exc

    def command(self, name: str, **args: Any) -> Any:
        """Run one QMP command and return its result; raise ConnectorError on an error reply."""
        try:
            reply = self._mon.cmd_raw(name, args or None)
        except (OSError, QMPError, EOFError) as exc:
            raise ConnectorError(f"QMP {name} on {self.path} failed: {exc}") from exc
        if "error" in reply:
            raise ConnectorError(f"QMP {name} refused: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def hmp(self, line: str) -> str:
        """Run a human monitor command (for things QMP lacks, e.g. gva2gpa) and return its text."""
        return str(self.command("human-monitor-command", **{"command-line": line}))

    def close(self) -> None:
        """Disconnect (the VM keeps running)."""
        with contextlib.suppress(Exception):
            self._mon.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
