"""Reading the outbox: counts by state and the oldest pending age, when something is
next due, listing and getting events (a body never in a repr), and purging old
deliveries while the credits they earned stay owed.
"""

from __future__ import annotations

import pytest
from outbox_support import T0, _accept, _enqueue
from support import FakeClock

from flask_mmolove.outbox import DEAD, DELIVERED, PENDING, Outbox


def test_stats_and_oldest_age(outbox: Outbox, clock: FakeClock) -> None:
    empty = outbox.stats()
    assert (empty.pending, empty.in_flight, empty.delivered, empty.dead) == (0, 0, 0, 0)
    assert empty.oldest_pending_age is None
    assert empty.credits_unnotified == 0
    ids = []
    for n in range(5):
        ids.append(_enqueue(outbox, n))
        clock.advance(10)
    outbox.claim("a", limit=3, lease=100)
    assert outbox.complete(ids[0], "a", status=200, response="", outcome="test", credit=False)
    assert outbox.dead_letter(ids[1], "a", status=400, reason="malformed", error="")
    stats = outbox.stats()
    assert (stats.pending, stats.in_flight, stats.delivered, stats.dead) == (2, 1, 1, 1)
    # ids[2] (created at T0 + 20) is the oldest still undelivered.
    assert stats.oldest_pending_age == pytest.approx(50 - 20)
    clock.advance(100)
    stats = outbox.stats()
    assert (stats.pending, stats.in_flight) == (3, 0)
    assert stats.oldest_pending_age == pytest.approx(150 - 20)


def test_next_due_at(outbox: Outbox, clock: FakeClock) -> None:
    assert outbox.next_due_at() is None
    first = _enqueue(outbox, 1)
    clock.advance(5)
    second = _enqueue(outbox, 2)
    assert outbox.next_due_at() == T0
    outbox.claim("a", limit=1, lease=30)
    assert outbox.next_due_at() == T0 + 5
    outbox.claim("a", limit=1, lease=30)
    # Both in flight: the earliest lease expiry is when something could be due.
    assert outbox.next_due_at() == T0 + 35
    assert outbox.reschedule(second, "a", at=T0 + 20, status=None, reason="t", error="")
    assert outbox.next_due_at() == T0 + 20
    assert outbox.complete(first, "a", status=200, response="", outcome="advanced", credit=True)
    # The credit waiting to be announced is due now.
    assert outbox.next_due_at() == T0 + 5
    [credit] = outbox.claim_credits("a", limit=1, lease=30)
    assert outbox.release_credit(credit.identity, "a", retry_at=T0 + 300)
    assert outbox.next_due_at() == T0 + 20
    clock.advance(15)
    [again] = outbox.claim("a", limit=1, lease=30)
    assert again.id == second
    assert outbox.dead_letter(second, "a", status=None, reason="t", error="")
    assert outbox.next_due_at() == T0 + 300


def test_list_and_get(outbox: Outbox, clock: FakeClock) -> None:
    ids = [_enqueue(outbox, n) for n in range(5)]
    outbox.claim("a", limit=1, lease=30)
    assert outbox.dead_letter(ids[0], "a", status=422, reason="invalid_transition", error="")
    assert [e.id for e in outbox.list_events()] == ids[::-1]
    assert [e.id for e in outbox.list_events(limit=2, offset=1)] == [ids[3], ids[2]]
    assert [e.id for e in outbox.list_events(state=DEAD)] == [ids[0]]
    assert [e.id for e in outbox.list_events(state=PENDING, limit=2)] == [ids[4], ids[3]]
    assert outbox.list_events(state=DELIVERED) == []
    with pytest.raises(ValueError, match="state"):
        outbox.list_events(state="lost")
    event = outbox.get(ids[1])
    assert event is not None
    assert (event.event, event.token, event.identity, event.server_event_id) == (
        "registered",
        "tok-player-1-1",
        "player-1",
        "reg-player-1-1",
    )
    assert b"body" not in repr(event).encode()
    assert "body=" not in repr(event)
    assert outbox.get(10_000) is None


def test_purge_removes_only_old_deliveries(outbox: Outbox, clock: FakeClock) -> None:
    old, recent, dead, pending = (_enqueue(outbox, n, event="qualified") for n in range(4))
    outbox.claim("a", limit=3, lease=30)
    assert outbox.complete(old, "a", status=200, response="", outcome="advanced", credit=True)
    assert outbox.dead_letter(dead, "a", status=404, reason="not_found", error="")
    clock.advance(100)
    assert _accept(outbox, recent, "a")
    assert outbox.purge(before=T0 + 50) == 1
    assert outbox.get(old) is None
    assert [e.id for e in outbox.list_events()] == [pending, dead, recent]
    # The credit the purged event earned is still owed.
    [credit] = outbox.claim_credits("a", limit=5, lease=30)
    assert credit.event_id == old
