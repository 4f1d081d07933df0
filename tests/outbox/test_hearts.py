"""Votes kept by the outbox: once per ``heart_id`` whatever MMOLove retries, with the
body as received; announced under a lease, once, like credits (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import sqlalchemy as sa
from support import FakeClock

from flask_mmolove.outbox import HeartStats, Outbox

VOTE = {
    "event": "heart.counted",
    "server_id": "srv",
    "username": "Aria",
    "heart_id": "9b2d6c1e-1111-4222-8333-444455556666",
    "period": "2026-05",
    "timestamp": 1780000000,
    "streak_day": 7,
}


def _keep(outbox: Outbox, heart_id: str = VOTE["heart_id"], event: str = "heart.counted") -> bool:
    payload = json.dumps({**VOTE, "heart_id": heart_id, "event": event}).encode()
    return outbox.record_heart(heart_id=heart_id, event=event, username="Aria", payload=payload)


def test_a_vote_is_kept_once_whatever_mmolove_retries(outbox: Outbox) -> None:
    assert _keep(outbox) is True
    assert _keep(outbox) is False
    assert outbox.heart_stats().received == 1
    [heart] = outbox.claim_hearts("a", limit=10, lease=60)
    assert heart.fields == VOTE
    assert heart.username == "Aria"


def test_a_vote_is_announced_once_under_its_lease(outbox: Outbox) -> None:
    _keep(outbox)
    [heart] = outbox.claim_hearts("a", limit=10, lease=60)
    # Held: nobody else claims it while the lease runs.
    assert outbox.claim_hearts("b", limit=10, lease=60) == []
    assert outbox.finish_heart(heart.heart_id, "b") is False
    assert outbox.finish_heart(heart.heart_id, "a") is True
    assert outbox.finish_heart(heart.heart_id, "a") is False
    assert outbox.claim_hearts("b", limit=10, lease=60) == []
    assert outbox.heart_stats().granted == 1


def test_a_failed_announcement_comes_back_when_due(outbox: Outbox, clock: FakeClock) -> None:
    _keep(outbox)
    [heart] = outbox.claim_hearts("a", limit=10, lease=60)
    assert outbox.release_heart(heart.heart_id, "a", retry_at=clock() + 5) is True
    assert outbox.claim_hearts("b", limit=10, lease=60) == []
    clock.advance(5)
    [again] = outbox.claim_hearts("b", limit=10, lease=60)
    assert again.heart_id == heart.heart_id
    assert again.attempts == 2


def test_a_test_callback_is_kept_and_never_announced(outbox: Outbox) -> None:
    assert _keep(outbox, "test-1", event="heart.test") is True
    assert outbox.claim_hearts("a", limit=10, lease=60) == []
    assert outbox.heart_stats() == HeartStats(received=0, granted=0, tests=1)


def test_a_vote_kept_in_the_callers_transaction_is_kept_only_if_it_commits(
    outbox: Outbox,
) -> None:
    with outbox.engine.connect() as conn, conn.begin() as transaction:
        payload = json.dumps(VOTE).encode()
        assert outbox.record_heart(
            heart_id="h1",
            event="heart.counted",
            username="Aria",
            payload=payload,
            connection=conn,
        )
        transaction.rollback()
    assert outbox.heart_stats().received == 0
    with outbox.engine.begin() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(outbox.hearts)).scalar() == 0
