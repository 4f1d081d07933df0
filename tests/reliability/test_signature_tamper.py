"""Item 12: verification rejects every single-byte change to the body or the header,
and every timestamp outside the replay window (and accepts every one inside it)."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st
from reliability_support import record_figures

from flask_mmolove.protocol import (
    DEFAULT_TOLERANCE,
    SIGNATURE_HEADER,
    SignatureError,
    StaleSignatureError,
    build_body,
    parse_signature_header,
    sign_referral_body,
    verify_signature,
)

SECRET = "whsec_tamper-test-secret-0123456789"
NOW = 1_800_000_000
BODY = build_body(
    "registered",
    token="eyJzIjoic3J2LTEiLCJyIjoiZnJpZW5kIn0.c2lnbmF0dXJl",
    server_id="srv-1",
    server_event_id="reg-7842",
    referee_identity="player-7842",
    ts=NOW - 5,
)


def substitutions(data: bytes) -> Any:
    for i, original in enumerate(data):
        for value in range(256):
            if value != original:
                yield data[:i] + bytes([value]) + data[i + 1 :]


def deletions(data: bytes) -> Any:
    for i in range(len(data)):
        yield data[:i] + data[i + 1 :]


def rejected(secrets: Any, body: bytes, header: str) -> bool:
    try:
        verify_signature(secrets, body, header, now=NOW)
    except SignatureError:
        return True
    return False


def test_every_single_byte_change_to_the_body_is_rejected() -> None:
    header = sign_referral_body(SECRET, BODY, NOW)
    verify_signature(SECRET, BODY, header, now=NOW)  # the untouched pair passes
    checked = 0
    for tampered in [*substitutions(BODY), *deletions(BODY)]:
        assert rejected(SECRET, tampered, header), tampered
        checked += 1
    assert checked == len(BODY) * 256
    record_figures("12 body tampering", body_bytes=len(BODY), variants_rejected=checked)


@pytest.mark.parametrize("with_kid", [False, True], ids=["no-kid", "kid"])
def test_every_single_byte_change_to_the_header_is_rejected(with_kid: bool) -> None:
    # With a kid, the receiver maps key ids to secrets: then the kid is bound too.
    secrets: Any = {"k1": SECRET, "k2": SECRET + "-next"} if with_kid else SECRET
    header = sign_referral_body(SECRET, BODY, NOW, key_id="k1" if with_kid else None)
    verify_signature(secrets, BODY, header, now=NOW)
    raw = header.encode("latin-1")
    checked = 0
    kid_dropped = []
    for tampered in [*substitutions(raw), *deletions(raw)]:
        text = tampered.decode("latin-1")
        checked += 1
        if rejected(secrets, BODY, text):
            continue
        # The one change that passes: the kid field renamed into a field the parser
        # ignores ("kid=k1" -> "aid=k1"), which leaves a header *without* a kid, whose
        # t and MAC are the original ones: nothing signed was changed.
        parsed = parse_signature_header(text)
        assert with_kid, text
        assert parsed.key_id is None, text
        assert (parsed.t, parsed.macs) == (NOW, parse_signature_header(header).macs)
        assert ",kid=" not in text, text
        kid_dropped.append(text)
    record_figures(
        f"12 header tampering ({'kid' if with_kid else 'no kid'})",
        header_bytes=len(raw),
        variants=checked,
        rejected=checked - len(kid_dropped),
        accepted_kid_renamed=len(kid_dropped),
    )


@given(
    offset=st.integers(min_value=DEFAULT_TOLERANCE + 1, max_value=10**9),
    sign=st.sampled_from([-1, 1]),
)
def test_every_timestamp_outside_the_window_is_rejected(offset: int, sign: int) -> None:
    t = NOW + sign * offset
    if t <= 0:
        return  # not a timestamp at all; covered by the header tests
    header = sign_referral_body(SECRET, BODY, t)
    with pytest.raises(StaleSignatureError):
        verify_signature(SECRET, BODY, header, now=NOW)


@given(offset=st.integers(min_value=-DEFAULT_TOLERANCE, max_value=DEFAULT_TOLERANCE))
def test_every_timestamp_inside_the_window_is_accepted(offset: int) -> None:
    header = sign_referral_body(SECRET, BODY, NOW + offset)
    verify_signature(SECRET, BODY, header, now=NOW)


def test_the_sandbox_refuses_tampered_requests_over_http(mmolove_sandbox: Any) -> None:
    """A sample of the same tampering, sent to the live sandbox: nothing is accepted."""
    token = mmolove_sandbox.mint_token()
    body = build_body(
        "registered",
        token=token,
        server_id=mmolove_sandbox.server_id,
        server_event_id="reg-t1",
        referee_identity="t1",
    )
    now = int(time.time())
    header = sign_referral_body(mmolove_sandbox.secret, body, now)
    rng = random.Random(12)
    cases: list[tuple[bytes, str]] = []
    for _ in range(150):
        i = rng.randrange(len(body))
        value = rng.choice([v for v in range(256) if v != body[i]])
        cases.append((body[:i] + bytes([value]) + body[i + 1 :], header))
    printable = [chr(c) for c in range(0x21, 0x7F)]
    for _ in range(100):
        i = rng.randrange(len(header))
        cases.append((body, header[:i] + rng.choice(printable) + header[i + 1 :]))
    statuses = []
    with requests.Session() as http:
        # Signed just before sending, a few seconds outside the window, so the time
        # the request takes cannot bring it back in (the exact edge is tested above).
        for skew in (-DEFAULT_TOLERANCE - 3, DEFAULT_TOLERANCE + 3, -86_400, 86_400):
            stale = sign_referral_body(mmolove_sandbox.secret, body, int(time.time()) + skew)
            response = http.post(
                mmolove_sandbox.endpoint,
                data=body,
                headers={"Content-Type": "application/json", SIGNATURE_HEADER: stale},
                timeout=5,
            )
            assert response.status_code == 401, skew
            statuses.append(response.status_code)
        for tampered_body, tampered_header in cases:
            if (tampered_body, tampered_header) == (body, header):
                continue
            response = http.post(
                mmolove_sandbox.endpoint,
                data=tampered_body,
                headers={"Content-Type": "application/json", SIGNATURE_HEADER: tampered_header},
                timeout=5,
            )
            statuses.append(response.status_code)
        assert set(statuses) <= {400, 401}
        assert mmolove_sandbox.accepted_count() == 0
        # The untouched request is accepted: the refusals were about the tampering.
        ok = http.post(
            mmolove_sandbox.endpoint,
            data=body,
            headers={"Content-Type": "application/json", SIGNATURE_HEADER: header},
            timeout=5,
        )
    assert ok.status_code == 200
    assert mmolove_sandbox.accepted_count() == 1
    record_figures(
        "12 tampering over HTTP",
        requests=len(statuses),
        answered_400=statuses.count(400),
        answered_401=statuses.count(401),
        accepted=0,
    )
