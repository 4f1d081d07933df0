"""Item 5: answers that resending cannot fix.

400, 404 and 422 get one attempt and are dead-lettered, however much time passes.
A 401 (wrong secret) is kept and retried slowly; once the secret is fixed,
``flask mmolove retry`` delivers it at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from portal import Recorder
from reliability_support import outbox_of, record_figures, register, state
from support import FakeClock

from flask_mmolove import MMOLove

SLOW = 900.0


def deliver(app: Flask) -> int:
    return int(state(app).deliverer.run_once().claimed)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.mark.parametrize("status", [400, 404, 422])
def test_refusal_gets_one_attempt_and_is_dead_lettered(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any, clock: FakeClock, status: int
) -> None:
    app = make_portal(
        MMOLove(clock=clock),
        MMOLOVE_RETRY_BASE=1.0,
        MMOLOVE_RETRY_CAP=60.0,
        MMOLOVE_MAX_AGE=7 * 86400.0,
    )
    recorder = Recorder(app)
    if status == 400:
        # Our client cannot build a malformed body; MMOLove says one is anyway.
        token = mmolove_sandbox.mint_token()
        mmolove_sandbox.fail_next(1, status=400, body={"error": "body is not valid JSON"})
        register(app, token, "p400")
        event = "registered"
    elif status == 404:
        # A real 404: a token minted for another server.
        register(app, mmolove_sandbox.mint_token("x", server_id="someone-else"), "p404")
        event = "registered"
    else:
        # A real 422: qualified for a referral MMOLove never saw registered.
        token = mmolove_sandbox.mint_token()
        with app.app_context():
            assert MMOLove().qualify("p422", token=token)
        event = "qualified"
    assert deliver(app) == 1
    # A week of passes: nothing is sent again.
    for _ in range(30):
        clock.advance(6 * 3600)
        deliver(app)
    [row] = outbox_of(app).list_events()
    assert (row.event, row.state, row.attempts, row.last_status) == (event, "dead", 1, status)
    posts = [r for r in mmolove_sandbox.events if r.event == event]
    assert [r.status for r in posts] == [status]
    assert [(r["status"], r["event_id"]) for r in recorder.rejected] == [(status, row.id)]
    assert mmolove_sandbox.accepted_count() == 0
    record_figures(f"5 refusal {status}", posts=len(posts), attempts=row.attempts, state=row.state)
    recorder.disconnect()


def test_401_is_kept_retried_slowly_and_retry_delivers_after_the_fix(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any, clock: FakeClock, portal_config: Any
) -> None:
    settings = {
        "MMOLOVE_RETRY_BASE": 1.0,
        "MMOLOVE_RETRY_CAP": 60.0,
        "MMOLOVE_SLOW_RETRY": SLOW,
        "MMOLOVE_MAX_AGE": 7 * 86400.0,
    }
    wrong = make_portal(
        MMOLove(clock=clock, jitter=lambda: 0.5),
        MMOLOVE_REFERRAL_SECRET="not-the-secret-" + "x" * 10,
        **settings,
    )
    recorder = Recorder(wrong)
    token = mmolove_sandbox.mint_token()
    register(wrong, token, "k1")
    assert deliver(wrong) == 1
    [row] = outbox_of(wrong).list_events()
    assert (row.state, row.last_status, row.last_reason) == ("pending", 401, "bad_signature")
    assert row.next_attempt_at == pytest.approx(clock.now + SLOW)
    # Not retried at the pace of server errors (base 1 s, cap 60 s)...
    for _ in range(14):
        clock.advance(60)
        assert deliver(wrong) == 0
    # ... but slowly, and kept: never dead, however long it takes.
    clock.advance(SLOW - 14 * 60)
    assert deliver(wrong) == 1
    for _ in range(20):
        clock.advance(SLOW)
        deliver(wrong)
    [row] = outbox_of(wrong).list_events()
    assert (row.state, row.attempts, row.last_status) == ("pending", 22, 401)
    assert [r.verdict for r in mmolove_sandbox.events] == ["bad_signature"] * 22
    assert recorder.rejected == []

    # The operator fixes the secret (a new deploy on the same database) and retries.
    fixed = make_portal(MMOLove(clock=clock, jitter=lambda: 0.5), **settings)
    fixed_recorder = Recorder(fixed)
    assert outbox_of(fixed).get(row.id).state == "pending"
    result = fixed.test_cli_runner().invoke(args=["mmolove", "retry", str(row.id)])
    assert result.exit_code == 0, result.output
    assert "requeued 1 event(s)" in result.output
    assert mmolove_sandbox.secret not in result.output
    result = fixed.test_cli_runner().invoke(args=["mmolove", "worker", "--burst"])
    assert result.exit_code == 0, result.output
    assert "delivered 1" in result.output
    assert outbox_of(fixed).get(row.id).state == "delivered"
    assert mmolove_sandbox.accepted_count("registered") == 1
    assert mmolove_sandbox.accepted_posts(token, "registered") == 1
    assert [r["identity"] for r in fixed_recorder.registered] == ["k1"]
    record_figures(
        "5 401 then fix",
        attempts_with_wrong_secret=22,
        slow_retry_s=SLOW,
        posts=len(mmolove_sandbox.events),
        accepted_after_retry=1,
    )
    recorder.disconnect()
    fixed_recorder.disconnect()
