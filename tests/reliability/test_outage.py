"""Item 1: MMOLove fails for a while, then recovers: every event lands exactly once.

Also the ordering a backlog needs: after an outage a referee's ``registered`` and
``qualified`` are both pending; ``qualified`` must never overtake ``registered``
(MMOLove would answer 422 and the referrer would never be credited).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from portal import Recorder
from reliability_support import (
    assert_exactly_once,
    outbox_of,
    qualify,
    record_figures,
    register,
    state,
)
from support import wait_for

from flask_mmolove import MMOLove


def test_registered_is_sent_before_qualified(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    """Both pending at once, concurrency 4, MMOLove slow on the first: order holds."""
    app = make_portal(MMOLOVE_CONCURRENCY=4)
    recorder = Recorder(app)
    register(app, mmolove_sandbox.mint_token(), "ayla")
    qualify(app, "ayla")
    # Hold the first request MMOLove sees: a qualified sent alongside it would win.
    mmolove_sandbox.delay_next(1, 0.3)
    passes = 0
    while outbox_of(app).stats().delivered < 2 and passes < 10:
        state(app).deliverer.run_once()
        passes += 1
    verdicts = [(r.event, r.verdict) for r in mmolove_sandbox.events]
    assert verdicts == [("registered", "advanced"), ("qualified", "advanced")]
    assert [c["identity"] for c in recorder.credited] == ["ayla"]
    recorder.disconnect()


def test_qualified_waits_for_a_registered_in_flight_elsewhere(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    """Two deliverers on one outbox: one holds ``registered`` (MMOLove is slow), the
    other tries ``qualified`` meanwhile; it must wait, not earn a 422."""
    app = make_portal()
    other = make_portal()  # another process's deliverer on the same database file
    recorders = [Recorder(app), Recorder(other)]
    register(app, mmolove_sandbox.mint_token(), "bo")
    qualify(app, "bo")
    reg, qual = sorted(outbox_of(app).list_events(), key=lambda e: e.id)
    assert (reg.event, qual.event) == ("registered", "qualified")
    mmolove_sandbox.delay_next(1, 0.6)
    first = threading.Thread(target=lambda: state(app).deliverer.run_once(ids=[reg.id]))
    first.start()
    wait_for(lambda: outbox_of(app).get(reg.id).lease_owner, 5, "the registered claim")
    report = state(other).deliverer.run_once(ids=[qual.id])
    first.join()
    assert report.dead == 0
    assert [r.event for r in mmolove_sandbox.events] == ["registered"]
    assert outbox_of(app).get(qual.id).state == "pending"
    # Once registered is in, qualified goes at the next pass: no lease or backoff wait.
    assert state(other).deliverer.run_once().delivered == 1
    assert [(r.event, r.verdict) for r in mmolove_sandbox.events] == [
        ("registered", "advanced"),
        ("qualified", "advanced"),
    ]
    assert [len(r.credited) for r in recorders] == [0, 1]
    for recorder in recorders:
        recorder.disconnect()


@pytest.mark.slow
def test_outage_then_recovery_every_event_accepted_once(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    """K = 500 events (250 referees, registered and qualified) written while MMOLove
    answers 500; it recovers; all land exactly once, none dead, soon after."""
    referees = 250
    app = make_portal(
        MMOLove(),
        MMOLOVE_DELIVERY="thread",
        MMOLOVE_RETRY_BASE=0.05,
        MMOLOVE_RETRY_CAP=0.4,
        MMOLOVE_POLL_INTERVAL=0.5,
    )
    recorder = Recorder(app)
    mmolove_sandbox.fail_next(10**6, status=500)
    started = time.monotonic()
    pairs = []
    for i in range(referees):
        identity = f"o{i}"
        token = mmolove_sandbox.mint_token(f"friend{i % 5}")
        register(app, token, identity)
        qualify(app, identity)
        pairs.append((identity, token))
    outbox = outbox_of(app)
    assert outbox.stats().delivered == 0
    # The outage lasts until every registered has been refused at least twice.
    wait_for(
        lambda: sum(r.status == 500 for r in mmolove_sandbox.events) >= 2 * referees,
        60,
        "two refused attempts per registered",
    )
    failed_posts = sum(r.status == 500 for r in mmolove_sandbox.events)
    outage = time.monotonic() - started
    mmolove_sandbox.clear_faults()
    recovered = time.monotonic()
    wait_for(lambda: outbox.stats().delivered == 2 * referees, 60, "every event delivered")
    drain = time.monotonic() - recovered
    wait_for(lambda: len(recorder.credited) >= referees, 10, "every credit")
    time.sleep(0.3)  # anything extra would show up now

    duplicates = assert_exactly_once(mmolove_sandbox, pairs, ["registered", "qualified"])
    stats = outbox.stats()
    assert (stats.pending, stats.in_flight, stats.dead) == (0, 0, 0)
    assert recorder.rejected == []
    assert sorted(c["identity"] for c in recorder.credited) == sorted(i for i, _ in pairs)
    refused_422 = [r for r in mmolove_sandbox.events if r.status == 422]
    assert refused_422 == []
    # Soon after recovery: at most one capped backoff plus the time to send them all.
    assert drain < 0.4 * 1.25 + 15
    attempts = sum(e.attempts for e in outbox.list_events(limit=10_000))
    record_figures(
        "1 outage",
        events=2 * referees,
        outage_s=outage,
        refused_posts=failed_posts,
        total_posts=len(mmolove_sandbox.events),
        claims=attempts,
        duplicates=duplicates,
        dead=stats.dead,
        drain_after_recovery_s=drain,
    )
    recorder.disconnect()
