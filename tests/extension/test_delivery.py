"""Delivery policy: retries, backoff, dead letters, 401, re-signing, lost answers."""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from portal import Recorder
from support import FakeClock

from flask_mmolove import MMOLove, Outcome
from flask_mmolove.protocol import parse_signature_header


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_900_000_000.0)


@pytest.fixture
def worker_portal(make_portal: Callable[..., Flask], clock: FakeClock) -> Flask:
    """Worker mode with an injected clock and a fixed jitter of 0.5 (factor 1.0)."""
    return make_portal(
        MMOLove(clock=clock, jitter=lambda: 0.5),
        MMOLOVE_DELIVERY="worker",
        MMOLOVE_RETRY_BASE=1.0,
        MMOLOVE_RETRY_CAP=300.0,
        MMOLOVE_SLOW_RETRY=900.0,
        MMOLOVE_MAX_AGE=3600.0,
    )


def enqueue_registration(app: Flask, sandbox: Any, user: str = "ayla") -> None:
    client = app.test_client()
    client.get(f"/register?mmref={sandbox.mint_token()}")
    assert client.post("/register", data={"name": user}).status_code == 302


def deliver(app: Flask) -> int:
    """One delivery pass, as `flask mmolove worker` runs them; returns events claimed."""
    return int(app.extensions["mmolove"].deliverer.run_once().claimed)


def only_event(app: Flask) -> Any:
    [event] = app.extensions["mmolove"].outbox.list_events()
    return event


def test_server_errors_back_off_then_deliver(
    worker_portal: Flask, mmolove_sandbox: Any, clock: FakeClock
) -> None:
    enqueue_registration(worker_portal, mmolove_sandbox)
    mmolove_sandbox.fail_next(3, status=503)
    for attempt, expected in enumerate([1.0, 2.0, 4.0], start=1):
        assert deliver(worker_portal) == 1
        event = only_event(worker_portal)
        assert event.state == "pending"
        assert event.attempts == attempt
        assert event.last_status == 503
        assert event.next_attempt_at == pytest.approx(clock.now + expected)
        # Not due yet: nothing is claimed.
        assert deliver(worker_portal) == 0
        clock.advance(expected)
    assert deliver(worker_portal) == 1
    assert only_event(worker_portal).state == "delivered"
    assert [r.status for r in mmolove_sandbox.events] == [503, 503, 503, 200]


def test_retry_after_is_a_floor(
    worker_portal: Flask, mmolove_sandbox: Any, clock: FakeClock
) -> None:
    enqueue_registration(worker_portal, mmolove_sandbox)
    mmolove_sandbox.fail_next(1, status=429, retry_after="120")
    deliver(worker_portal)
    event = only_event(worker_portal)
    assert event.last_reason == "rate_limited"
    assert event.next_attempt_at == pytest.approx(clock.now + 120)


@pytest.mark.parametrize(
    ("status", "reason"), [(400, "malformed"), (404, "not_found"), (422, "invalid_transition")]
)
def test_refusals_are_dead_lettered_at_once(
    worker_portal: Flask, mmolove_sandbox: Any, status: int, reason: str
) -> None:
    recorder = Recorder(worker_portal)
    enqueue_registration(worker_portal, mmolove_sandbox)
    mmolove_sandbox.fail_next(1, status=status)
    deliver(worker_portal)
    event = only_event(worker_portal)
    assert event.state == "dead"
    assert event.attempts == 1
    assert event.last_reason == reason
    [rejected] = recorder.rejected
    assert rejected["status"] == status
    assert rejected["event"] == "registered"
    assert rejected["event_id"] == event.id
    assert rejected["hint"]
    # Requeued, it goes again and this time MMOLove accepts it.
    result = worker_portal.test_cli_runner().invoke(args=["mmolove", "retry", "--all"])
    assert "requeued 1 event(s)" in result.output
    assert deliver(worker_portal) == 1
    assert only_event(worker_portal).state == "delivered"
    recorder.disconnect()


def test_wrong_secret_is_kept_and_retried_slowly(
    make_portal: Callable[..., Flask],
    mmolove_sandbox: Any,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_portal(
        MMOLove(clock=clock, jitter=lambda: 0.5),
        MMOLOVE_DELIVERY="worker",
        MMOLOVE_REFERRAL_SECRET="not-the-secret",
        MMOLOVE_SLOW_RETRY=900.0,
    )
    enqueue_registration(app, mmolove_sandbox)
    deliver(app)
    event = only_event(app)
    assert event.state == "pending"
    assert event.last_status == 401
    assert event.last_reason == "bad_signature"
    assert event.next_attempt_at == pytest.approx(clock.now + 900)
    assert "wrong secret or clock drift" in caplog.text
    assert "not-the-secret" not in caplog.text
    assert any(r.levelno == logging.ERROR for r in caplog.records)


def test_transport_failure_is_retried(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any, clock: FakeClock
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    app = make_portal(
        MMOLove(clock=clock, jitter=lambda: 0.5),
        MMOLOVE_DELIVERY="worker",
        MMOLOVE_ENDPOINT=f"http://127.0.0.1:{closed_port}/api/referral/events",
    )
    enqueue_registration(app, mmolove_sandbox)
    deliver(app)
    event = only_event(app)
    assert event.state == "pending"
    assert event.last_status is None
    assert event.last_reason == "transport"
    assert str(closed_port) in (event.last_error or "")


def test_dead_letter_after_max_age(
    worker_portal: Flask, mmolove_sandbox: Any, clock: FakeClock
) -> None:
    recorder = Recorder(worker_portal)
    enqueue_registration(worker_portal, mmolove_sandbox)
    mmolove_sandbox.fail_next(100, status=500)
    clock.advance(3599.5)
    deliver(worker_portal)
    event = only_event(worker_portal)
    assert event.state == "dead"
    assert event.last_reason == "expired"
    assert "MMOLOVE_MAX_AGE" in recorder.rejected[0]["hint"]
    recorder.disconnect()


def test_retry_is_signed_afresh_over_the_same_bytes(
    worker_portal: Flask, mmolove_sandbox: Any, clock: FakeClock
) -> None:
    import time

    enqueue_registration(worker_portal, mmolove_sandbox)
    mmolove_sandbox.fail_next(1, status=500)
    deliver(worker_portal)
    time.sleep(1.05)  # the signing t is whole seconds of the real clock
    clock.advance(10)
    deliver(worker_portal)
    first, second = mmolove_sandbox.events
    assert first.body == second.body
    assert parse_signature_header(second.signature).t > parse_signature_header(first.signature).t
    assert first.signature != second.signature


def test_lost_answer_is_retried_and_credited_once(
    worker_portal: Flask, mmolove_sandbox: Any, clock: FakeClock
) -> None:
    recorder = Recorder(worker_portal)
    enqueue_registration(worker_portal, mmolove_sandbox)
    deliver(worker_portal)
    with worker_portal.app_context():
        MMOLove().qualify("1000")
    mmolove_sandbox.drop_next(1, after_commit=True)
    deliver(worker_portal)
    assert recorder.credited == []
    clock.advance(5)
    deliver(worker_portal)
    verdicts = [r.verdict for r in mmolove_sandbox.events if r.event == "qualified"]
    assert verdicts[-1] == "duplicate"
    assert len(recorder.credited) == 1
    assert recorder.credited[0]["outcome"] is Outcome.DUPLICATE
    deliver(worker_portal)
    assert len(recorder.credited) == 1
    recorder.disconnect()


def test_failing_credit_receiver_is_called_again(
    worker_portal: Flask, mmolove_sandbox: Any, clock: FakeClock
) -> None:
    from flask_mmolove import referrer_credited

    calls: list[str] = []

    def flaky(sender: Flask, **kw: Any) -> None:
        calls.append(kw["identity"])
        if len(calls) == 1:
            raise RuntimeError("the reward service is down")

    referrer_credited.connect(flaky, sender=worker_portal)
    try:
        enqueue_registration(worker_portal, mmolove_sandbox)
        with worker_portal.app_context():
            MMOLove().qualify("1000")
        # One pass sends `registered`; `qualified` waits for it, then goes in the next.
        assert deliver(worker_portal) == 1
        assert deliver(worker_portal) == 1
        assert calls == ["1000"]
        clock.advance(301)
        deliver(worker_portal)
        assert calls == ["1000", "1000"]
        clock.advance(10_000)
        deliver(worker_portal)
        assert calls == ["1000", "1000"]
    finally:
        referrer_credited.disconnect(flaky)


def test_qualified_waits_for_its_registered(
    worker_portal: Flask, mmolove_sandbox: Any, clock: FakeClock
) -> None:
    enqueue_registration(worker_portal, mmolove_sandbox)
    with worker_portal.app_context():
        MMOLove().qualify("1000")
    mmolove_sandbox.fail_next(1, status=503)
    assert deliver(worker_portal) == 1  # registered fails; qualified is not sent
    assert deliver(worker_portal) == 0
    clock.advance(1.0)
    assert deliver(worker_portal) == 1
    assert deliver(worker_portal) == 1
    assert [(r.event, r.status) for r in mmolove_sandbox.events] == [
        ("registered", 503),
        ("registered", 200),
        ("qualified", 200),
    ]


def test_registered_body_is_stored_once_and_sent_verbatim(
    worker_portal: Flask, mmolove_sandbox: Any
) -> None:
    enqueue_registration(worker_portal, mmolove_sandbox)
    stored = only_event(worker_portal).body
    deliver(worker_portal)
    [record] = mmolove_sandbox.events
    assert record.body == stored
    assert list(json.loads(stored)) == [
        "event",
        "token",
        "server_id",
        "referee_identity",
        "server_event_id",
        "ts",
    ]


def backlog_portal(
    make_portal: Callable[..., Flask], sandbox: Any, events: int, batch: int, concurrency: int
) -> Flask:
    """A worker-mode portal with ``events`` registrations waiting."""
    app = make_portal(
        MMOLOVE_DELIVERY="worker", MMOLOVE_BATCH_SIZE=batch, MMOLOVE_CONCURRENCY=concurrency
    )
    for n in range(events):
        enqueue_registration(app, sandbox, f"player{n}")
    return app


def counting(answer: Callable[[int], bool]) -> Callable[[], bool]:
    """A ``should_stop`` whose n-th call (from 1) returns ``answer(n)``."""
    calls = itertools.count(1)
    return lambda: answer(next(calls))


def test_drain_passes_until_a_claim_comes_back_short(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    app = backlog_portal(make_portal, mmolove_sandbox, events=5, batch=2, concurrency=2)
    passes: list[tuple[int, int]] = []
    total = app.extensions["mmolove"].deliverer.drain(
        on_pass=lambda report: passes.append((report.claimed, report.delivered))
    )
    # Full batches call for another pass; the short third one ends the run.
    assert passes == [(2, 2), (2, 2), (1, 1)]
    assert (total.claimed, total.delivered) == (5, 5)
    assert mmolove_sandbox.accepted_count("registered") == 5


def test_a_stopping_drain_hands_back_what_it_did_not_send(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    app = backlog_portal(make_portal, mmolove_sandbox, events=6, batch=4, concurrency=1)
    # Asked before each send: stop after the second.
    should_stop = counting(lambda n: n > 2)
    total = app.extensions["mmolove"].deliverer.drain(should_stop=should_stop)
    assert (total.claimed, total.delivered, total.released) == (4, 2, 2)
    outbox = app.extensions["mmolove"].outbox
    assert outbox.stats().pending == 4
    assert outbox.stats().in_flight == 0


def test_a_failing_should_stop_hands_the_event_back_and_the_pass_goes_on(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = backlog_portal(make_portal, mmolove_sandbox, events=4, batch=4, concurrency=2)

    def stop_check(n: int) -> bool:
        if n <= 2:
            raise RuntimeError("a bug in the caller's stop check")
        return False

    should_stop = counting(stop_check)

    totals: list[Any] = []
    runner = threading.Thread(
        target=lambda: totals.append(
            app.extensions["mmolove"].deliverer.drain(should_stop=should_stop)
        )
    )
    runner.start()
    # Before the fix, both send threads died on the exception and the pass waited forever.
    runner.join(30)
    assert not runner.is_alive()
    [total] = totals
    # Two handed back unsent, then delivered by the next pass.
    assert (total.claimed, total.delivered, total.released) == (6, 4, 2)
    assert mmolove_sandbox.accepted_count("registered") == 4
    assert "should_stop raised" in caplog.text
