"""What interpreters run, read from guest memory: one reader per interpreter kind, one result type.

A reader gets a `ProcessContext` (the kernel model, the task, its VMAs and user address space) and
returns an `InterpResult` when the process is its interpreter (None when it is not): the entry script,
every thread's frames (file, function, line), the script files it has loaded, and a verdict with its
reason. Readers live in `READERS`, keyed by interpreter kind ("python"; "php" and "java" plug in the same
way); `read_interpreters` runs every reader over every process. A reader never raises for guest data:
garbage gives `unverifiable` with the reason. Nothing here pauses the VM; callers that want one instant
wrap the call in `LinuxKernel.paused()`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nephoscope.core.errors import GuestDataError, KnowledgeError, MemoryAccessError
from nephoscope.core.records import Verdict

if TYPE_CHECKING:
    from nephoscope.memory.paging import AddressSpace
    from nephoscope.os.linux.model import LinuxKernel
    from nephoscope.os.linux.walkers import Task, Vma

GUEST_ERRORS = (MemoryAccessError, GuestDataError, KnowledgeError)


@dataclass(frozen=True, slots=True)
class Frame:
    """One interpreter frame: the script file, function (qualified name) and current line (-1 unknown)."""

    file: str
    function: str
    line: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "function": self.function, "line": self.line}


@dataclass(frozen=True, slots=True)
class InterpThread:
    """One interpreter thread: its ids and its stack, innermost frame first."""

    thread_id: int  # the interpreter's own id (pthread_t for CPython)
    native_id: int  # the kernel tid (0 when the interpreter does not record it)
    frames: tuple[Frame, ...]
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"thread_id": self.thread_id, "native_id": self.native_id, "name": self.name,
                "frames": [f.to_dict() for f in self.frames]}


@dataclass(slots=True)
class InterpResult:
    """What one interpreter process runs, as read from guest memory."""

    pid: int
    comm: str
    kind: str  # "python", "php", "java"
    runtime: str  # the interpreter build: "CPython 3.11 (python3.11-minimal 3.11.2-6+deb12u9)"
    verdict: Verdict
    reason: str = ""  # why unverifiable (or what was cross-checked)
    entry: str = ""  # the entry script, jar or main class
    threads: list[InterpThread] = field(default_factory=list)
    scripts: list[str] = field(default_factory=list)  # script files loaded (imported modules, includes, jars)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "comm": self.comm, "kind": self.kind, "runtime": self.runtime,
                "verdict": str(self.verdict), "reason": self.reason, "entry": self.entry,
                "threads": [t.to_dict() for t in self.threads], "scripts": list(self.scripts),
                "details": dict(self.details)}


@dataclass(slots=True)
class ProcessContext:
    """One process handed to the readers: kernel model, task, VMAs, user address space (read through k)."""

    kernel: LinuxKernel
    task: Task
    vmas: list[Vma]
    user: AddressSpace

    def read(self, gva: int, size: int) -> bytes:
        """Return `size` bytes at user gva (charged to the kernel model's budget); raise on unmapped memory."""
        return self.kernel.read_in(self.user, gva, size)

    def u64(self, gva: int) -> int:
        """Return the u64 at user gva."""
        return int.from_bytes(self.read(gva, 8), "little")


Reader = Callable[[ProcessContext], "InterpResult | None"]
# kind -> "module:function"; imported lazily so one reader's import problem does not stop the others
READERS: dict[str, str] = {
    "python": "nephoscope.introspect.interp.python:read_python",
    "php": "nephoscope.introspect.interp.php:read_php",
    "java": "nephoscope.introspect.interp.java:read_java",
}


def reader(kind: str) -> Reader:
    """Return the reader function registered for interpreter `kind`."""
    module, _, name = READERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def iter_contexts(k: LinuxKernel, pids: set[int] | None = None) -> Iterator[ProcessContext]:
    """Yield a ProcessContext for every user process (optionally only `pids`) whose VMAs are readable."""
    for task in k.processes():
        if task.kernel_thread or not task.mm_gva or (pids is not None and task.pid not in pids):
            continue
        try:
            vmas = k.vmas(task)
            pgd = k.u64(task.mm_gva + k.off["mm_struct.pgd"])
            user = k.user_space(pgd)
        except GUEST_ERRORS:
            continue
        yield ProcessContext(k, task, list(vmas), user)


def read_interpreters(k: LinuxKernel, kinds: tuple[str, ...] | None = None,
                      pids: set[int] | None = None) -> list[InterpResult]:
    """Return what every interpreter process of the guest runs (every registered kind; does not pause)."""
    chosen = [kind for kind in READERS if kinds is None or kind in kinds]
    out: list[InterpResult] = []
    for ctx in iter_contexts(k, pids):
        for kind in chosen:
            try:
                result = reader(kind)(ctx)
            except GUEST_ERRORS as exc:  # a reader should not let these out; if one does, it is still no crash
                result = InterpResult(ctx.task.pid, ctx.task.comm, kind, "", Verdict.UNVERIFIABLE,
                                      f"{kind} reader failed on guest data: {exc}")
            if result is not None:
                out.append(result)
                break
    return out
