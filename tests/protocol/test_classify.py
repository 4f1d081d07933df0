"""classify and outcome_of: what delivery does with each answer (delivered, retry,
dead; slowly or not; Retry-After read), and which outcome a 2xx body is. Pure: no
network, no Flask.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from protocol_support import T

from flask_mmolove.protocol import (
    Action,
    Decision,
    Outcome,
    classify,
    outcome_of,
    parse_json_object,
    retry_after_seconds,
)


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_classify_2xx_delivered(status: int) -> None:
    assert classify(status) == Decision(Action.DELIVERED, "accepted", "accepted by MMOLove")
    assert classify(status, retry_after="30").retry_after is None


@pytest.mark.parametrize(
    ("status", "reason"), [(400, "malformed"), (404, "not_found"), (422, "invalid_transition")]
)
def test_classify_documented_rejections_are_dead(status: int, reason: str) -> None:
    decision = classify(status, retry_after="30")
    assert decision.action is Action.DEAD
    assert decision.reason == reason
    assert decision.slow is False
    assert decision.retry_after is None


def test_classify_404_names_the_server_id_and_the_endpoint() -> None:
    # MMOLove answers 404 for an unknown server, and so does a wrong path.
    hint = classify(404).hint
    assert "MMOLOVE_SERVER_ID" in hint
    assert "MMOLOVE_ENDPOINT" in hint


def test_classify_401_retries_slowly() -> None:
    decision = classify(401, retry_after="30")
    assert decision.action is Action.RETRY
    assert decision.reason == "bad_signature"
    assert decision.slow is True
    assert decision.retry_after is None
    assert "MMOLOVE_REFERRAL_SECRET" in decision.hint
    assert "clock" in decision.hint


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (408, "rate_limited"),
        (429, "rate_limited"),
        (500, "server_error"),
        (502, "server_error"),
        (503, "server_error"),
        (504, "server_error"),
        (599, "server_error"),
    ],
)
def test_classify_retryable_statuses(status: int, reason: str) -> None:
    decision = classify(status)
    assert decision == Decision(
        Action.RETRY, reason, f"MMOLove answered {status}; retrying with backoff"
    )
    assert classify(status, retry_after="120").retry_after == 120.0
    assert classify(status, retry_after=" 7 ").retry_after == 7.0
    assert classify(status, retry_after="0").retry_after == 0.0
    assert classify(status, retry_after="soon").retry_after is None
    assert classify(status, retry_after="").retry_after is None
    assert classify(status, retry_after="-5").retry_after is None
    when = datetime.now(timezone.utc) + timedelta(seconds=90)
    seconds = classify(status, retry_after=format_datetime(when, usegmt=True)).retry_after
    assert seconds is not None
    assert 85.0 <= seconds <= 91.0


def test_retry_after_http_date_with_fixed_now() -> None:
    date = "Tue, 14 Nov 2023 22:13:20 GMT"  # = 1700000000
    assert retry_after_seconds(date, now=T - 45) == 45.0
    assert retry_after_seconds(date, now=T) == 0.0
    assert retry_after_seconds(date, now=T + 100) == 0.0  # in the past: no wait
    assert retry_after_seconds("Tue, 14 Nov 2023 22:13:20 +0000", now=T - 1) == 1.0
    assert retry_after_seconds("Tue, 14 Nov 2023 22:13:20", now=T - 2) == 2.0  # naive = UTC
    assert retry_after_seconds(date, now=T - 10**7) == 86_400.0  # capped at a day
    assert retry_after_seconds("99999999") == 86_400.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("Tue, 99 Foo 2023") is None
    assert retry_after_seconds("\u0661\u0662") is None  # non-ASCII digits


def test_classify_transport_failure_retries() -> None:
    decision = classify(None)
    assert decision.action is Action.RETRY
    assert decision.reason == "transport"
    assert decision.slow is False
    assert decision.retry_after is None


@pytest.mark.parametrize("status", [300, 301, 302, 303, 307, 308])
def test_classify_redirects_retry_slowly(status: int) -> None:
    decision = classify(status)
    assert decision.action is Action.RETRY
    assert decision.reason == "redirect"
    assert decision.slow is True
    assert "MMOLOVE_ENDPOINT" in decision.hint


@pytest.mark.parametrize("status", [402, 403, 405, 409, 410, 413, 415, 418, 451, 499])
def test_classify_other_4xx_dead(status: int) -> None:
    decision = classify(status)
    assert decision.action is Action.DEAD
    assert decision.reason == "unexpected_status"
    assert decision.slow is False
    assert str(status) in decision.hint


@pytest.mark.parametrize(
    ("text", "outcome"),
    [
        ('{"ok":true,"referral_id":"r_1","state":"registered"}', Outcome.ADVANCED),
        ('{"ok": true, "referral_id": "r_1", "state": "qualified"}', Outcome.ADVANCED),
        ('{"ok":true,"duplicate":true}', Outcome.DUPLICATE),
        ('{"ok":true,"ignored":"first_touch_conflict"}', Outcome.FIRST_TOUCH_CONFLICT),
        ('{"ok":true,"test":true}', Outcome.TEST),
        ('{"ok":true}', Outcome.ACCEPTED),
        ('{"ok":true,"referral_id":"r_1"}', Outcome.ACCEPTED),
        ('{"ok":true,"state":"registered"}', Outcome.ACCEPTED),
        ('{"ok":true,"duplicate":false}', Outcome.ACCEPTED),
        ('{"ok":true,"duplicate":"true"}', Outcome.ACCEPTED),
        ('{"ok":true,"test":1}', Outcome.ACCEPTED),
        ('{"ok":true,"ignored":"something_else"}', Outcome.ACCEPTED),
        ("{}", Outcome.ACCEPTED),
        ("[]", Outcome.ACCEPTED),
        ('"ok"', Outcome.ACCEPTED),
        ("", Outcome.ACCEPTED),
        ("<html>OK</html>", Outcome.ACCEPTED),
        ("[" * 100_000, Outcome.ACCEPTED),
    ],
)
def test_outcome_of(text: str, outcome: Outcome) -> None:
    assert outcome_of(parse_json_object(text)) is outcome
    assert outcome_of(parse_json_object(text.encode())) is outcome


def test_outcome_of_none_and_invalid_bytes() -> None:
    assert outcome_of(None) is Outcome.ACCEPTED
    assert parse_json_object(b"\xff\xfe") is None
    assert parse_json_object('{"a":1}') == {"a": 1}


@pytest.mark.parametrize("outcome", [Outcome.ADVANCED, Outcome.DUPLICATE, Outcome.TEST, None])
def test_documented_acceptances_are_delivered(outcome: Outcome | None) -> None:
    assert classify(200, outcome=outcome).action is Action.DELIVERED


def test_a_2xx_body_mmolove_does_not_document_is_held_for_a_person() -> None:
    decision = classify(200, outcome=Outcome.ACCEPTED)
    assert decision.action is Action.DEAD
    assert decision.reason == "unrecognised"
    assert "MMOLOVE_ENDPOINT" in decision.hint
    assert "flask mmolove retry" in decision.hint
