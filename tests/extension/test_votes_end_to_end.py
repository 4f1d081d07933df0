"""Votes end to end over real HTTP: the sandbox plays MMOLove (its sender, its retry
schedule a thousand times shorter) against the portal's endpoint served on 127.0.0.1.
Whatever MMOLove's retries do (an answer lost after the vote was kept, the same vote
twice at once, the database down for a while), each ``heart_id`` is granted once."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

from flask_mmolove import heart_counted
from flask_mmolove.sandbox import SandboxServer

SECRET = "e2e-callback-secret"


class DropFirstAnswers:
    """WSGI middleware: the first ``n`` callbacks are handled (the vote kept), then the
    connection is cut before the answer goes out, as a proxy or a network would."""

    def __init__(self, app: Flask, n: int) -> None:
        self.app = app
        self.left = n
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        body = self.app(environ, start_response)
        with self.lock:
            drop, self.left = self.left > 0, self.left - 1
        if drop:
            sock = environ.get("werkzeug.socket")
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        return body


@pytest.fixture
def served(
    make_portal: Callable[..., Flask], mmolove_sandbox_factory: Callable[..., SandboxServer]
) -> Iterator[Callable[[int], tuple[Flask, SandboxServer, Counter[str]]]]:
    servers: list[Any] = []

    def serve(drop: int = 0) -> tuple[Flask, SandboxServer, Counter[str]]:
        app = make_portal(MMOLOVE_DELIVERY="thread", MMOLOVE_CALLBACK_SECRET=SECRET)
        granted: Counter[str] = Counter()

        @heart_counted.connect_via(app)
        def grant(sender: Flask, heart_id: str, **kw: Any) -> None:
            granted[heart_id] += 1

        server = make_server("127.0.0.1", 0, DropFirstAnswers(app, drop), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        sandbox = mmolove_sandbox_factory(
            callback_url=f"http://127.0.0.1:{server.port}/mmolove/callback",
            callback_secret=SECRET,
            retry_scale=0.001,
            callback_timeout=5.0,
        )
        return app, sandbox, granted

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def _granted_once(app: Flask, granted: Counter[str], heart_ids: list[str]) -> None:
    deadline = threading.Event()
    for _ in range(100):
        if all(granted[h] for h in heart_ids):
            break
        deadline.wait(0.05)
    deadline.wait(0.3)  # a second announcement would come now
    assert {h: granted[h] for h in heart_ids} == dict.fromkeys(heart_ids, 1)
    assert sum(granted.values()) == len(heart_ids)


def test_a_vote_is_granted_once(served: Any) -> None:
    app, sandbox, granted = served(0)
    delivery = sandbox.send_heart("Aria", streak_day=7)
    assert delivery.wait(10)
    assert delivery.delivered
    _granted_once(app, granted, [delivery.heart_id])


def test_an_answer_lost_after_the_vote_was_kept_is_retried_and_granted_once(
    served: Any,
) -> None:
    app, sandbox, granted = served(2)
    delivery = sandbox.send_heart("Aria")
    assert delivery.wait(10)
    assert delivery.delivered
    statuses = [attempt.status for attempt in delivery.attempts]
    assert statuses == [None, None, 200]
    _granted_once(app, granted, [delivery.heart_id])


def test_the_same_vote_twice_at_once_is_granted_once(served: Any) -> None:
    app, sandbox, granted = served(0)
    heart_id = "6f1c0a55-0000-4000-8000-00000000abcd"
    deliveries = [sandbox.send_heart("Aria", heart_id=heart_id) for _ in range(4)]
    for delivery in deliveries:
        assert delivery.wait(10)
        assert delivery.delivered
    _granted_once(app, granted, [heart_id])


def test_the_database_down_is_503_and_mmoloves_retry_is_granted_once(served: Any) -> None:
    app, sandbox, granted = served(0)
    outbox = app.extensions["mmolove"].outbox
    outbox.hearts.drop(outbox.engine)
    delivery = sandbox.send_heart("Aria")
    # MMOLove's first retry is a minute later: 60 ms here. The table comes back first.
    for _ in range(100):
        if delivery.attempts:
            break
        threading.Event().wait(0.01)
    outbox.hearts.create(outbox.engine)
    assert delivery.wait(10)
    assert delivery.delivered
    assert delivery.attempts[0].status == 503
    _granted_once(app, granted, [delivery.heart_id])


def test_the_dashboards_test_button_is_answered_and_pays_nothing(served: Any) -> None:
    app, sandbox, granted = served(0)
    delivery = sandbox.send_test_callback()
    assert delivery.wait(10)
    assert delivery.delivered
    threading.Event().wait(0.3)
    assert sum(granted.values()) == 0
    assert app.extensions["mmolove"].outbox.heart_stats().tests == 1
