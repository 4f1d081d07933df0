"""One HTTP attempt of a reward callback: the request, signed as MMOLove signs it, sent
over a connection stop() can cut.

:mod:`http.client` rather than requests: the attempt needs its socket in hand, so that
stopping the sandbox ends a request in flight at once instead of after its timeout.
It also follows no redirect, reads no proxy or ``.netrc`` from the environment, and
opens a fresh connection per attempt, as retries hours apart would.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

from ..protocol import EVENT_HEADER, SIGNATURE_HEADER, sign_heart_callback, sign_legacy_get
from .callback_values import CORE_FIELDS

#: How much of an answer's body the log keeps.
RESPONSE_EXCERPT: Final = 1000


@dataclass(frozen=True)
class CallbackRequest:
    method: str
    url: str
    headers: Mapping[str, str]
    #: The body sent (None for a GET).
    body: bytes | None
    #: The X-MMOLove-Signature, or None in legacy GET mode, which signs the query.
    signature: str | None
    #: What the log keeps as sent: the body, or the query string of a GET.
    logged: bytes


def post_request(url: str, secret: str, fields: Mapping[str, Any], t: int) -> CallbackRequest:
    """A signed POST of ``fields`` with ``timestamp`` = ``t``: compact JSON in MMOLove's
    order (the core fields, then ``streak_day`` and any others), UTF-8 as is."""
    payload = {name: fields[name] for name in CORE_FIELDS if name != "timestamp"}
    payload["timestamp"] = t
    payload.update({name: value for name, value in fields.items() if name not in payload})
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    signature = sign_heart_callback(secret, body, t)
    headers = {
        "Content-Type": "application/json",
        EVENT_HEADER: payload["event"],
        SIGNATURE_HEADER: signature,
    }
    return CallbackRequest("POST", url, headers, body, signature, body)


def legacy_request(url: str, secret: str, username: str, t: int) -> CallbackRequest:
    """The legacy mode's ``GET <url>?username=&ts=&sig=``, the URL's own query kept."""
    query = urlencode(sign_legacy_get(secret, username, t))
    full = f"{url}{'&' if urlsplit(url).query else '?'}{query}"
    return CallbackRequest("GET", full, {}, None, None, query.encode())


@dataclass(frozen=True)
class Answer:
    """What came back: a status (and the start of the body), or why nothing did."""

    status: int | None = None
    text: str | None = None
    location: str | None = None
    error: str | None = None


class CallbackConnections:
    """The connections of attempts in flight, each with the stop event of its sender's
    generation, so stop() cuts exactly those."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[http.client.HTTPConnection, threading.Event] = {}

    def add(self, connection: http.client.HTTPConnection, stopping: threading.Event) -> None:
        with self._lock:
            self._live[connection] = stopping

    def discard(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            self._live.pop(connection, None)

    def cut(self, stopping: threading.Event) -> None:
        """Shut down the sockets of the attempts ``stopping`` governs: a blocked read
        returns at once. Call after setting ``stopping``."""
        with self._lock:
            doomed = [conn for conn, event in self._live.items() if event is stopping]
        for conn in doomed:
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def describe(exc: BaseException) -> str:
    """A short name for a failed attempt, for the log."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, http.client.IncompleteRead)):
        # RemoteDisconnected is a ConnectionResetError: closed with no answer.
        return "disconnected"
    if isinstance(exc, ssl.SSLError):
        return f"tls: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"dns: {exc.strerror or exc}"
    if isinstance(exc, http.client.HTTPException):
        return f"bad answer: {type(exc).__name__}"
    if isinstance(exc, OSError):
        return f"error: {exc.strerror or exc}"
    return f"error: {type(exc).__name__}"


def send_once(
    connections: CallbackConnections,
    stopping: threading.Event,
    request: CallbackRequest,
    timeout: float,
) -> Answer:
    """Send ``request`` and read its answer, each socket operation bounded by
    ``timeout``; never raises for a network failure."""
    parts = urlsplit(request.url)
    host, port = parts.hostname or "", parts.port
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(host, port, timeout=timeout)
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connections.add(connection, stopping)
    try:
        connection.connect()
        if stopping.is_set():
            # stop() came while connecting, and may have missed this socket.
            return Answer(error="stopped")
        connection.request(request.method, target, body=request.body, headers=dict(request.headers))
        response = connection.getresponse()
        text = response.read(RESPONSE_EXCERPT).decode("utf-8", errors="replace")
        location = response.getheader("Location") if 300 <= response.status < 400 else None
        return Answer(status=response.status, text=text, location=location)
    except Exception as exc:
        # Whatever went wrong, it is a failed attempt to log and retry, never a crash.
        return Answer(error="stopped" if stopping.is_set() else describe(exc))
    finally:
        connections.discard(connection)
        connection.close()
