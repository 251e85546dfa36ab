"""A small gdb remote-serial-protocol client for QEMU's gdbstub (all-stop mode, x86-64).

QEMU 7.2 behaviour this client absorbs: connecting pauses the VM and a stop reply arrives unasked; there
is no no-ack mode; any byte sent while the VM runs pauses it (so only 0x03 is sent then); `p` is not
supported, and `g` omits ss/ds/es_base although the target XML lists them; `D` removes every breakpoint
and resumes; resuming from a breakpoint re-hits it unless it is removed for one single-step.
A closed connection leaves breakpoints and a paused VM behind: `Guard` repairs that after a crash.
A VM without a gdbstub gets one on demand (`start_stub`: HMP `gdbserver` on a loopback port), removed
afterwards (`remove_stub`: `gdbserver none`), by the Guard too when nephoscope dies in between.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from nephoscope.core.errors import ConnectorError
from nephoscope.hypervisor.target import VmTarget

MAX_PACKET = 1 << 20  # a stub that sends more than this without a '#' is broken or hostile
INTERRUPT = b"\x03"
_HEX = re.compile(rb"^[0-9a-fA-F]*$")
# QEMU 7.2's `g` reply for x86-64 (608 bytes); newer QEMUs follow the XML (with ss/ds/es_base)
_X86_64_GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
QEMU72_LAYOUT: list[tuple[str, int]] = (
    [(r, 8) for r in _X86_64_GPRS] + [("rip", 8), ("eflags", 4)]
    + [(s, 4) for s in ("cs", "ss", "ds", "es", "fs", "gs")]
    + [(r, 8) for r in ("fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer")]
    + [(f"st{i}", 10) for i in range(8)] + [(r, 4) for r in ("fctrl", "fstat", "ftag", "fiseg", "fioff",
                                                              "foseg", "fooff", "fop")]
    + [(f"xmm{i}", 16) for i in range(16)] + [("mxcsr", 4)])


def checksum(payload: bytes) -> int:
    """Return the RSP checksum of `payload` (sum of bytes modulo 256)."""
    return sum(payload) & 0xFF


def escape(payload: bytes) -> bytes:
    """Escape '#', '$', '}' and '*' for a packet body (binary-data packets)."""
    out = bytearray()
    for b in payload:
        if b in b"#$}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """Return `payload` framed as `$payload#cs` (payload must already be escaped)."""
    return b"$" + payload + b"#%02x" % checksum(payload)


def decode_body(body: bytes) -> bytes:
    """Undo '}' escapes and '*' run-length encoding in a received packet body."""
    out = bytearray()
    i = 0
    while i < len(body):
        b = body[i]
        if b == 0x7D and i + 1 < len(body):
            out.append(body[i + 1] ^ 0x20)
            i += 2
        elif b == 0x2A and out and i + 1 < len(body):  # '*': repeat the previous byte (n - 29) more times
            out += out[-1:] * (body[i + 1] - 29)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


@dataclass(frozen=True, slots=True)
class StopReply:
    """Why the VM stopped: signal (5 = breakpoint/step, 2 = interrupt), thread, other fields."""

    raw: str
    signal: int
    thread: str = ""
    info: dict[str, str] = field(default_factory=dict)

    @property
    def exited(self) -> bool:
        return self.raw[:1] in ("W", "X")


def parse_stop(text: str) -> StopReply:
    """Parse a stop reply (`S05`, `T05thread:01;...`, `W00`); raise ConnectorError on anything else."""
    if len(text) >= 3 and text[0] in "STWX":
        try:
            sig = int(text[1:3], 16)
        except ValueError:
            raise ConnectorError(f"gdbstub sent a malformed stop reply {text[:60]!r}") from None
        info = dict(kv.split(":", 1) for kv in text[3:].split(";") if ":" in kv) if text[0] == "T" else {}
        return StopReply(text, sig, info.get("thread", ""), info)
    raise ConnectorError(f"expected a stop reply from the gdbstub, got {text[:60]!r}")


_BUSY_STATES = {"01", "03", "08"}  # ESTABLISHED, SYN_RECV, CLOSE_WAIT: a client is attached or queued


def clients_of(port: int) -> int:
    """Return how many TCP connections to local `port` are open or queued (Linux /proc/net/tcp*)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]  # noqa: SIM115 - a tiny procfs read
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[1].rsplit(":", 1)[-1] == f"{port:04X}" and fields[3] in _BUSY_STATES:
                count += 1
    return count


def _wait_idle(port: int, seconds: float) -> int:
    """Return the number of clients of `port` still there after waiting up to `seconds` (0: idle)."""
    deadline = time.monotonic() + seconds
    while (busy := clients_of(port)) and time.monotonic() < deadline:
        time.sleep(0.05)  # a client that just left is closed by QEMU within milliseconds
    return busy


class GdbStub:
    """One connection to a gdbstub; connecting pauses the VM (QEMU), `detach` resumes it."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        """Connect and wait for the VM to be stopped (pauses the VM)."""
        self.where = f"{host}:{port}"
        self.timeout = timeout
        self.running = False
        self.packets = 0
        self._buf = b""
        self._layout: dict[str, tuple[int, int]] | None = None
        if host in ("127.0.0.1", "localhost", "::1") and _wait_idle(port, 1.0):
            # a queued connection is fatal: when QEMU later accepts it, it pauses the VM, and if we are
            # gone by then nobody resumes it. So never queue behind another debugger.
            raise ConnectorError(f"another debugger is attached to the gdbstub at {self.where} (or its connection "
                                 "is still closing); QEMU serves one at a time — try again when it has left")
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ConnectorError(f"cannot connect to the gdbstub at {self.where}: {exc}; is the VM running "
                                 "with -gdb, and is no other debugger attached?") from exc
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._drain(0.2)  # QEMU announces the attach-pause unasked (sometimes after an empty packet)
            try:
                self.stop_reason = parse_stop(self.command("?"))
            except ConnectorError as exc:
                raise ConnectorError(f"{exc}; QEMU serves one debugger at a time: is another one attached?") from exc
            # reading the target description is what makes QEMU answer `p`/`P` (single registers)
            self.command("qXfer:features:read:target.xml:0,ffb")
        except BaseException:
            self._sock.close()
            raise

    # --- framing -------------------------------------------------------------------------------

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self._sock.settimeout(remaining)
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError:
            raise  # the caller decides whether silence is an error
        except OSError as exc:
            raise ConnectorError(f"gdbstub connection {self.where} failed: {exc}") from exc
        if not chunk:
            raise ConnectorError(f"gdbstub at {self.where} closed the connection")
        self._buf += chunk
        if len(self._buf) > MAX_PACKET:
            raise ConnectorError(f"gdbstub at {self.where} sent over {MAX_PACKET} bytes without a packet end")

    def _recv_packet(self, deadline: float) -> bytes:
        """Return the next packet body with a good checksum (acking it); nak and skip corrupt ones."""
        while True:
            start = self._buf.find(b"$")
            if start < 0:
                self._buf = b""  # acks ('+') and noise before a packet carry nothing we need
                self._fill(deadline)
                continue
            end = self._buf.find(b"#", start)
            if end < 0 or len(self._buf) < end + 3:
                self._fill(deadline)
                continue
            body, cs_text = self._buf[start + 1:end], self._buf[end + 1:end + 3]
            self._buf = self._buf[end + 3:]
            try:
                good = int(cs_text, 16) == checksum(body)
            except ValueError:
                good = False
            self._sock.sendall(b"+" if good else b"-")
            if good:
                self.packets += 1
                return decode_body(body)

    def _send(self, payload: bytes) -> None:
        if self.running:
            raise ConnectorError("the VM is running: interrupt it before sending commands (bytes would pause it)")
        try:
            self._sock.sendall(frame(payload))
        except OSError as exc:
            raise ConnectorError(f"gdbstub connection {self.where} failed: {exc}") from exc

    def _drain(self, seconds: float) -> None:
        """Discard packets (acking them) until a non-empty one arrives or `seconds` pass, then stragglers."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(TimeoutError):
            while not self._recv_packet(deadline):
                pass
        deadline = time.monotonic() + 0.02  # e.g. a retransmission we asked for with a nak
        with contextlib.suppress(TimeoutError):
            while True:
                self._recv_packet(deadline)

    def command(self, payload: str | bytes, timeout: float | None = None) -> str:
        """Send one packet and return the reply body as text (VM must be stopped)."""
        data = payload.encode() if isinstance(payload, str) else payload
        self._send(data)
        deadline = time.monotonic() + (timeout or self.timeout)
        try:
            return self._recv_packet(deadline).decode("latin-1")
        except TimeoutError:
            raise ConnectorError(f"gdbstub at {self.where} did not answer {data[:20]!r} within "
                                 f"{timeout or self.timeout:.1f}s") from None

    def _ok(self, payload: str, what: str) -> None:
        reply = self.command(payload)
        if reply != "OK":
            raise ConnectorError(f"gdbstub refused {what} ({payload[:40]!r} → {reply[:40]!r})")

    # --- registers and memory (VM stopped) ------------------------------------------------------

    def read_registers(self) -> bytes:
        """Return the raw `g` register block of the current thread (VM stopped)."""
        reply = self.command("g")
        if not reply or len(reply) % 2 or not _HEX.match(reply.encode()):
            raise ConnectorError(f"gdbstub sent a malformed register block ({reply[:40]!r})")
        return bytes.fromhex(reply)

    def registers(self) -> dict[str, int]:
        """Return the current thread's registers by name (rip, rdi, gs_base, cr3, ...) (VM stopped)."""
        raw = self.read_registers()
        layout = self._layout_for(len(raw))
        return {name: int.from_bytes(raw[off:off + size], "little") for name, (off, size) in layout.items()
                if size <= 8}

    def _layout_for(self, size: int) -> dict[str, tuple[int, int]]:
        if self._layout is None:
            offset, layout = 0, {}
            for name, width in QEMU72_LAYOUT:
                layout[name] = (offset, width)
                offset += width
            if size != offset:  # not QEMU 7.2: trust only the GPRs, rip and eflags, which never moved
                layout = {k: v for k, v in layout.items() if v[0] + v[1] <= 8 * 17 + 4}
            self._layout = layout
        return self._layout

    def write_register(self, name: str, value: int) -> None:
        """Set one register (e.g. rip) of the current thread with `P` (VM stopped)."""
        layout = self._layout or self._layout_for(len(self.read_registers()))
        if name not in layout:
            raise ConnectorError(f"register {name!r} is not known for this gdbstub")
        regnum = list(layout).index(name)
        size = layout[name][1]
        self._ok(f"P{regnum:x}={(value & ((1 << 8 * size) - 1)).to_bytes(size, 'little').hex()}",
                 f"writing {name}")

    def read_memory(self, gva: int, size: int) -> bytes:
        """Return `size` bytes at guest-virtual `gva` as the current vCPU sees it (VM stopped)."""
        if not 0 < size <= 4096:
            raise ConnectorError(f"refusing a {size}-byte gdbstub memory read (1..4096)")
        reply = self.command(f"m{gva:x},{size:x}")
        if reply.startswith("E") or len(reply) != 2 * size or not _HEX.match(reply.encode()):
            raise ConnectorError(f"gdbstub cannot read {size} bytes at 0x{gva:x}: {reply[:20]!r}")
        return bytes.fromhex(reply)

    def write_memory(self, gva: int, data: bytes) -> None:
        """Write `data` at guest-virtual `gva` (VM stopped)."""
        self._ok(f"M{gva:x},{len(data):x}:{data.hex()}", f"a write at 0x{gva:x}")

    # --- breakpoints and execution --------------------------------------------------------------

    def insert_breakpoint(self, gva: int, hardware: bool = False) -> None:
        """Insert a breakpoint at guest-virtual `gva` (QEMU TCG: guest memory is not modified) (VM stopped)."""
        self._ok(f"Z{1 if hardware else 0},{gva:x},1", f"a breakpoint at 0x{gva:x}")

    def remove_breakpoint(self, gva: int, hardware: bool = False) -> None:
        """Remove the breakpoint at guest-virtual `gva` (VM stopped)."""
        self._ok(f"z{1 if hardware else 0},{gva:x},1", f"removing the breakpoint at 0x{gva:x}")

    def cont(self) -> None:
        """Resume the VM without waiting (use `wait_stop` for the next stop)."""
        self._send(b"c")
        self.running = True

    def step(self, timeout: float | None = None) -> StopReply:
        """Single-step the current vCPU (others run meanwhile) and return the stop reply."""
        self._send(b"s")
        self.running = True
        reply = self.wait_stop(timeout or self.timeout)
        if reply is None:
            raise ConnectorError(f"single-step on {self.where} did not stop within {timeout or self.timeout:.1f}s")
        return reply

    def wait_stop(self, timeout: float) -> StopReply | None:
        """Return the next stop reply, or None if the VM is still running after `timeout` seconds."""
        try:
            body = self._recv_packet(time.monotonic() + timeout)
        except TimeoutError:
            return None
        while not body:  # QEMU sometimes sends an empty packet before the stop reply
            body = self._recv_packet(time.monotonic() + self.timeout)
        self.running = False
        return parse_stop(body.decode("latin-1"))

    def interrupt(self, timeout: float | None = None) -> StopReply:
        """Stop a running VM with Ctrl-C (0x03) and return the stop reply (pauses the VM)."""
        if not self.running:
            raise ConnectorError("interrupt: the VM is not running under this connection")
        self._sock.sendall(INTERRUPT)
        reply = self.wait_stop(timeout or self.timeout)
        if reply is None:
            raise ConnectorError(f"the gdbstub at {self.where} did not stop the VM after Ctrl-C")
        return reply

    def detach(self) -> None:
        """Stop if needed, then detach: QEMU removes every breakpoint and resumes the VM."""
        if self.running:
            self.interrupt()
        self._ok("D", "detach")

    def close(self) -> None:
        """Close the connection without detaching (QEMU keeps breakpoints; prefer `detach`)."""
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> GdbStub:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.detach()
        except ConnectorError:
            pass
        finally:
            self.close()


def repair(host: str, port: int, attempts: int = 50, timeout: float = 5.0) -> bool:
    """Reconnect and detach: remove every breakpoint and resume the VM; return whether it worked."""
    for _ in range(attempts):
        try:
            stub = GdbStub(host, port, timeout)
        except ConnectorError:
            time.sleep(0.1)  # QEMU accepts a new client only once it noticed the old one left
            continue
        try:
            stub.detach()
            return True
        except ConnectorError:
            continue
        finally:
            stub.close()
    return False


def start_stub(vm: VmTarget, host: str = "127.0.0.1") -> int:
    """Start a gdbstub for `vm` through its monitor (HMP `gdbserver tcp:HOST:PORT`, a free port); return the port.

    Does not pause the VM (a gdb client connecting does)."""
    from nephoscope.hypervisor.monitor import open_monitor

    with socket.socket() as s:
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    with open_monitor(vm) as monitor:
        reply = monitor.hmp(f"gdbserver tcp:{host}:{port}")
    if "waiting for gdb connection" not in reply.lower():
        raise ConnectorError(f"{vm.name}: could not start a gdbstub through the monitor: {reply.strip() or 'no reply'}")
    return port


def remove_stub(vm: VmTarget) -> bool:
    """Remove `vm`'s gdbstub through its monitor (HMP `gdbserver none`); return whether the monitor agreed."""
    from nephoscope.hypervisor.monitor import open_monitor

    try:
        with open_monitor(vm, timeout=5) as monitor:
            reply = monitor.hmp("gdbserver none")
    except ConnectorError:
        return False
    return "disabled" in reply.lower() or not reply.strip()


def _vm_json(vm: VmTarget) -> str:
    return json.dumps({"name": vm.name, "qmp_socket": str(vm.qmp_socket) if vm.qmp_socket else None,
                       "domain": vm.domain, "libvirt_uri": vm.libvirt_uri})


def _vm_from_json(text: str) -> VmTarget:
    d = json.loads(text)
    from pathlib import Path

    return VmTarget(name=d["name"], qmp_socket=Path(d["qmp_socket"]) if d["qmp_socket"] else None,
                    domain=d["domain"], libvirt_uri=d["libvirt_uri"])


class Guard:
    """A helper process that repairs the gdbstub (detach: no breakpoints, VM running) if we die.

    With `remove` (a VM whose gdbstub was started on demand) it also removes the stub unless told it was."""

    def __init__(self, host: str, port: int, remove: VmTarget | None = None) -> None:
        argv = [sys.executable, "-m", "nephoscope.hypervisor.gdbstub", host, str(port)]
        if remove is not None:
            argv.append(_vm_json(remove))
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)

    def release(self, detached: bool = True, removed: bool = True) -> None:
        """Let the guard go: it exits if we `detached` (and `removed` an on-demand stub), else it repairs first."""
        with contextlib.suppress(OSError):
            assert self._proc.stdin is not None
            said = (b"detached\n" if detached else b"") + (b"removed\n" if removed else b"")
            if said:
                self._proc.stdin.write(said)
            self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5 if detached and removed else 30)


def _guard_main(host: str, port: int, remove: str | None = None) -> int:
    """Block until the parent closes stdin; repair the gdbstub unless it detached, remove an on-demand one."""
    said = sys.stdin.buffer.read()  # EOF when the parent exits, however it dies
    ok = b"detached" in said or repair(host, port)
    if remove is not None and b"removed" not in said:
        ok = remove_stub(_vm_from_json(remove)) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(_guard_main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None))
