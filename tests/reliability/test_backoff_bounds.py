"""Item 10: every retry delay stays within the documented bounds.

README: ``MMOLOVE_RETRY_BASE`` x 2^(n-1) capped at ``MMOLOVE_RETRY_CAP``, x a jitter
factor in [0.75, 1.25) (never above the cap); ``Retry-After`` is a floor; a 401 or a
redirect waits ``MMOLOVE_SLOW_RETRY`` x the jitter factor. Hypothesis explores attempt
numbers, jitter values and settings; a second test checks the same bounds on what the
deliverer actually stores, over HTTP, with an injected clock and jitter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import pytest
from flask import Flask
from hypothesis import example, given
from hypothesis import strategies as st
from reliability_support import outbox_of, record_figures, register, state
from support import FakeClock

from flask_mmolove import MMOLove
from flask_mmolove.delivery import backoff_delay
from flask_mmolove.protocol import Decision, classify
from flask_mmolove.settings import Settings, load_settings

LOW, HIGH = 0.75, 1.25
REL = 1e-9


def base_settings() -> Settings:
    app = Flask(__name__)
    app.config.update(
        MMOLOVE_SERVER_ID="srv",
        MMOLOVE_REFERRAL_SECRET="secret",
        MMOLOVE_DATABASE_URI="sqlite:///unused.sqlite3",
    )
    return load_settings(app)


SETTINGS = base_settings()


def documented_nominal(attempts: int, base: float, cap: float) -> float:
    """min(cap, base * 2^(attempts-1)), without float overflow."""
    exponent = attempts - 1
    if exponent >= 1024:  # 2.0 ** 1024 overflows; any base has met the cap by then
        return cap
    return min(cap, base * 2.0**exponent)


def check_fast(delay: float, attempts: int, settings: Settings, retry_after: float | None) -> None:
    nominal = documented_nominal(attempts, settings.retry_base, settings.retry_cap)
    floor = retry_after or 0.0
    assert delay >= floor
    if retry_after is not None and delay == retry_after and retry_after > settings.retry_cap:
        return  # the server's floor wins over our cap, as documented
    assert delay <= settings.retry_cap * (1 + REL)
    assert delay >= min(LOW * nominal, settings.retry_cap) * (1 - REL) or delay == floor
    assert delay < HIGH * nominal * (1 + REL) or delay == floor


decisions = st.sampled_from(
    [classify(None), classify(500), classify(503), classify(429), classify(408)]
)


@given(
    attempts=st.integers(min_value=1, max_value=5000),
    jitter=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    base=st.floats(min_value=1e-9, max_value=1e4),
    cap=st.floats(min_value=1e-3, max_value=1e12),
    retry_after=st.none() | st.floats(min_value=0.0, max_value=86_400.0),
    decision=decisions,
)
@example(attempts=100, jitter=0.0, base=1e-9, cap=1e12, retry_after=None, decision=classify(503))
def test_retry_delay_within_documented_bounds(
    attempts: int,
    jitter: float,
    base: float,
    cap: float,
    retry_after: float | None,
    decision: Decision,
) -> None:
    settings = dataclasses.replace(SETTINGS, retry_base=base, retry_cap=cap)
    decision = dataclasses.replace(decision, retry_after=retry_after)
    delay = backoff_delay(attempts, decision, settings, lambda: jitter)
    assert math.isfinite(delay)
    check_fast(delay, attempts, settings, retry_after)
    # The floor is exactly a floor: with it lower than the delay, nothing changes.
    unfloored = backoff_delay(
        attempts, dataclasses.replace(decision, retry_after=None), settings, lambda: jitter
    )
    assert delay == max(unfloored, retry_after or 0.0)


@given(
    attempts=st.integers(min_value=1, max_value=5000),
    jitter=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    slow=st.floats(min_value=1.0, max_value=1e6),
    status=st.sampled_from([401, 301, 302, 307, 308]),
)
def test_slow_retry_within_documented_bounds(
    attempts: int, jitter: float, slow: float, status: int
) -> None:
    settings = dataclasses.replace(SETTINGS, slow_retry=slow, retry_cap=1.0, retry_base=0.5)
    decision = classify(status)
    assert decision.slow
    delay = backoff_delay(attempts, decision, settings, lambda: jitter)
    assert LOW * slow * (1 - REL) <= delay < HIGH * slow * (1 + REL)


@given(
    attempts=st.integers(min_value=1, max_value=60),
    low=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    high=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_jitter_spreads_and_never_reorders(attempts: int, low: float, high: float) -> None:
    """A larger jitter value never gives a shorter delay; uncapped, a different one
    gives a different delay (a crowd failed together does not return together)."""
    low, high = sorted((low, high))
    settings = dataclasses.replace(SETTINGS, retry_base=1.0, retry_cap=1e30)
    decision = classify(503)
    a = backoff_delay(attempts, decision, settings, lambda: low)
    b = backoff_delay(attempts, decision, settings, lambda: high)
    assert a <= b
    if high - low > 1e-6:
        assert a < b


JITTERS = [0.0, 0.25, 0.5, 0.999999]


def test_stored_next_attempt_within_bounds_for_each_attempt(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    """Attempts 1..14 through the real deliverer: base 1 s, cap 300 s, MMOLove 503."""
    clock = FakeClock()
    jitter = iter(JITTERS * 10)
    app = make_portal(
        MMOLove(clock=clock, jitter=lambda: next(jitter)),
        MMOLOVE_RETRY_BASE=1.0,
        MMOLOVE_RETRY_CAP=300.0,
        MMOLOVE_MAX_AGE=30 * 86400.0,
    )
    register(app, mmolove_sandbox.mint_token(), "b1")
    mmolove_sandbox.fail_next(14, status=503)
    settings = state(app).settings
    delays = []
    for attempt in range(1, 15):
        assert state(app).deliverer.run_once().retried == 1
        [event] = outbox_of(app).list_events()
        assert event.attempts == attempt
        delay = event.next_attempt_at - clock.now
        check_fast(delay, attempt, settings, None)
        delays.append(delay)
        # Not a moment early...
        clock.advance(delay - 0.01)
        assert state(app).deliverer.run_once().claimed == 0
        clock.advance(0.01)
    assert state(app).deliverer.run_once().delivered == 1
    record_figures(
        "10 backoff (base 1, cap 300)",
        delays_s=str([round(d, 2) for d in delays]),
    )


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_a_floor_end_to_end(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any, form: str
) -> None:
    clock = FakeClock()
    app = make_portal(
        MMOLove(clock=clock, jitter=lambda: 0.999999),
        MMOLOVE_RETRY_BASE=1.0,
        MMOLOVE_RETRY_CAP=300.0,
    )
    register(app, mmolove_sandbox.mint_token(), "b2")
    wait = 1800
    header = str(wait) if form == "seconds" else formatdate(clock.now + wait, usegmt=True)
    mmolove_sandbox.fail_next(1, status=429, retry_after=header)
    state(app).deliverer.run_once()
    [event] = outbox_of(app).list_events()
    # Above the cap: the server's floor wins. (An HTTP date has whole seconds.)
    assert event.next_attempt_at - clock.now == pytest.approx(wait, abs=2)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_an_unexpected_send_error_backs_off_like_a_transport_failure(
    make_portal: Callable[..., Flask],
    mmolove_sandbox: Any,
    monkeypatch: pytest.MonkeyPatch,
    concurrency: int,
) -> None:
    """A bug or a bad setting that makes sending raise (say, an infinite timeout's
    OverflowError) must neither lose the events, nor spin on them, nor stop the pass."""
    clock = FakeClock()
    app = make_portal(
        MMOLove(clock=clock, jitter=lambda: 0.5),
        MMOLOVE_CONCURRENCY=concurrency,
        MMOLOVE_RETRY_BASE=2.0,
    )
    for n in range(3):
        register(app, mmolove_sandbox.mint_token(), f"u{n}")
    deliverer = state(app).deliverer

    def broken(body: bytes, **options: Any) -> Any:
        raise OverflowError("timeout value is too large")

    monkeypatch.setattr(deliverer.client, "send_body", broken)
    report = deliverer.run_once()
    assert (report.claimed, report.retried) == (3, 3)
    for event in outbox_of(app).list_events():
        assert event.state == "pending"
        assert event.last_reason == "transport"
        assert "OverflowError" in (event.last_error or "")
        assert event.next_attempt_at == pytest.approx(clock.now + 2.0)
    assert deliverer.run_once().claimed == 0
    monkeypatch.undo()
    clock.advance(2.0)
    assert deliverer.run_once().delivered == 3
