"""Settling claimed events: only the lease owner records an answer, once, and a late
owner whose lease was taken over is refused; failures are rescheduled or dead-lettered
and can be requeued; settle ends many claims at once and waits for a row lock rather
than refusing the lease. A referee is credited once, and credits are claimed,
released and finished under leases of their own.
"""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from outbox_support import T0, _accept, _count, _enqueue, _prefix
from support import FakeClock, postgres_url

from flask_mmolove.outbox import DEAD, DELIVERED, PENDING, TEXT_MAX, Ending, Outbox, make_engine


def test_complete_records_the_answer_only_for_the_lease_owner(
    outbox: Outbox, clock: FakeClock
) -> None:
    event_id = _enqueue(outbox)
    outbox.claim("a", limit=1, lease=30)
    clock.advance(2)
    assert not _accept(outbox, event_id, "b")
    assert not outbox.reschedule(event_id, "b", at=T0, status=None, reason="x", error="y")
    assert not outbox.dead_letter(event_id, "b", status=None, reason="x", error="y")
    untouched = outbox.get(event_id)
    assert untouched is not None
    assert untouched.lease_owner == "a"
    assert untouched.state == PENDING
    assert _accept(outbox, event_id, "a")
    done = outbox.get(event_id)
    assert done is not None
    assert (done.state, done.delivered_at, done.last_status) == (DELIVERED, T0 + 2, 200)
    assert (done.outcome, done.response, done.lease_owner, done.lease_until) == (
        "advanced",
        '{"ok":true}',
        None,
        None,
    )
    # Settled once: a second answer for the same claim changes nothing.
    assert not _accept(outbox, event_id, "a")
    assert not outbox.dead_letter(event_id, "a", status=None, reason="x", error="y")
    assert outbox.claim("a", limit=5, lease=30) == []


def test_a_lease_taken_over_refuses_the_late_owner(outbox: Outbox, clock: FakeClock) -> None:
    event_id = _enqueue(outbox)
    outbox.claim("slow", limit=1, lease=10)
    clock.advance(11)
    assert [e.id for e in outbox.claim("fast", limit=1, lease=10)] == [event_id]
    assert not _accept(outbox, event_id, "slow")
    assert _accept(outbox, event_id, "fast")


def test_reschedule_records_the_failure(outbox: Outbox, clock: FakeClock) -> None:
    event_id = _enqueue(outbox)
    outbox.claim("a", limit=1, lease=30)
    long_error = "E" * (TEXT_MAX + 500)
    assert outbox.reschedule(
        event_id, "a", at=T0 + 120, status=503, reason="server_error", error=long_error
    )
    event = outbox.get(event_id)
    assert event is not None
    assert (event.state, event.next_attempt_at, event.lease_owner) == (PENDING, T0 + 120, None)
    assert (event.last_status, event.last_reason) == (503, "server_error")
    assert event.last_error is not None
    assert len(event.last_error) == TEXT_MAX
    # The lease is gone: the old owner can no longer settle it.
    assert not outbox.reschedule(event_id, "a", at=T0, status=None, reason="x", error="")


def test_dead_letter_and_requeue(outbox: Outbox, clock: FakeClock) -> None:
    dead_a, dead_b, waiting, busy, done = (_enqueue(outbox, n) for n in range(5))
    outbox.claim("w", limit=5, lease=30)
    for event_id in (dead_a, dead_b):
        assert outbox.dead_letter(event_id, "w", status=404, reason="not_found", error="{}")
    assert outbox.reschedule(waiting, "w", at=T0 + 3600, status=None, reason="t", error="")
    assert outbox.complete(done, "w", status=200, response="{}", outcome="advanced", credit=False)
    dead = outbox.get(dead_a)
    assert dead is not None
    assert (dead.state, dead.last_status, dead.lease_owner) == (
        DEAD,
        404,
        None,
    )
    assert outbox.claim("w2", limit=10, lease=30) == []

    clock.advance(10)
    # By id: dead and backing-off events come back; in flight and delivered do not.
    assert outbox.requeue([dead_a, waiting, busy, done]) == 2
    assert outbox.requeue([]) == 0
    assert outbox.requeue() == 1  # the remaining dead one
    assert outbox.requeue() == 0
    for event_id in (dead_a, dead_b):
        event = outbox.get(event_id)
        assert event is not None
        assert (event.state, event.attempts, event.next_attempt_at) == (PENDING, 0, T0 + 10)
    requeued_waiting = outbox.get(waiting)
    assert requeued_waiting is not None
    assert requeued_waiting.attempts == 1
    claimed = outbox.claim("w2", limit=10, lease=30)
    assert sorted(e.id for e in claimed) == sorted([dead_a, dead_b, waiting])
    still_busy = outbox.get(busy)
    assert still_busy is not None
    assert still_busy.lease_owner == "w"


def test_settle_records_every_kind_of_ending_at_once(outbox: Outbox, clock: FakeClock) -> None:
    ids = [_enqueue(outbox, n) for n in range(5)]
    assert [ev.id for ev in outbox.claim("w", limit=4, lease=30)] == ids[:4]
    clock.advance(1)
    endings = [
        Ending.delivered(ids[0], status=200, response="{}", outcome="advanced", credit=True),
        Ending.delivered(ids[1], status=200, response="{}", outcome="duplicate", credit=False),
        Ending.retry(ids[2], at=T0 + 60, status=503, reason="server_error", error="busy"),
        Ending.dead(ids[3], status=404, reason="not_found", error="{}"),
        # Never claimed by "w": not its lease, left as it is.
        Ending.dead(ids[4], status=404, reason="not_found", error="{}"),
    ]
    assert outbox.settle("w", endings) == set(ids[:4])
    got = [outbox.get(i) for i in ids]
    assert [(g.state, g.outcome, g.lease_owner) for g in got if g] == [
        ("delivered", "advanced", None),
        ("delivered", "duplicate", None),
        ("pending", None, None),
        ("dead", None, None),
        ("pending", None, None),
    ]
    delivered, retried, untouched = got[0], got[2], got[4]
    assert delivered is not None
    assert delivered.delivered_at == T0 + 1
    assert retried is not None
    assert (retried.next_attempt_at, retried.last_error) == (T0 + 60, "busy")
    assert untouched is not None
    assert untouched.attempts == 0
    assert outbox.stats().credits_unnotified == 1
    # Settled once: a second try finds no lease to end.
    assert outbox.settle("w", endings[:1]) == set()
    with pytest.raises(ValueError, match="only once"):
        outbox.settle("w", [endings[2], endings[2]])


@pytest.mark.postgres
@pytest.mark.parametrize("foreign_key", [True, False], ids=["key share", "for update"])
def test_settle_waits_for_a_row_lock_it_does_not_refuse_the_lease(foreign_key: bool) -> None:
    # A portal's foreign key to the events table locks rows FOR KEY SHARE: no reason to
    # wait. A claimer's pick can hold a row FOR UPDATE for a moment and pass it by:
    # worth waiting for. Neither takes the lease, so the answer is never refused.
    engine = make_engine(postgres_url())
    outbox = Outbox(engine, table_prefix=_prefix())
    outbox.create_all()
    try:
        event_id = _enqueue(outbox)
        assert [ev.id for ev in outbox.claim("w", limit=1, lease=60)] == [event_id]
        e = outbox.events
        recorded: list[bool] = []

        def settle() -> None:
            recorded.append(_accept(outbox, event_id, "w"))

        with engine.connect() as other:
            other.execute(
                sa.select(e.c.id)
                .where(e.c.id == event_id)
                .with_for_update(read=foreign_key, key_share=foreign_key)
            )
            settler = threading.Thread(target=settle)
            settler.start()
            settler.join(5 if foreign_key else 0.5)
            # Not held up by a foreign key's lock.
            assert not (foreign_key and settler.is_alive())
            other.rollback()
        settler.join(10)
        assert recorded == [True]
        got = outbox.get(event_id)
        assert got is not None
        assert (got.state, got.lease_owner) == ("delivered", None)
    finally:
        outbox.drop_all()
        engine.dispose()


# --- credits ------------------------------------------------------------------------


def _deliver(box: Outbox, event_id: int, *, credit: bool, owner: str = "d") -> bool:
    claimed = box.claim(owner, limit=1, lease=30, ids=[event_id])
    assert [e.id for e in claimed] == [event_id]
    return box.complete(
        event_id, owner, status=200, response="{}", outcome="advanced", credit=credit
    )


def test_a_referee_is_credited_once(outbox: Outbox) -> None:
    first = _enqueue(outbox, 1, event="qualified")
    second = _enqueue(outbox, 2, event="qualified")
    uncredited = _enqueue(outbox, 3, identity="player-2", event="qualified")
    assert _deliver(outbox, first, credit=True)
    assert _deliver(outbox, second, credit=True)
    assert _deliver(outbox, uncredited, credit=False)
    credits = outbox.claim_credits("n", limit=10, lease=30)
    assert [(c.identity, c.token, c.event_id, c.outcome, c.attempts) for c in credits] == [
        ("player-1", "tok-player-1-1", first, "advanced", 1)
    ]
    assert outbox.stats().credits_unnotified == 1


def test_concurrent_completions_credit_once(outbox: Outbox) -> None:
    ids = [_enqueue(outbox, n, event="qualified") for n in range(6)]
    claimed = {e.id: e.lease_owner for e in outbox.claim("d", limit=10, lease=60)}
    assert sorted(claimed) == sorted(ids)
    start = threading.Barrier(len(ids))
    results: list[bool] = []

    def complete(event_id: int) -> None:
        start.wait()
        results.append(
            outbox.complete(
                event_id, "d", status=200, response="{}", outcome="advanced", credit=True
            )
        )

    threads = [threading.Thread(target=complete, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * len(ids)
    assert _count(outbox, outbox.credits) == 1


def test_credit_claim_finish_release_and_expiry(outbox: Outbox, clock: FakeClock) -> None:
    assert _deliver(outbox, _enqueue(outbox, event="qualified"), credit=True)
    [credit] = outbox.claim_credits("a", limit=5, lease=30)
    assert outbox.claim_credits("b", limit=5, lease=30) == []
    assert not outbox.finish_credit(credit.identity, "b")
    assert not outbox.release_credit(credit.identity, "b", retry_at=T0)
    # The receiver raised: try again later, not before.
    assert outbox.release_credit(credit.identity, "a", retry_at=T0 + 60)
    assert not outbox.finish_credit(credit.identity, "a")
    clock.advance(59)
    assert outbox.claim_credits("b", limit=5, lease=30) == []
    clock.advance(1)
    [again] = outbox.claim_credits("b", limit=5, lease=30)
    assert again.attempts == 2
    # "b" crashed mid-announcement: its lease expires and "c" takes over.
    clock.advance(30)
    [taken] = outbox.claim_credits("c", limit=5, lease=30)
    assert taken.identity == credit.identity
    assert taken.attempts == 3
    assert not outbox.finish_credit(credit.identity, "b")
    assert outbox.finish_credit(credit.identity, "c")
    assert not outbox.finish_credit(credit.identity, "c")
    clock.advance(3600)
    assert outbox.claim_credits("d", limit=5, lease=30) == []
    assert outbox.stats().credits_unnotified == 0
