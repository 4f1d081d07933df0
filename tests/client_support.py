"""Helpers of the ReferralClient tests (tests/client/): the last request the sandbox saw,
a signature's ``t``, and a tiny recording HTTP server for what the sandbox does not show.

Nothing here patches requests: every request the client tests make crosses a real socket
on 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from flask_mmolove.protocol import parse_signature_header
from flask_mmolove.sandbox import LogRecord, SandboxServer

SandboxFactory = Callable[..., SandboxServer]


def last(sandbox: SandboxServer) -> LogRecord:
    events = sandbox.events
    assert events, "the sandbox received nothing"
    return events[-1]


def t_of(header: str | None) -> int:
    assert header is not None
    return parse_signature_header(header).t


# --- a tiny recording HTTP server, for what the sandbox does not show -------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int


@dataclass
class Tiny:
    """A threaded http.server on 127.0.0.1 that records requests and answers as told."""

    url: str
    seen: list[Seen] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return self.url + "/api/referral/events"


Answer = tuple[int, list[tuple[str, str]], bytes]


@contextmanager
def tiny_server(answer: Callable[[Seen, str], Answer]) -> Iterator[Tiny]:
    tiny = Tiny(url="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is visible

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            seen = Seen(
                method=self.command,
                path=self.path,
                headers={name.lower(): value for name, value in self.headers.items()},
                body=self.rfile.read(length),
                client_port=self.client_address[1],
            )
            tiny.seen.append(seen)
            status, headers, payload = answer(seen, tiny.url)
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)  # sent with the case given
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _handle

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tiny.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield tiny
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def ok_answer(seen: Seen, url: str) -> Answer:
    return 200, [("Content-Type", "application/json")], b'{"ok":true,"test":true}'


def closed_port() -> int:
    """A 127.0.0.1 port that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
