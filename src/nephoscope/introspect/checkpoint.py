"""The `checkpoint` method: pause, copy guest RAM consistently, resume, then analyse the copy offline.

The customer's VM sees only the pause (measured and reported); inspect and arch then run on the frozen
copy, so their view is consistent (no structure changes under the walker's feet).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from nephoscope.core.errors import ConnectorError, NephoscopeError
from nephoscope.core.payloads import Checkpoint
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.hypervisor.clone import Clone, clone_argv, new_workdir, qemu_argv, save_device_state
from nephoscope.hypervisor.control import paused
from nephoscope.hypervisor.monitor import open_monitor
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.base import observe, unverifiable
from nephoscope.introspect.ram import open_ram
from nephoscope.memory.physical import PhysicalMemory, RawMemory
from nephoscope.memory.roots import VcpuState, parse_registers

NAME = "checkpoint"
ANALYSES = ("inspect", "arch")


def parse_cr3s(info_registers: str) -> list[int]:
    """Return every vCPU's CR3 from HMP `info registers -a` text."""
    return [v.cr3 for v in parse_registers(info_registers)]


class PreparedCopy:
    """A sparse destination file for guest RAM, allocated before the pause, so the pause is one copy of touched RAM.

    `source` is a RAM file (path) or open guest RAM (a RawMemory of the VM's RAM file, or its QEMU process's
    memory). Only RAM that holds data is copied: holes of a RAM file and pages the process never touched stay
    holes of the copy (file offset = gpa), so the copy costs the host only the guest's touched RAM, and
    nothing untouched is allocated in the VM either. Slow parts (allocating the destination for what is
    touched now) happen while the guest still runs; `copy` learns the touched set again in the pause."""

    def __init__(self, source: Path | PhysicalMemory, target: Path) -> None:
        self._own = isinstance(source, Path | str)
        self.phys: PhysicalMemory = RawMemory(source) if isinstance(source, Path | str) else source
        self.size = max(e for _, e in self.phys.ranges)
        self.bytes_copied = 0
        try:
            self._fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError:
            if self._own:
                self.phys.close()
            raise
        try:
            os.ftruncate(self._fd, self.size)
            for gpa, n in _touched(self.phys):
                with contextlib.suppress(OSError):  # a file system without fallocate: pages come at copy time
                    os.posix_fallocate(self._fd, gpa, n)
        except BaseException:
            self.close()
            raise

    def copy(self) -> None:
        """Copy the touched RAM into the destination (call while the VM is paused)."""
        if isinstance(self.phys, RawMemory):
            self.phys.refresh()  # RAM the guest touched since the file was opened
        segments = getattr(self.phys, "iter_segments", None)
        if segments is None:
            raise ConnectorError(f"cannot enumerate the touched RAM of {self.phys!r}")
        for gpa, view in segments():
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], gpa + done)
            self.bytes_copied += len(view)

    def close(self) -> None:
        """Close the destination (the file stays) and the source if it was opened here."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        if self._own:
            self.phys.close()


def _touched(phys: PhysicalMemory) -> list[tuple[int, int]]:
    touched = getattr(phys, "iter_touched", None)
    return list(touched()) if touched is not None else [(s, e - s) for s, e in phys.ranges]


class CheckpointMethod:
    """Pause → copy RAM → resume → inspect and arch on the copy."""

    name = NAME

    def __init__(self, rollback: bool = False, keep_copy: Path | None = None) -> None:
        self.rollback = rollback
        self.keep_copy = keep_copy
        self.last_stats: dict[str, float] = {}

    def snapshot(self, vm: VmTarget, target: Path, state_file: Path | None = None,
                 phys: PhysicalMemory | None = None) -> tuple[float, list[VcpuState]]:
        """Pause `vm` (if it runs), copy its touched RAM to `target` (sparse; and its device state to
        `state_file`), resume it only if it ran: a VM its operator paused stays paused.

        RAM comes from `phys` if given, else from `open_ram` (the RAM file, or the QEMU process's memory).
        Returns (guest-visible pause in seconds, the vCPUs' paging state: CR3, CR4, EFER)."""
        if not vm.live or (vm.qmp_socket is None and vm.domain is None):
            raise ConnectorError("checkpoint needs a live VM with a monitor (a QMP socket or a libvirt domain)")
        own = phys is None
        ram = open_ram(vm) if phys is None else phys
        try:
            prepared = PreparedCopy(ram, target)
            try:
                with open_monitor(vm) as qmp:
                    t0 = time.monotonic()
                    with paused(qmp):
                        vcpus = parse_registers(qmp.hmp("info registers -a"))
                        prepared.copy()
                        if state_file is not None:
                            save_device_state(qmp, state_file)  # type: ignore[arg-type]
                    pause = time.monotonic() - t0
                self.last_stats["bytes_copied"] = prepared.bytes_copied
                self.last_stats["ram_from"] = "RAM file" if isinstance(ram, RawMemory) else "QEMU process"  # type: ignore[assignment]
            finally:
                prepared.close()
        finally:
            if own:
                ram.close()
        return pause, vcpus

    def collect(self, vm: VmTarget) -> Iterator[Observation]:
        """Yield the analyses of a consistent copy of `vm`'s RAM, labelled as checkpoint observations."""
        from nephoscope.introspect.arch import ArchMethod
        from nephoscope.introspect.inspect import InspectMethod

        analyses = {"inspect": InspectMethod, "arch": ArchMethod}

        # a clone boots from a shared RAM file; a VM whose RAM lives only in its process offers none
        no_clone = "" if not self.rollback or vm.ram_path is not None else (
            "the VM's RAM lives only in its QEMU process (no shared memory-backend-file), so a throw-away "
            "clone cannot start from the copy; the copy was analysed, the agent did not run in a clone")
        work = new_workdir(vm.name) if self.rollback and not no_clone else None
        default_copy = Path("/dev/shm") / f"nephoscope-ckpt-{vm.name}-{os.getpid()}.ram"
        copy = (work / "ram") if work else (self.keep_copy or default_copy)
        state = work / "state" if work else None
        try:
            self.last_stats = {}
            pause, vcpus = self.snapshot(vm, copy, state)
        except (NephoscopeError, OSError) as exc:
            with contextlib.suppress(OSError):
                copy.unlink()
            if work:
                shutil.rmtree(work, ignore_errors=True)
            yield unverifiable(NAME, vm, "snapshot", f"could not take a consistent copy: {exc}")
            return
        self.last_stats["pause_s"] = round(pause, 4)
        frozen = VmTarget(name=vm.name, ram_path=copy, live=False)
        try:
            yield observe(NAME, vm, "checkpoint", "snapshot", Checkpoint(
                pause, tuple(v.cr3 for v in vcpus), tuple(v.levels for v in vcpus), copy.stat().st_size,
                int(self.last_stats.get("bytes_copied", 0)), str(self.last_stats.get("ram_from", ""))),
                Verdict.VERIFIED)
            if no_clone:
                yield unverifiable(NAME, vm, "agent-in-clone", no_clone)
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
