"""The gdb remote-protocol client against a fake QEMU gdbstub: framing, acks, escapes, stops, timeouts."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from nephoscope.core.errors import ConnectorError
from nephoscope.hypervisor.gdbstub import (
    QEMU72_LAYOUT,
    GdbStub,
    Guard,
    checksum,
    clients_of,
    decode_body,
    escape,
    frame,
    parse_stop,
    repair,
)

REGS = bytearray(sum(w for _, w in QEMU72_LAYOUT))
REGS[16 * 8:17 * 8] = (0xFFFFFFFF81000000).to_bytes(8, "little")  # rip
REGS[5 * 8:6 * 8] = (0x1234).to_bytes(8, "little")  # rdi
REGS[172:180] = (0xFFFF888000000000).to_bytes(8, "little")  # gs_base in QEMU 7.2's `g` block


class FakeStub(threading.Thread):
    """A gdbstub that behaves like QEMU 7.2 (attach stop, acks, breakpoints, continue, Ctrl-C, detach)."""

    def __init__(self, *, corrupt_first: bool = False, silent: bool = False, stop_after: float | None = None) -> None:
        super().__init__(daemon=True)
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.port = self.server.getsockname()[1]
        self.corrupt_first, self.silent, self.stop_after = corrupt_first, silent, stop_after
        self.received: list[bytes] = []
        self.naks = 0
        self.breakpoints: set[int] = set()
        self.connections = 0
        self.start()

    def send(self, conn: socket.socket, body: bytes) -> None:
        with contextlib.suppress(OSError):  # the client may be gone (a simulated crash)
            conn.sendall(frame(body))

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as QEMU: no Nagle delay on replies
            with conn:  # closed when the client leaves, as QEMU does
                self.serve(conn)

    def serve(self, conn: socket.socket) -> None:
        if self.corrupt_first:
            conn.sendall(b"$T02thread:01;#00")  # bad checksum: the client must nak it
        conn.sendall(b"$#00")  # QEMU's stray empty packet after attach
        self.send(conn, b"T02thread:01;")
        buf = b""
        running = False
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            buf += data
            while buf:
                if buf[:1] == b"-":
                    self.naks += 1
                    self.send(conn, b"T02thread:01;")
                    buf = buf[1:]
                    continue
                if buf[:1] == b"+":
                    buf = buf[1:]
                    continue
                if buf[:1] == b"\x03":
                    buf = buf[1:]
                    if running:
                        running = False
                        self.send(conn, b"T02thread:01;")
                    continue
                end = buf.find(b"#")
                if buf[:1] != b"$" or end < 0 or len(buf) < end + 3:
                    break
                body = buf[1:end]
                assert int(buf[end + 1:end + 3], 16) == checksum(body)
                buf = buf[end + 3:]
                conn.sendall(b"+")
                self.received.append(body)
                if self.silent:
                    continue
                running = self.reply(conn, body)

    def reply(self, conn: socket.socket, body: bytes) -> bool:
        """Answer one command; return whether the VM now runs."""
        cmd = body.decode()
        if cmd == "?":
            self.send(conn, b"T05thread:01;")
        elif cmd.startswith("qXfer"):
            self.send(conn, b"l<target/>")
        elif cmd == "g":
            self.send(conn, REGS.hex().encode())
        elif cmd.startswith("m"):
            addr, size = (int(x, 16) for x in cmd[1:].split(","))
            data = bytes((addr + i) & 0xFF for i in range(size))
            self.send(conn, data[:size].hex().encode())
        elif cmd[:2] in ("Z0", "z0"):
            addr = int(cmd.split(",")[1], 16)
            (self.breakpoints.add if cmd[0] == "Z" else self.breakpoints.discard)(addr)
            self.send(conn, b"OK")
        elif cmd.startswith(("P", "M")):
            self.send(conn, b"OK")
        elif cmd == "D":
            self.breakpoints.clear()
            self.send(conn, b"OK")
        elif cmd in ("c", "s"):
            if cmd == "s" or (self.stop_after is not None and self.breakpoints):  # c: stop only at a breakpoint
                delay = 0.0 if cmd == "s" else self.stop_after
                threading.Timer(delay or 0.0, lambda: self.send(conn, b"T05thread:01;")).start()
            return True
        else:
            self.send(conn, b"")
        return False

    def close(self) -> None:
        self.server.close()


def test_framing_checksum_and_escapes() -> None:
    assert checksum(b"g") == 0x67
    assert frame(b"g") == b"$g#67"
    assert frame(b"") == b"$#00"
    raw = b"a#b$c}d*e"
    assert escape(raw) == b"a}\x03b}\x04c}]d}\ne"
    assert decode_body(escape(raw)) == raw


def test_run_length_decoding() -> None:
    assert decode_body(b"0* ") == b"0000"  # ' ' is 32: the previous byte 3 more times
    assert decode_body(b"ab*!c") == b"abbbbbc"  # "!" is 33: four more
    assert decode_body(b"*x") == b"*x"  # nothing to repeat: taken literally


def test_parse_stop_replies() -> None:
    stop = parse_stop("T05thread:02;swbreak:;")
    assert (stop.signal, stop.thread, stop.exited) == (5, "02", False)
    assert parse_stop("S02").signal == 2
    assert parse_stop("W00").exited
    for bad in ("OK", "", "Tzz", "E01"):
        with pytest.raises(ConnectorError):
            parse_stop(bad)


def test_attach_registers_memory_breakpoints_and_detach() -> None:
    fake = FakeStub()
    try:
        stub = GdbStub("127.0.0.1", fake.port, timeout=2)
        assert stub.stop_reason.signal == 5
        regs = stub.registers()
        assert regs["rip"] == 0xFFFFFFFF81000000 and regs["rdi"] == 0x1234
        assert regs["gs_base"] == 0xFFFF888000000000
        assert stub.read_memory(0x1000, 4) == bytes([0, 1, 2, 3])
        stub.insert_breakpoint(0xFFFFFFFF81000010)
        assert fake.breakpoints == {0xFFFFFFFF81000010}
        stub.write_register("rip", 0xFFFFFFFF81000015)
        assert fake.received[-1] == b"P10=15000081ffffffff"
        stub.remove_breakpoint(0xFFFFFFFF81000010)
        stub.insert_breakpoint(0xFFFFFFFF81000020)
        stub.cont()
        with pytest.raises(ConnectorError, match="running"):
            stub.registers()  # any byte would pause QEMU: refused while running
        assert stub.interrupt().signal == 2
        stub.detach()
        assert fake.breakpoints == set() and fake.received[-1] == b"D"
        stub.close()
    finally:
        fake.close()


def test_nak_retransmission_and_stray_packets() -> None:
    fake = FakeStub(corrupt_first=True)
    try:
        stub = GdbStub("127.0.0.1", fake.port, timeout=2)
        assert fake.naks == 1
        assert stub.stop_reason.signal == 5
        stub.close()
    finally:
        fake.close()


def test_continue_until_breakpoint_then_step() -> None:
    fake = FakeStub(stop_after=0.05)
    try:
        stub = GdbStub("127.0.0.1", fake.port, timeout=2)
        stub.insert_breakpoint(0xFFFFFFFF81000000)
        stub.cont()
        assert stub.wait_stop(0.01) is None  # still running
        stop = stub.wait_stop(2)
        assert stop is not None and stop.signal == 5 and not stub.running
        assert stub.step().signal == 5
        stub.detach()
        stub.close()
    finally:
        fake.close()


def test_silent_stub_times_out_with_a_clear_error() -> None:
    fake = FakeStub(silent=True)
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectorError, match="did not answer"):
            GdbStub("127.0.0.1", fake.port, timeout=0.3)
        assert time.monotonic() - t0 < 2
    finally:
        fake.close()


def test_refused_connection_says_what_to_check() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectorError, match="gdbstub"):
        GdbStub("127.0.0.1", port, timeout=0.5)


def test_never_queues_behind_another_debugger() -> None:
    fake = FakeStub()
    try:
        first = GdbStub("127.0.0.1", fake.port, timeout=2)
        assert clients_of(fake.port) >= 1
        t0 = time.monotonic()
        with pytest.raises(ConnectorError, match="another debugger"):
            GdbStub("127.0.0.1", fake.port, timeout=2)  # QEMU would pause the VM when it accepted this later
        assert time.monotonic() - t0 < 3 and fake.connections == 1
        first.detach()
        first.close()
        second = GdbStub("127.0.0.1", fake.port, timeout=2)  # the first one's socket is gone: fine now
        second.detach()
        second.close()
    finally:
        fake.close()


def test_memory_read_bounds() -> None:
    fake = FakeStub()
    try:
        stub = GdbStub("127.0.0.1", fake.port, timeout=2)
        with pytest.raises(ConnectorError, match="refusing"):
            stub.read_memory(0, 1 << 20)
        stub.detach()
        stub.close()
    finally:
        fake.close()


def test_repair_reconnects_and_detaches() -> None:
    fake = FakeStub()
    try:
        stub = GdbStub("127.0.0.1", fake.port, timeout=2)
        stub.insert_breakpoint(0x1000)
        stub.cont()
        stub.close()  # a crash: connection gone, breakpoint left behind
        assert repair("127.0.0.1", fake.port, attempts=20, timeout=2)
        assert fake.breakpoints == set() and fake.connections == 2
    finally:
        fake.close()


def test_guard_repairs_unless_told_we_detached() -> None:
    fake = FakeStub()
    try:
        guard = Guard("127.0.0.1", fake.port)
        stub = GdbStub("127.0.0.1", fake.port, timeout=2)
        stub.insert_breakpoint(0x2000)
        stub.cont()
        stub.close()  # as if we crashed: the guard's pipe closes without "detached"
        guard.release(detached=False)
        assert fake.breakpoints == set() and fake.connections == 2 and fake.received[-1] == b"D"
        clean = Guard("127.0.0.1", fake.port)
        clean.release(detached=True)
        assert fake.connections == 2  # told we detached: no reconnect
    finally:
        fake.close()
