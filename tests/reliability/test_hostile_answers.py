"""Hostile answers against a real ``flask mmolove worker`` (issue 15, proof 4).

A server on 127.0.0.1 plays MMOLove badly, chosen by each event's token: it drips its
answer one byte a second, sends a body without end, or never answers; a fourth event
is answered at once. With ``MMOLOVE_CONNECT_TIMEOUT`` 1 s and ``MMOLOVE_READ_TIMEOUT``
2 s: every attempt ends within its deadline (+1 s), the answer received at once is
recorded in the same pass, the worker's memory stays flat, and after SIGTERM in the
middle of a send the worker exits within the deadline (+1 s) and hands its unsent
claims back.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from reliability_support import open_outbox, process_env, record_figures, start_worker, stop_process
from support import wait_for

from flask_mmolove.protocol import build_body

CONNECT, READ = 1.0, 2.0
DEADLINE = CONNECT + READ
ACCEPTED = b'{"ok":true,"referral_id":"ref_1","state":"registered"}'


class HostileServer:
    """Answers by the token in the body: ``drip-*``, ``endless-*``, ``silent-*``, else
    at once. Records when each request arrived and when its connection ended."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.attempts: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/referral/events"

    def start(self) -> HostileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            while not self._stop.is_set():
                started = time.monotonic()
                token = self._read_request(conn)
                if token is None:
                    return
                kind = token.split("-", 1)[0]
                try:
                    self._answer(conn, kind)
                    ended = time.monotonic()
                except OSError:
                    ended = time.monotonic()
                    with self._lock:
                        self.attempts.append((kind, started, ended))
                    return
                with self._lock:
                    self.attempts.append((kind, started, ended))
                if kind != "fast":
                    return

    @staticmethod
    def _read_request(conn: socket.socket) -> str | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while len(body) < length:
            body += conn.recv(65536)
        return str(json.loads(body)["token"])

    def _answer(self, conn: socket.socket, kind: str) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        if kind == "fast":
            conn.sendall(head + b"Content-Length: %d\r\n\r\n" % len(ACCEPTED) + ACCEPTED)
        elif kind == "drip":
            conn.sendall(head + b"Content-Length: %d\r\n\r\n" % len(ACCEPTED))
            for byte in ACCEPTED:
                conn.sendall(bytes([byte]))
                # A second between bytes, watching for the client to hang up: its end
                # is timed when it happens, not at the next byte.
                readable, _, _ = select.select([conn], [], [], 1.0)
                if readable and not conn.recv(1):
                    raise ConnectionResetError("the client hung up")
                if self._stop.is_set():
                    return
        elif kind == "endless":
            conn.sendall(head + b"Content-Length: 10000000000\r\n\r\n")
            block = b" " * 65536
            while not self._stop.is_set():
                conn.sendall(block)
        else:  # silent: the request is read, and nothing ever comes back
            self._stop.wait(60)


@contextmanager
def hostile() -> Iterator[HostileServer]:
    server = HostileServer().start()
    try:
        yield server
    finally:
        server.stop()


def _enqueue(outbox: Any, kind: str, n: int) -> None:
    token = f"{kind}-{n}"
    identity = f"{kind}{n}"
    outbox.bind_and_enqueue(
        identity=identity,
        token=token,
        event="registered",
        server_event_id=f"reg-{identity}",
        body=build_body(
            "registered",
            token=token,
            server_id="srv",
            server_event_id=f"reg-{identity}",
            referee_identity=identity,
        ),
    )


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _env(sandbox: Any, tmp_path: Path, server: HostileServer, uri: str) -> dict[str, str]:
    env = process_env(
        sandbox,
        tmp_path,
        MMOLOVE_DATABASE_URI=uri,
        MMOLOVE_CONNECT_TIMEOUT=CONNECT,
        MMOLOVE_READ_TIMEOUT=READ,
        MMOLOVE_LEASE=30.0,
        MMOLOVE_CONCURRENCY=4,
        MMOLOVE_RETRY_BASE=0.2,
        MMOLOVE_RETRY_CAP=0.5,
        MMOLOVE_POLL_INTERVAL=0.2,
    )
    env["MMOLOVE_ENDPOINT"] = server.endpoint
    env["MMOLOVE_SERVER_ID"] = "srv"
    return env


@pytest.mark.slow
def test_dripping_and_endless_answers_end_within_the_deadline_memory_flat(
    mmolove_sandbox: Any, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    outbox = open_outbox(uri)
    for kind in ("drip", "endless", "fast"):
        _enqueue(outbox, kind, 0)
    with hostile() as server:
        worker = start_worker(_env(mmolove_sandbox, tmp_path, server, uri), tmp_path)
        try:
            time.sleep(0.5)
            rss_start = _rss_mb(worker.pid)
            # A few rounds of retries of the hostile two.
            wait_for(
                lambda: sum(1 for k, _, _ in server.attempts if k != "fast") >= 6,
                40,
                "three attempts at each hostile answer",
            )
            rss_end = _rss_mb(worker.pid)
            fast = [e for e in outbox.list_events() if e.token == "fast-0"]
        finally:
            output = stop_process(worker)
    assert fast[0].state == "delivered", output
    took = [ended - started for kind, started, ended in server.attempts if kind != "fast"]
    assert max(took) <= DEADLINE + 1.0, took
    assert rss_end - rss_start < 30, (rss_start, rss_end)
    record_figures(
        "15.4 hostile answers",
        attempts=len(took),
        longest_attempt_s=max(took),
        deadline_s=DEADLINE,
        rss_start_mb=rss_start,
        rss_end_mb=rss_end,
    )


@pytest.mark.slow
def test_sigterm_mid_send_exits_within_the_deadline_and_hands_claims_back(
    mmolove_sandbox: Any, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    outbox = open_outbox(uri)
    for n in range(8):
        _enqueue(outbox, "silent", n)
    env = _env(mmolove_sandbox, tmp_path, hostile_server := HostileServer().start(), uri)
    try:
        worker = start_worker({**env, "PORTAL_MMOLOVE_CONCURRENCY": "2"}, tmp_path)
        try:
            wait_for(
                lambda: len(hostile_server.attempts) == 0 and outbox.stats().in_flight == 8,
                20,
                "the worker holding all 8, 2 of them mid-send",
            )
            time.sleep(0.5)
            worker.send_signal(signal.SIGTERM)
            sent_at = time.monotonic()
            worker.wait(DEADLINE + 5)
            exit_s = time.monotonic() - sent_at
        finally:
            output = stop_process(worker)
    finally:
        hostile_server.stop()
    assert worker.returncode == 0, output
    assert exit_s <= DEADLINE + 1.0, exit_s
    events = outbox.list_events(limit=20)
    # The 6 never sent are handed back, due at once; the 2 mid-send are retried.
    assert all(e.state == "pending" and e.lease_owner is None for e in events), [
        (e.state, e.lease_owner) for e in events
    ]
    due_now = [e for e in events if e.next_attempt_at <= time.time()]
    assert len(due_now) >= 6
    record_figures("15.4 SIGTERM mid-send", held=8, exit_s=exit_s, bound_s=DEADLINE + 1.0)
