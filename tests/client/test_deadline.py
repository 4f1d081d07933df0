"""A total deadline per attempt and a capped answer (issue 15): an answer that drips
one byte at a time, in its status line or its body, ends the attempt at connect +
read timeout; an answer that never ends is cut at MAX_ANSWER and its connection
closed, never reused."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from flask_mmolove.client import MAX_ANSWER, ReferralClient, TransportError

ACCEPTED = b'{"ok":true,"event":"registered"}'
OK = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(ACCEPTED), ACCEPTED)
#: connect + read: the attempt's deadline.
TIMEOUT = (0.5, 1.0)
DEADLINE = sum(TIMEOUT)
#: The watchdog's tick plus scheduling on a busy machine.
SLACK = 0.5


def _drip(conn: socket.socket, data: bytes, every: float = 0.1) -> None:
    for byte in data:
        conn.sendall(bytes([byte]))
        time.sleep(every)


def _drip_status(conn: socket.socket) -> None:
    _drip(conn, OK * 10)


def _drip_body(conn: socket.socket) -> None:
    # Close-delimited: what arrives before the deadline could pass for a whole body.
    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    _drip(conn, b" " * 1000 + ACCEPTED)


def _drip_body_with_length(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    _drip(conn, b" " * 1000)


def _endless_chunked(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    while True:
        conn.sendall(b"4000\r\n" + b"x" * 0x4000 + b"\r\n")


def _endless_close_delimited(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    while True:
        conn.sendall(b"x" * 0x4000)


def _huge_length(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n")
    while True:
        conn.sendall(b"x" * 0x4000)


@contextlib.contextmanager
def server(answer: Callable[[socket.socket], None]) -> Iterator[tuple[str, list[int]]]:
    """Answers each request with ``answer``; yields the endpoint and one entry per
    connection accepted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    connections: list[int] = []
    stop = threading.Event()

    def handle(conn: socket.socket, index: int) -> None:
        with conn:
            try:
                while not stop.is_set():
                    if not conn.recv(65536):
                        return
                    connections[index] += 1
                    answer(conn)
            except OSError:
                return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            connections.append(0)
            threading.Thread(target=handle, args=(conn, len(connections) - 1), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/api/referral/events", connections
    finally:
        stop.set()
        thread.join()
        listener.close()


def _send(client: ReferralClient) -> None:
    client.registered("tok", referee_identity="p1", server_event_id="reg-p1")


@pytest.mark.parametrize("answer", [_drip_status, _drip_body, _drip_body_with_length])
def test_a_dripping_answer_ends_at_the_deadline(answer: Callable[[socket.socket], None]) -> None:
    with (
        server(answer) as (endpoint, _),
        ReferralClient("srv", "x", endpoint, timeout=TIMEOUT) as c,
    ):
        started = time.monotonic()
        with pytest.raises(TransportError, match=r"took longer than 1\.5 s"):
            _send(c)
        took = time.monotonic() - started
    assert DEADLINE - 0.1 <= took <= DEADLINE + SLACK


@pytest.mark.parametrize("answer", [_endless_chunked, _endless_close_delimited, _huge_length])
def test_an_endless_answer_is_cut_and_its_connection_closed(
    answer: Callable[[socket.socket], None],
) -> None:
    with server(answer) as (endpoint, connections):
        with ReferralClient("srv", "x", endpoint, timeout=TIMEOUT) as client:
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(TransportError, match=str(MAX_ANSWER)):
                    _send(client)
                assert time.monotonic() - started < DEADLINE
        # Each attempt on a connection of its own: the cut one was not reused.
        assert len(connections) == 2


def test_an_answer_within_the_cap_keeps_its_connection() -> None:
    ok = server(lambda conn: conn.sendall(OK))
    with ok as (endpoint, connections), ReferralClient("srv", "x", endpoint, timeout=TIMEOUT) as c:
        for _ in range(3):
            result = c.registered("tok", referee_identity="p", server_event_id="r")
            assert result.status == 200
            assert result.body == ACCEPTED.decode()
    assert len(connections) == 1


def test_the_deadline_holds_on_a_session_with_another_adapter() -> None:
    """An adapter that is no HTTPAdapter (nothing armed at the first byte): the body
    of its urllib3 answer is still bounded by the deadline, once its headers are in,
    when the connection is kept (a close-delimited body is not: its socket is no
    longer the connection's)."""

    class Wrapping(requests.adapters.BaseAdapter):
        def __init__(self) -> None:
            super().__init__()
            self.inner = requests.adapters.HTTPAdapter()

        def send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:
            return self.inner.send(request, **kwargs)  # type: ignore[arg-type]

        def close(self) -> None:
            self.inner.close()

    session = requests.Session()
    session.mount("http://", Wrapping())
    with server(_drip_body_with_length) as (endpoint, _):
        client = ReferralClient("srv", "x", endpoint, timeout=TIMEOUT, session=session)
        started = time.monotonic()
        with pytest.raises(TransportError, match="took longer"):
            _send(client)
        assert time.monotonic() - started <= DEADLINE + SLACK
        client.close()
