"""Run-state control of a VM over QMP: pause for a consistent view and give the operator's state back.

The one pause helper: every method that pauses a VM goes through `paused`, which never resumes a VM that
was already paused (its operator paused it, or another tool holds it) and always resumes one it paused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol


class Commands(Protocol):
    """Anything that runs QMP commands (nephoscope.hypervisor.qmp.Qmp)."""

    def command(self, name: str, **args: Any) -> Any: ...


def is_running(qmp: Commands) -> bool:
    """Return whether the VM's vCPUs run now (QMP query-status; does not pause)."""
    status = qmp.command("query-status")
    return bool(status and status.get("running"))


@contextlib.contextmanager
def paused(qmp: Commands | None) -> Iterator[bool]:
    """Pause the VM for the block if it runs, and resume it afterwards only if it ran (also on errors).

    Yields whether this call paused it. With `qmp` None (a dump file, no monitor) nothing is paused."""
    if qmp is None:
        yield False
        return
    was_running = is_running(qmp)
    if was_running:
        qmp.command("stop")
    try:
        yield was_running
    finally:
        if was_running:
            qmp.command("cont")
