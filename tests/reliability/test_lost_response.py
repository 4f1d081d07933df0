"""Item 2: MMOLove writes an event, then the connection drops before its answer.

The retry is answered ``duplicate``; the outbox records the event delivered; the
portal hears ``referee_registered`` / ``referrer_credited`` exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from flask import Flask
from portal import Recorder
from reliability_support import outbox_of, qualify, record_figures, register, state

from flask_mmolove import Outcome


def deliver_all(app: Flask, timeout: float = 20.0) -> int:
    """Passes, as ``flask mmolove worker`` runs them, until nothing is pending."""
    deliverer = state(app).deliverer
    passes = 0
    deadline = time.monotonic() + timeout
    while outbox_of(app).stats().pending + outbox_of(app).stats().in_flight:
        assert time.monotonic() < deadline, "delivery did not finish"
        deliverer.run_once()
        passes += 1
        time.sleep(0.02)
    deliverer.run_once()  # and the credits it owes
    return passes


def test_lost_answers_are_retried_as_duplicates_and_credited_once(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    referees = 10
    app = make_portal(MMOLOVE_RETRY_BASE=0.05, MMOLOVE_RETRY_CAP=0.1)
    recorder = Recorder(app)
    outbox = outbox_of(app)
    tokens = {}
    started = time.monotonic()
    for i in range(referees):
        identity = f"l{i}"
        tokens[identity] = mmolove_sandbox.mint_token(f"friend{i}")
        register(app, tokens[identity], identity)
    # The first pass sends each registered once: MMOLove writes each, and each
    # answer is lost on the way back.
    mmolove_sandbox.drop_next(referees, after_commit=True)
    assert state(app).deliverer.run_once().claimed == referees
    assert mmolove_sandbox.state.faults == []
    deliver_all(app)
    assert len(recorder.registered) == referees
    # The same for every qualified.
    for identity in tokens:
        qualify(app, identity)
    mmolove_sandbox.drop_next(referees, after_commit=True)
    assert state(app).deliverer.run_once().claimed == referees
    assert recorder.credited == []
    deliver_all(app)
    elapsed = time.monotonic() - started
    for _ in range(5):  # further passes must announce nothing more
        state(app).deliverer.run_once()
    for identity, token in tokens.items():
        for event in ("registered", "qualified"):
            records = [r for r in mmolove_sandbox.events if (r.token, r.event) == (token, event)]
            assert [r.verdict for r in records] == ["advanced", "duplicate"], (identity, event)
            assert [r.dropped for r in records] == [True, False]
            assert mmolove_sandbox.accepted_posts(token, event) == 2
    assert mmolove_sandbox.accepted_count("registered") == referees
    assert mmolove_sandbox.accepted_count("qualified") == referees
    events = outbox.list_events(limit=100)
    assert {(e.state, e.outcome, e.attempts) for e in events} == {("delivered", "duplicate", 2)}
    assert all(e.last_status == 200 for e in events)
    assert Counter(c["identity"] for c in recorder.credited) == Counter(dict.fromkeys(tokens, 1))
    assert Counter(c["identity"] for c in recorder.registered) == Counter(dict.fromkeys(tokens, 1))
    assert {c["outcome"] for c in recorder.credited} == {Outcome.DUPLICATE}
    assert recorder.rejected == []
    assert outbox.stats().credits_unnotified == 0
    record_figures(
        "2 lost response",
        events=2 * referees,
        answers_lost=2 * referees,
        posts=len(mmolove_sandbox.events),
        duplicate_answers=sum(r.verdict == "duplicate" for r in mmolove_sandbox.events),
        credited=len(recorder.credited),
        all_credited_s=elapsed,
    )
    recorder.disconnect()
