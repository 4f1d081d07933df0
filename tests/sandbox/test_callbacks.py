"""The sandbox as MMOLove's callback side: reward callbacks (votes) to a real receiver on
127.0.0.1, verified with the package's own checks; MMOLove's retry schedule, compressed;
what counts as a failure; legacy GET mode; and stop() ending what is pending.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pytest
import requests
from sandbox_support import T0, Factory
from support import wait_for
from werkzeug.datastructures import Headers
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from flask_mmolove.protocol import (
    EVENT_HEADER,
    HEART_COUNTED,
    HEART_TEST,
    BadSignatureError,
    check_heart_callback,
    check_legacy_get,
    parse_callback_signature,
)
from flask_mmolove.sandbox import MAX_ATTEMPTS, RETRY_DELAYS, SandboxServer

SIGNATURE = "X-MMOLove-Signature"
PATH = "/mmolove/callback"
#: A minute becomes 60 ms: retries within a test, spacing still measurable.
SCALE = 0.001
#: Six attempts in about a third of a second.
TINY = 0.00001
#: How late a retry may come on a busy machine, beyond its scaled delay.
SLACK = 0.25


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    args: dict[str, str]
    headers: Headers
    body: bytes
    at: float

    @property
    def signature(self) -> str:
        return self.headers[SIGNATURE]

    def vote(self, secret: str) -> dict[str, Any]:
        return check_heart_callback(
            self.body, self.signature, secret, now=parse_callback_signature(self.signature).t
        )


class _Quiet(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class Receiver:
    """A portal's callback endpoint that records every request and answers as scripted:
    a status, ``(status, location)``, or ``"hang"`` (until released, then 200)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.script: list[Any] = []
        self.release = threading.Event()
        self.on_request: Callable[[Received], None] | None = None
        self.answer_text = "answered"
        self._lock = threading.Lock()
        self._server = make_server("127.0.0.1", 0, self, threaded=True, request_handler=_Quiet)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def url(self, path: str = PATH) -> str:
        return f"http://127.0.0.1:{self._server.port}{path}"

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._thread.join(5)
        self._server.server_close()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        got = Received(
            request.method,
            request.path,
            dict(request.args),
            Headers(request.headers),
            request.get_data(),
            time.monotonic(),
        )
        with self._lock:
            self.received.append(got)
            answer = self.script.pop(0) if self.script else 200
        if self.on_request is not None:
            self.on_request(got)
        if answer == "hang":
            self.release.wait(30)
            answer = 200
        status, location = answer if isinstance(answer, tuple) else (answer, None)
        response = Response(self.answer_text, status=status)
        if location:
            response.headers["Location"] = location
        return response(environ, start_response)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def to_receiver(mmolove_sandbox_factory: Factory, receiver: Receiver) -> Factory:
    """Starts a sandbox whose callbacks go to ``receiver``."""

    def start(**kwargs: Any) -> SandboxServer:
        return mmolove_sandbox_factory(callback_url=receiver.url(), **kwargs)

    return start


def test_a_vote_is_signed_with_the_callback_secret_and_carries_every_field(
    to_receiver: Factory, receiver: Receiver
) -> None:
    sandbox = to_receiver()
    assert sandbox.callback_secret != sandbox.secret
    delivery = sandbox.send_heart(
        "Ålice", streak_day=3, extra={"first_heart": True, "loyalty_level": 2}
    )
    assert delivery.wait(5)
    [got] = receiver.requests()
    assert (got.method, got.path) == ("POST", PATH)
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers[EVENT_HEADER] == HEART_COUNTED
    vote = got.vote(sandbox.callback_secret)
    with pytest.raises(BadSignatureError):
        check_heart_callback(got.body, got.signature, sandbox.secret, now=vote["timestamp"])
    assert vote == {
        "event": HEART_COUNTED,
        "server_id": sandbox.server_id,
        "username": "Ålice",
        "heart_id": delivery.heart_id,
        "period": datetime.fromtimestamp(vote["timestamp"], timezone.utc).strftime("%Y-%m"),
        "timestamp": parse_callback_signature(got.signature).t,
        "streak_day": 3,
        "first_heart": True,
        "loyalty_level": 2,
    }
    assert abs(vote["timestamp"] - time.time()) < 5
    assert uuid.UUID(vote["heart_id"]).version == 4
    # Compact JSON, UTF-8 as is, in MMOLove's field order.
    assert got.body == json.dumps(vote, separators=(",", ":"), ensure_ascii=False).encode()
    [attempt] = sandbox.callback_log
    logged = {"heart_id": delivery.heart_id, "event": HEART_COUNTED, "username": "Ålice"}
    logged |= {"attempt": 1, "status": 200, "error": None, "state": "delivered"}
    assert attempt.as_dict().items() >= logged.items()
    assert delivery.delivered
    assert sandbox.callback_deliveries == [delivery]


def test_each_vote_has_a_fresh_heart_id_unless_one_is_given_again(
    to_receiver: Factory, receiver: Receiver
) -> None:
    sandbox = to_receiver(callback_secret="portal-callback-secret")
    first, second = sandbox.send_heart("a"), sandbox.send_heart("a")
    again = sandbox.send_heart("a", heart_id=first.heart_id)
    assert sandbox.wait_callbacks(5)
    ids = [got.vote("portal-callback-secret")["heart_id"] for got in receiver.requests()]
    assert sorted(ids) == sorted([first.heart_id, first.heart_id, second.heart_id])
    assert first.heart_id != second.heart_id
    assert again.heart_id == first.heart_id


def test_a_given_timestamp_is_every_attempts_t_and_sets_the_period(
    to_receiver: Factory, receiver: Receiver
) -> None:
    receiver.script = [500]
    sandbox = to_receiver(retry_scale=SCALE)
    assert sandbox.send_heart("bob", timestamp=T0).wait(5)
    votes = [
        check_heart_callback(got.body, got.signature, sandbox.callback_secret, now=T0)
        for got in receiver.requests()
    ]
    assert [(v["timestamp"], v["period"]) for v in votes] == [(T0, "2023-11")] * 2


def test_each_retry_is_signed_anew_with_the_secret_of_that_moment(
    to_receiver: Factory, receiver: Receiver
) -> None:
    # MMOLove's clock moves an hour and the portal rotates its secret between two
    # attempts: the retry carries a fresh t, equal to its timestamp, under the new secret.
    shift = [0.0]
    sandbox = to_receiver(retry_scale=SCALE, clock=lambda: time.time() + shift[0])

    def rotate(_got: Received) -> None:
        if len(receiver.requests()) == 1:
            shift[0] = 3600.0
            sandbox.configure_callbacks(secret="rotated-callback-secret")

    receiver.on_request = rotate
    receiver.script = [503]
    old = sandbox.callback_secret
    assert sandbox.send_heart("carol").wait(5)
    first, second = receiver.requests()
    first_vote = first.vote(old)
    second_vote = second.vote("rotated-callback-secret")
    with pytest.raises(BadSignatureError):
        second.vote(old)
    assert second_vote["timestamp"] - first_vote["timestamp"] >= 3600
    assert second_vote["heart_id"] == first_vote["heart_id"]


def test_failures_are_retried_on_mmoloves_schedule_scaled(
    to_receiver: Factory, receiver: Receiver
) -> None:
    receiver.script = [503, 503]
    sandbox = to_receiver(retry_scale=SCALE)
    delivery = sandbox.send_heart("dave")
    assert delivery.wait(5)
    first, second, third = receiver.requests()
    assert (
        len({got.vote(sandbox.callback_secret)["heart_id"] for got in (first, second, third)}) == 1
    )
    log = sandbox.callback_log
    assert [(a.attempt, a.status, a.state) for a in log] == [
        (1, 503, "retrying"),
        (2, 503, "retrying"),
        (3, 200, "delivered"),
    ]
    assert [a.next_delay for a in log] == [
        pytest.approx(60 * SCALE),
        pytest.approx(300 * SCALE),
        None,
    ]
    for gap, delay in ((second.at - first.at, 60 * SCALE), (third.at - second.at, 300 * SCALE)):
        assert delay <= gap < delay + SLACK
    assert delivery.state == "delivered"


def test_every_non_2xx_is_retried_and_six_failures_exhaust_the_delivery(
    to_receiver: Factory, receiver: Receiver
) -> None:
    assert RETRY_DELAYS == (0, 60, 300, 1800, 7200, 21600)
    receiver.script = [(301, receiver.url("/moved")), 400, 404, 429, 500, 503, 200]
    sandbox = to_receiver(retry_scale=TINY)
    delivery = sandbox.send_heart("erin")
    assert delivery.wait(10)
    assert delivery.state == "exhausted"
    assert [(a.attempt, a.status) for a in delivery.attempts] == list(
        enumerate([301, 400, 404, 429, 500, 503], start=1)
    )
    assert [a.state for a in delivery.attempts] == ["retrying"] * 5 + ["exhausted"]
    # Well past where a seventh attempt would have come: none does.
    time.sleep(0.3)
    assert len(receiver.requests()) == MAX_ATTEMPTS == 6


def test_a_timeout_is_a_failed_attempt(to_receiver: Factory, receiver: Receiver) -> None:
    receiver.script = ["hang"]
    sandbox = to_receiver(retry_scale=SCALE, callback_timeout=0.3)
    delivery = sandbox.send_heart("frank")
    assert delivery.wait(5)
    first, second = delivery.attempts
    assert (first.status, first.error, first.state) == (None, "timeout", "retrying")
    assert 0.3 <= first.duration < 0.3 + SLACK
    assert (second.status, second.state) == (200, "delivered")


def test_a_redirect_is_a_failed_attempt_and_never_followed(
    to_receiver: Factory, receiver: Receiver
) -> None:
    elsewhere = receiver.url("/elsewhere")
    receiver.script = [(302, elsewhere), (307, elsewhere)]
    sandbox = to_receiver(retry_scale=SCALE)
    delivery = sandbox.send_heart("gina")
    assert delivery.wait(5)
    assert [got.path for got in receiver.requests()] == [PATH] * 3
    assert [(a.status, a.location, a.state) for a in delivery.attempts] == [
        (302, elsewhere, "retrying"),
        (307, elsewhere, "retrying"),
        (200, None, "delivered"),
    ]


def test_a_refused_connection_is_a_failed_attempt(mmolove_sandbox_factory: Factory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    sandbox = mmolove_sandbox_factory(
        callback_url=f"http://127.0.0.1:{closed_port}{PATH}", retry_scale=TINY
    )
    delivery = sandbox.send_heart("hank")
    assert delivery.wait(10)
    assert [(a.status, a.error) for a in delivery.attempts] == [(None, "refused")] * 6
    assert delivery.state == "exhausted"


def test_the_test_callback(to_receiver: Factory, receiver: Receiver) -> None:
    sandbox = to_receiver(retry_scale=TINY)
    assert sandbox.send_test_callback().wait(5)
    [got] = receiver.requests()
    assert got.headers[EVENT_HEADER] == HEART_TEST
    vote = got.vote(sandbox.callback_secret)
    assert (vote["event"], vote["username"], vote["heart_id"]) == (
        HEART_TEST,
        "test-user",
        "00000000-0000-0000-0000-000000000000",
    )
    assert vote["server_id"] == sandbox.server_id
    # Like the dashboard's button: one attempt, its status shown, no retry.
    receiver.script = [500]
    failed = sandbox.send_test_callback()
    assert failed.wait(5)
    time.sleep(0.1)
    assert (failed.state, failed.status, len(receiver.requests())) == ("failed", 500, 2)


def test_legacy_get_mode_signs_the_query(
    mmolove_sandbox_factory: Factory, receiver: Receiver
) -> None:
    sandbox = mmolove_sandbox_factory(
        callback_url=receiver.url(PATH + "?portal=1"), callback_legacy_get=True
    )
    assert sandbox.send_heart("Ivy Smith").wait(5)
    [got] = receiver.requests()
    assert (got.method, got.path, got.body) == ("GET", PATH, b"")
    assert SIGNATURE not in got.headers
    assert got.args["portal"] == "1"
    now = int(got.args["ts"])
    assert check_legacy_get(got.args, sandbox.callback_secret, now=now) == {
        "username": "Ivy Smith",
        "ts": now,
    }
    with pytest.raises(BadSignatureError):
        check_legacy_get(got.args, sandbox.secret, now=now)
    assert sandbox.callback_log[0].method == "GET"


def test_stop_cancels_a_pending_retry_at_once(to_receiver: Factory, receiver: Receiver) -> None:
    receiver.script = [503]
    sandbox = to_receiver()  # the real schedule: the retry is a minute away
    delivery = sandbox.send_heart("jack")
    wait_for(lambda: sandbox.callback_log, what="the first attempt")
    assert not sandbox.wait_callbacks(0.05)
    started = time.monotonic()
    sandbox.stop()
    assert time.monotonic() - started < 1
    assert delivery.done
    assert delivery.state == "cancelled"
    assert sandbox.wait_callbacks(0)
    assert not [t for t in threading.enumerate() if t.name.startswith("mmolove-sandbox")]
    assert len(receiver.requests()) == 1


def test_stop_cuts_an_attempt_in_flight(to_receiver: Factory, receiver: Receiver) -> None:
    receiver.script = ["hang"]
    sandbox = to_receiver(callback_timeout=30)
    delivery = sandbox.send_heart("kim")
    wait_for(receiver.requests, what="the attempt to arrive")
    started = time.monotonic()
    sandbox.stop()
    assert time.monotonic() - started < 1
    [attempt] = delivery.attempts
    assert (attempt.status, attempt.error, attempt.state) == (None, "stopped", "cancelled")
    assert not [t for t in threading.enumerate() if t.name.startswith("mmolove-sandbox")]


def test_stop_while_connecting_sends_nothing(
    to_receiver: Factory, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # stop() lands while the attempt is still connecting, before it has a socket to cut.
    receiver.script = ["hang"]
    sandbox = to_receiver(callback_timeout=30)
    connect = http.client.HTTPConnection.connect
    stopper = threading.Thread(target=sandbox.stop)

    def connect_while_stopping(self: http.client.HTTPConnection) -> None:
        stopper.start()
        time.sleep(0.2)
        connect(self)

    monkeypatch.setattr(http.client.HTTPConnection, "connect", connect_while_stopping)
    delivery = sandbox.send_heart("kim")
    wait_for(lambda: stopper.ident, what="stop() to start")
    stopper.join(5)
    assert delivery.wait(1)
    [attempt] = delivery.attempts
    assert (attempt.error, attempt.state) == ("stopped", "cancelled")
    time.sleep(0.1)
    assert receiver.requests() == []


def test_the_log_as_json_and_hearts_sent_from_another_process(
    to_receiver: Factory, receiver: Receiver
) -> None:
    sandbox = to_receiver(callback_secret="a-callback-secret-to-hide")
    # A portal's debug page that shows its configuration: the log must not repeat it.
    receiver.answer_text = "MMOLOVE_CALLBACK_SECRET=a-callback-secret-to-hide"
    answer = requests.post(
        sandbox.url + "/_hearts", json={"username": "lee", "streak_day": 2}, timeout=5
    )
    assert answer.status_code == 202
    assert sandbox.wait_callbacks(5)
    [got] = receiver.requests()
    assert got.vote("a-callback-secret-to-hide")["heart_id"] == answer.json()["heart_id"]
    text = requests.get(sandbox.url + "/callbacks.json", timeout=5).text
    assert "a-callback-secret-to-hide" not in text
    [entry] = json.loads(text)
    assert entry["heart_id"] == answer.json()["heart_id"]
    assert (entry["attempt"], entry["status"], entry["state"]) == (1, 200, "delivered")
    assert entry["response"] == "MMOLOVE_CALLBACK_SECRET=[redacted]"
    bad = requests.post(sandbox.url + "/_hearts", json={"user": "x"}, timeout=5)
    assert bad.status_code == 400


def test_misuse_is_refused_at_once(mmolove_sandbox_factory: Factory) -> None:
    sandbox = mmolove_sandbox_factory()
    with pytest.raises(RuntimeError, match="no callback URL"):
        sandbox.send_heart("m")
    sandbox.configure_callbacks("http://127.0.0.1:9/cb")
    with pytest.raises(ValueError, match="heart_id"):
        sandbox.send_heart("m", extra={"heart_id": "x"})
    with pytest.raises(ValueError, match="http"):
        sandbox.configure_callbacks("ftp://portal.example/cb")
    with pytest.raises(ValueError, match="secret"):
        sandbox.configure_callbacks(secret="")
    assert sandbox.callback_deliveries == []
    assert sandbox.callback_secret not in repr(sandbox.callbacks.config)


def test_the_plugin_aims_callbacks_at_pytest_flasks_live_server(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Set by any `flask` command run in this process earlier in the suite (the CLI
    # tests'); inherited, it makes the live server's app.run() a no-op.
    monkeypatch.delenv("FLASK_RUN_FROM_CLI", raising=False)
    pytester.makeconftest(
        """
        import pytest
        from flask import Flask, request

        from flask_mmolove.protocol import verify_heart_callback

        @pytest.fixture(scope="session")  # as pytest-flask's live_server wants it
        def app():
            app = Flask("portal")
            app.config.update(
                MMOLOVE_CALLBACK_SECRET=["current-callback-secret", "previous-secret"],
                MMOLOVE_CALLBACK_URL="/hooks/mmolove",
            )

            @app.post("/hooks/mmolove")
            def callback():
                secrets = app.config["MMOLOVE_CALLBACK_SECRET"]
                vote = verify_heart_callback(
                    request.get_data(), request.headers.get("X-MMOLove-Signature", ""), secrets
                )
                return ("", 204) if vote and vote["username"] == "alice" else ("", 401)

            return app
        """
    )
    pytester.makepyfile(
        """
        def test_a_vote_reaches_the_live_portal(mmolove_live_callbacks):
            delivery = mmolove_live_callbacks.send_heart("alice")
            assert delivery.wait(10) and delivery.delivered
            assert delivery.status == 204
            assert mmolove_live_callbacks.callback_url.endswith("/hooks/mmolove")

        def test_retries_are_compressed(mmolove_live_callbacks):
            mmolove_live_callbacks.configure_callbacks(secret="not-the-portals")
            delivery = mmolove_live_callbacks.send_heart("alice")
            # At 0, 60 and 360 ms; the fourth is due at 2.16 s.
            assert not delivery.wait(1.2)
            assert [(a.status, a.state) for a in delivery.attempts] == [(401, "retrying")] * 3
        """
    )
    result = pytester.runpytest_subprocess("-W", "error", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
