"""A small synchronous QMP client over qemu.qmp, with errors that say what to do next."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.protocol import ConnectError
from qemu.qmp.qmp_client import NegotiationError

from nephoscope.core.errors import ConnectorError

NEGOTIATION_ATTEMPTS = 3


class Qmp:
    """A connected QMP monitor; use as a context manager."""

    def __init__(self, socket_path: str | Path, timeout: float = 10.0) -> None:
        self.path = str(socket_path)
        self.timeout = timeout
        # A monitor another client just left (a killed tool, a guard that repaired the VM) can answer the
        # capabilities negotiation with what it still had queued for the old session: try a fresh session.
        for attempt in range(NEGOTIATION_ATTEMPTS):
            self._mon = QEMUMonitorProtocol(self.path)
            try:
                self._mon.connect(negotiate=True)
                return
            except ConnectError as exc:
                if not isinstance(exc.exc, NegotiationError):
                    raise ConnectorError(f"cannot connect to QMP at {self.path}: {exc}; is the VM running?") from exc
                self.close()
                if attempt + 1 == NEGOTIATION_ATTEMPTS:
                    raise ConnectorError(f"cannot connect to QMP at {self.path}: {exc} ({NEGOTIATION_ATTEMPTS} "
                                         "sessions tried); is another client holding the monitor?") from exc
                time.sleep(0.2 * (attempt + 1))
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
