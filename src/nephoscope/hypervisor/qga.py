"""A client for the QEMU guest agent protocol, over a channel: the virtio-serial chardev socket, or libvirt.

`GuestAgent` speaks the commands (exec, file reads) and talks to the agent through an `AgentChannel`:
`SocketChannel` for a chardev socket QEMU serves, `nephoscope.hypervisor.libvirt.LibvirtAgentChannel` for a
libvirt domain (libvirtd holds the agent socket itself). `open_agent(vm)` picks the one a VM offers.
Nothing here pauses the VM.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from nephoscope.core.errors import ConnectorError

if TYPE_CHECKING:
    from nephoscope.hypervisor.target import VmTarget

MAX_REPLY = 64 * 2**20  # a lying agent must not make us buffer without bound


def parse_reply(raw: bytes | str, name: str) -> dict[str, Any]:
    """Return one guest-agent JSON reply as a dict; ConnectorError for invalid JSON, a non-object or an error reply."""
    try:
        reply = json.loads(raw)
    except ValueError as exc:
        raise ConnectorError(f"guest agent sent invalid JSON: {raw[:200]!r}") from exc
    if not isinstance(reply, dict):
        raise ConnectorError("guest agent sent a non-object reply")
    if "error" in reply:
        raise ConnectorError(f"guest agent {name} failed: {reply['error']}")
    return reply


class AgentChannel(Protocol):
    """One way to send guest agent commands; `call` returns the `return` value or raises ConnectorError."""

    timeout: float

    def call(self, name: str, **args: Any) -> Any: ...

    def close(self) -> None: ...


class SocketChannel:
    """The agent's virtio-serial chardev socket (QEMU serves it); synchronises on connect."""

    def __init__(self, socket_path: str | Path, timeout: float = 10.0) -> None:
        self.path = str(socket_path)
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buf = b""
        try:
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise ConnectorError(f"cannot connect to the guest agent socket {self.path}: {exc}") from exc
        self._sync()

    def _read_line(self, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectorError(f"guest agent at {self.path} did not answer within {self.timeout:.0f}s")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise ConnectorError(f"guest agent at {self.path} did not answer within {self.timeout:.0f}s") from exc
            except OSError as exc:
                raise ConnectorError(f"guest agent connection failed: {exc}") from exc
            if not chunk:
                raise ConnectorError("guest agent closed the connection")
            self._buf += chunk
            if len(self._buf) > MAX_REPLY:
                raise ConnectorError("guest agent reply exceeds 64 MiB; refusing it")
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _sync(self) -> None:
        # guest-sync-delimited: the agent answers with 0xFF then the id; anything before is stale
        token = random.randrange(1, 2**31)
        self._sock.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited",
                                                  "arguments": {"id": token}}).encode())
        deadline = time.monotonic() + self.timeout
        while True:
            line = self._read_line(deadline)
            line = line[line.rfind(b"\xff") + 1:] if b"\xff" in line else line
            try:
                if json.loads(line).get("return") == token:
                    return
            except (ValueError, AttributeError):
                continue

    def call(self, name: str, **args: Any) -> Any:
        """Run one agent command and return its `return` value."""
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise ConnectorError(f"guest agent write failed: {exc}") from exc
        deadline = time.monotonic() + self.timeout
        while True:
            line = self._read_line(deadline).strip(b"\xff \r")
            if not line:
                continue
            reply = parse_reply(line, name)
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        """Close the connection (the agent keeps running)."""
        self._sock.close()


class GuestAgent:
    """A session with qemu-guest-agent over a channel (a socket path opens a SocketChannel); calls time out."""

    def __init__(self, channel: AgentChannel | str | Path, timeout: float = 10.0) -> None:
        self.channel: AgentChannel = (SocketChannel(channel, timeout=timeout) if isinstance(channel, str | Path)
                                      else channel)

    @property
    def timeout(self) -> float:
        return self.channel.timeout

    def call(self, name: str, **args: Any) -> Any:
        """Run one agent command and return its `return` value."""
        return self.channel.call(name, **args)

    def exec(self, argv: list[str], timeout: float | None = None) -> tuple[int, bytes, bytes]:
        """Run argv in the guest via guest-exec; return (exit code, stdout, stderr)."""
        started = self.call("guest-exec", path=argv[0], arg=argv[1:], **{"capture-output": True})
        pid = started["pid"]
        deadline = time.monotonic() + (timeout or self.channel.timeout)
        while time.monotonic() < deadline:
            status = self.call("guest-exec-status", pid=pid)
            if status.get("exited"):
                out = base64.b64decode(status.get("out-data", ""))
                err = base64.b64decode(status.get("err-data", ""))
                return int(status.get("exitcode", -1)), out, err
            time.sleep(0.05)
        raise ConnectorError(f"guest command {argv[0]} did not finish within {timeout or self.channel.timeout:.0f}s")

    def read_file(self, path: str, limit: int = 16 * 2**20) -> bytes:
        """Read a guest file through guest-file-open/read (at most `limit` bytes)."""
        handle = self.call("guest-file-open", path=path, mode="r")
        data = b""
        try:
            while len(data) < limit:
                chunk = self.call("guest-file-read", handle=handle, count=65536)
                data += base64.b64decode(chunk.get("buf-b64", ""))
                if chunk.get("eof") or not chunk.get("count"):
                    break
        finally:
            self.call("guest-file-close", handle=handle)
        return data[:limit]

    def close(self) -> None:
        """Close the connection (the agent keeps running)."""
        self.channel.close()

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def has_agent(vm: VmTarget) -> bool:
    """Return whether `vm` names an agent channel (a chardev socket or a libvirt domain)."""
    return vm.live and (vm.qga_socket is not None or vm.domain is not None)


def open_agent(vm: VmTarget, timeout: float = 10.0) -> GuestAgent:
    """Return a session with `vm`'s guest agent: through libvirt for libvirt domains, else its chardev socket."""
    if vm.domain is not None:
        from nephoscope.hypervisor.libvirt import LibvirtAgentChannel  # libvirt-python only where libvirt is used

        return GuestAgent(LibvirtAgentChannel(vm.domain, vm.libvirt_uri, timeout=timeout))
    if vm.qga_socket is None:
        raise ConnectorError(f"{vm.name}: no guest agent channel (neither a chardev socket nor a libvirt domain)")
    return GuestAgent(vm.qga_socket, timeout=timeout)
