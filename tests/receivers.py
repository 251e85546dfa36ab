"""Real notice receivers for tests: an SMTP server (aiosmtpd) and an HTTP webhook receiver (http.server)."""

from __future__ import annotations

import email
import email.policy
import http.server
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any


def tenants_toml(box: Mailbox, hook: Hook, vm: str, secret: str) -> str:
    """Return a tenants file: the SMTP relay `box` and tenant `acme` owning `vm`, mailed and webhooked."""
    return f"""
[smtp]
host = "127.0.0.1"
port = {box.port}
sender = "nephoscope@provider.example"

[tenants.acme]
vms = ["{vm}"]
emails = ["secops@acme.example"]
webhook = "{hook.url}"
secret = "{secret}"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Mailbox:
    """Messages the SMTP server accepted (parsed), with their envelope recipients."""

    messages: list[EmailMessage] = field(default_factory=list)
    recipients: list[list[str]] = field(default_factory=list)
    port: int = 0


class _Handler:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        self.box.messages.append(msg)  # type: ignore[arg-type]
        self.box.recipients.append(list(envelope.rcpt_tos))
        return "250 OK"


@contextmanager
def smtp_server() -> Iterator[Mailbox]:
    """Run an aiosmtpd server on a free localhost port until the block ends."""
    from aiosmtpd.controller import Controller

    box = Mailbox(port=free_port())
    controller = Controller(_Handler(box), hostname="127.0.0.1", port=box.port)
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


@dataclass
class Hook:
    """Requests the webhook receiver got: (headers, body); it answers `status` (or fails the first `fail` ones)."""

    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    status: int = 200
    fail: int = 0
    url: str = ""


@contextmanager
def webhook_receiver(status: int = 200, fail: int = 0) -> Iterator[Hook]:
    """Run an HTTP server on a free localhost port that records every POST until the block ends."""
    hook = Hook(status=status, fail=fail)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            hook.requests.append(({k: v for k, v in self.headers.items()}, body))
            code = 503 if len(hook.requests) <= hook.fail else hook.status
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
