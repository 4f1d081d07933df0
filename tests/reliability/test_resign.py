"""Item 6: a retry long after the first attempt is signed anew (fresh ``t``) over the
very same body bytes, and so is accepted where a replayed first request is refused."""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from typing import Any

import pytest
import requests
from flask import Flask
from reliability_support import outbox_of, record_figures, register, state
from support import FakeClock

import flask_mmolove.protocol.signatures as protocol
from flask_mmolove import MMOLove
from flask_mmolove.protocol import (
    SIGNATURE_HEADER,
    StaleSignatureError,
    parse_signature_header,
    verify_signature,
)

#: Real time between attempts, as MMOLove and the signer see it: 10 min, 1 h, 1 day.
GAPS = [600.0, 3600.0, 86400.0]


def test_late_retries_carry_a_fresh_t_and_the_same_bytes(
    make_portal: Callable[..., Flask],
    mmolove_sandbox_factory: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    offset = [0.0]

    def later() -> float:
        return time.time() + offset[0]

    # MMOLove's clock and the signer's clock move together; so does the deliverer's.
    sandbox = mmolove_sandbox_factory(clock=later)
    monkeypatch.setattr(protocol, "time", types.SimpleNamespace(time=later))
    clock = FakeClock()
    app = make_portal(
        MMOLove(clock=clock, jitter=lambda: 0.5),
        MMOLOVE_ENDPOINT=sandbox.endpoint,
        MMOLOVE_SERVER_ID=sandbox.server_id,
        MMOLOVE_REFERRAL_SECRET=sandbox.secret,
        MMOLOVE_RETRY_BASE=600.0,
        MMOLOVE_RETRY_CAP=86400.0,
    )
    register(app, sandbox.mint_token(), "r1")
    [stored] = outbox_of(app).list_events()
    sandbox.fail_next(len(GAPS), status=503)
    assert state(app).deliverer.run_once().retried == 1
    for gap in GAPS:
        offset[0] += gap
        clock.advance(gap)
        assert state(app).deliverer.run_once().claimed == 1
    records = sandbox.events
    assert [r.status for r in records] == [503, 503, 503, 200]
    assert records[-1].verdict == "advanced"
    # Byte for byte the body that was stored when the player registered.
    for record in records:
        assert record.body == stored.body
    times = [parse_signature_header(r.signature).t for r in records]
    for before, after, gap in zip(times[:-1], times[1:], GAPS, strict=True):
        assert after - before >= gap - 1
    assert len({r.signature for r in records}) == len(records)
    # The last attempt's header authenticates the body now; the first one no longer
    # does, and MMOLove refuses it when replayed.
    now = int(later())
    verify_signature(sandbox.secret, records[-1].body, records[-1].signature, now=now)
    with pytest.raises(StaleSignatureError):
        verify_signature(sandbox.secret, records[0].body, records[0].signature, now=now)
    replay = requests.post(
        sandbox.endpoint,
        data=records[0].body,
        headers={"Content-Type": "application/json", SIGNATURE_HEADER: records[0].signature},
        timeout=5,
    )
    assert replay.status_code == 401
    assert outbox_of(app).get(stored.id).state == "delivered"
    record_figures(
        "6 re-signing",
        attempts=len(records),
        span_s=times[-1] - times[0],
        distinct_t=len(set(times)),
        distinct_bodies=len({r.body for r in records}),
        replayed_first_request=replay.status_code,
    )
