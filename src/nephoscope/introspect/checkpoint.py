"""The `checkpoint` method: pause, copy guest RAM consistently, resume, then analyse the copy offline.

The customer's VM sees only the pause (measured and reported); inspect and arch then run on the frozen
copy, so their view is consistent (no structure changes under the walker's feet).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from nephoscope.core.errors import ConnectorError, NephoscopeError
from nephoscope.core.payloads import Checkpoint
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.hypervisor.clone import Clone, clone_argv, new_workdir, qemu_argv, save_device_state
from nephoscope.hypervisor.control import paused
from nephoscope.hypervisor.qmp import Qmp
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.base import observe, unverifiable
from nephoscope.memory.roots import VcpuState, parse_registers

NAME = "checkpoint"
ANALYSES = ("inspect", "arch")


def parse_cr3s(info_registers: str) -> list[int]:
    """Return every vCPU's CR3 from HMP `info registers -a` text."""
    return [v.cr3 for v in parse_registers(info_registers)]


class PreparedCopy:
    """A destination file and both mappings, faulted in before the pause so the pause is one memcpy.

    Allocating and faulting 512 MiB costs over a second here; copying between resident mappings costs
    about 50 ms. So everything slow happens while the guest still runs."""

    def __init__(self, source: Path, target: Path) -> None:
        self.size = source.stat().st_size
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        with source.open("rb") as src:
            self._src = mmap.mmap(src.fileno(), self.size, flags=flags, prot=mmap.PROT_READ)
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, self.size)
            self._dst = mmap.mmap(fd, self.size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._dst_np = np.frombuffer(self._dst, dtype=np.uint8)
        self._dst_np[:: mmap.PAGESIZE] = 0  # make sure every destination page is allocated and writable

    def copy(self) -> None:
        """Copy the whole source into the destination (call while the VM is paused)."""
        np.copyto(self._dst_np, np.frombuffer(self._src, dtype=np.uint8))

    def close(self) -> None:
        """Unmap both files (the destination file stays)."""
        del self._dst_np
        self._src.close()
        self._dst.close()


class CheckpointMethod:
    """Pause → copy RAM → resume → inspect and arch on the copy."""

    name = NAME

    def __init__(self, rollback: bool = False, keep_copy: Path | None = None) -> None:
        self.rollback = rollback
        self.keep_copy = keep_copy
        self.last_stats: dict[str, float] = {}

    def snapshot(self, vm: VmTarget, target: Path, state_file: Path | None = None) -> tuple[float, list[VcpuState]]:
        """Pause `vm` (if it runs), copy its RAM to `target` (and its device state to `state_file`), resume it
        only if it ran: a VM its operator paused stays paused.

        Returns (guest-visible pause in seconds, the vCPUs' paging state: CR3, CR4, EFER)."""
        if vm.qmp_socket is None or vm.ram_path is None or not vm.live:
            raise ConnectorError("checkpoint needs a live VM with a QMP socket and a shared RAM file")
        prepared = PreparedCopy(vm.ram_path, target)
        try:
            with Qmp(vm.qmp_socket) as qmp:
                t0 = time.monotonic()
                with paused(qmp):
                    vcpus = parse_registers(qmp.hmp("info registers -a"))
                    prepared.copy()
                    if state_file is not None:
                        save_device_state(qmp, state_file)
                pause = time.monotonic() - t0
        finally:
            prepared.close()
        return pause, vcpus

    def collect(self, vm: VmTarget) -> Iterator[Observation]:
        """Yield the analyses of a consistent copy of `vm`'s RAM, labelled as checkpoint observations."""
        from nephoscope.introspect.arch import ArchMethod
        from nephoscope.introspect.inspect import InspectMethod

        analyses = {"inspect": InspectMethod, "arch": ArchMethod}

        work = new_workdir(vm.name) if self.rollback else None
        default_copy = Path("/dev/shm") / f"nephoscope-ckpt-{vm.name}-{os.getpid()}.ram"
        copy = (work / "ram") if work else (self.keep_copy or default_copy)
        state = work / "state" if work else None
        try:
            pause, vcpus = self.snapshot(vm, copy, state)
        except (ConnectorError, OSError) as exc:
            with contextlib.suppress(OSError):
                copy.unlink()
            if work:
                shutil.rmtree(work, ignore_errors=True)
            yield unverifiable(NAME, vm, "snapshot", f"could not take a consistent copy: {exc}")
            return
        self.last_stats = {"pause_s": round(pause, 4)}
        frozen = VmTarget(name=vm.name, ram_path=copy, live=False)
        try:
            yield observe(NAME, vm, "checkpoint", "snapshot", Checkpoint(
                pause, tuple(v.cr3 for v in vcpus), tuple(v.levels for v in vcpus), copy.stat().st_size),
                Verdict.VERIFIED)
            for analysis in ANALYSES:
                method = analyses[analysis]()
                if hasattr(method, "extra_vcpus"):
                    method.extra_vcpus = vcpus  # the paused vCPUs' CR3/CR4/EFER are hardware truth for arch
                try:
                    for o in method.collect(frozen):
                        yield replace(o, provenance=Provenance(NAME, vm.name, o.provenance.time), via=analysis)
                except NephoscopeError as exc:
                    yield unverifiable(NAME, vm, analysis, f"{analysis} on the copy failed: {exc}")
            if work is not None and state is not None:
                yield from self._agent_in_clone(vm, work, copy, state)
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            elif self.keep_copy is None:
                with contextlib.suppress(OSError):
                    copy.unlink()

    def _agent_in_clone(self, vm: VmTarget, work: Path, copy: Path, state: Path) -> Iterator[Observation]:
        """Run the agent inside a throw-away clone of the checkpoint (network cut), then discard the clone."""
        from nephoscope.introspect.agent import AgentMethod

        if vm.qemu_pid is None:
            yield unverifiable(NAME, vm, "agent-in-clone", "the VM's QEMU process is unknown; cannot clone it")
            return
        try:
            argv = clone_argv(qemu_argv(vm.qemu_pid), work, copy)
            started = time.monotonic()
            with Clone(argv, work, state) as clone:
                self.last_stats["clone_start_s"] = round(time.monotonic() - started, 3)
                target = VmTarget(name=vm.name, qmp_socket=clone.qmp_socket, qga_socket=clone.qga_socket)
                clone.wait_agent()
                for o in AgentMethod(timeout=30).collect(target):
                    yield replace(o, provenance=Provenance(NAME, vm.name, o.provenance.time), via="agent-in-clone")
        except (ConnectorError, OSError) as exc:
            yield unverifiable(NAME, vm, "agent-in-clone", f"throw-away clone failed: {exc}")
