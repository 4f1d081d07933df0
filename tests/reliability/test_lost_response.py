"""Item 2: MMOLove writes an event, then the connection drops before its answer.

The retry is answered ``duplicate``; the outbox records the event delivered; the
portal hears ``referee_registered`` / ``referrer_credited`` exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from portal import Recorder
from reliability_support import (
    outbox_of,
    qualify,
    record_figures,
    register,
    wait_until,
)

from flask_mmolove import Outcome


@pytest.mark.slow
def test_lost_answers_are_retried_as_duplicates_and_credited_once(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    referees = 10
    app = make_portal(MMOLOVE_DELIVERY="thread")
    recorder = Recorder(app)
    outbox = outbox_of(app)
    tokens = {}
    started = time.monotonic()
    # Every registered's first answer is lost after MMOLove wrote it...
    mmolove_sandbox.drop_next(referees, after_commit=True)
    for i in range(referees):
        identity = f"l{i}"
        tokens[identity] = mmolove_sandbox.mint_token(f"friend{i}")
        register(app, tokens[identity], identity)
    wait_until(lambda: len(recorder.registered) >= referees, 20, "every registered")
    # ... and so is every qualified's.
    mmolove_sandbox.drop_next(referees, after_commit=True)
    for identity in tokens:
        qualify(app, identity)
    wait_until(lambda: len(recorder.credited) >= referees, 20, "every credit")
    elapsed = time.monotonic() - started
    time.sleep(0.5)  # further passes must announce nothing more
    for identity, token in tokens.items():
        for event in ("registered", "qualified"):
            verdicts = [
                r.verdict for r in mmolove_sandbox.events if (r.token, r.event) == (token, event)
            ]
            dropped = [
                r.dropped for r in mmolove_sandbox.events if (r.token, r.event) == (token, event)
            ]
            assert verdicts == ["advanced", "duplicate"], (identity, event, verdicts)
            assert dropped == [True, False]
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
