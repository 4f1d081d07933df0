"""MMOLove's reward callbacks (votes), verified as the portal receives them: the bare-hex
``t=<t>,v1=<hex>`` signature against vectors computed by openssl (an implementation of
HMAC-SHA256 that is not ours), rotation with two secrets, the replay window both ways,
any single byte changed refused (Hypothesis), the two header forms kept apart, bodies
that are signed but not votes, and the legacy GET. Pure: no network, no Flask.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flask_mmolove import (
    CallbackPayloadError,
    check_heart_callback,
    check_legacy_get,
    verify_heart_callback,
    verify_legacy_get,
    verify_signature,
)
from flask_mmolove.protocol import (
    BadSignatureError,
    MalformedSignatureError,
    StaleSignatureError,
    parse_callback_signature,
    sign_heart_callback,
    sign_legacy_get,
    sign_referral_body,
)

SECRET = "cb-secret-4f1d"
T = 1_780_000_000
BODY = (
    b'{"event":"heart.counted","server_id":"3f1c2a4e-0000-4000-8000-000000000001",'
    b'"username":"Aria","heart_id":"9b2d6c1e-1111-4222-8333-444455556666",'
    b'"period":"2026-05","timestamp":1780000000,"streak_day":7,"first_heart":false}'
)

FAST = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def _openssl_hmac(secret: str, message: bytes) -> str:
    """HMAC-SHA256 by openssl's own implementation, lower-case hex."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    done = subprocess.run(
        ["openssl", "dgst", "-sha256", "-hmac", secret],
        input=message,
        capture_output=True,
        check=True,
    )
    return done.stdout.decode().strip().rsplit(" ", 1)[-1]


def test_the_header_matches_openssls_hmac_over_t_dot_body() -> None:
    expected = _openssl_hmac(SECRET, b"%d." % T + BODY)
    assert sign_heart_callback(SECRET, BODY, T) == f"t={T},v1={expected}"


def test_a_vote_signed_as_openssl_signs_it_is_accepted_whole() -> None:
    header = f"t={T},v1={_openssl_hmac(SECRET, b'%d.' % T + BODY)}"
    event = check_heart_callback(BODY, header, SECRET, now=T)
    # Every field as sent, the optional ones included.
    assert event == json.loads(BODY)
    # The body as text verifies the same (MMOLove's verifier takes str or bytes).
    assert check_heart_callback(BODY.decode(), header, SECRET, now=T) == event


def test_the_legacy_get_matches_openssls_hmac_over_username_bar_ts() -> None:
    expected = _openssl_hmac(SECRET, f"Aria|{T}".encode())
    query = sign_legacy_get(SECRET, "Aria", T)
    assert query == {"username": "Aria", "ts": str(T), "sig": expected}
    assert check_legacy_get(query, SECRET, now=T) == {"username": "Aria", "ts": T}


def test_either_secret_verifies_during_a_rotation() -> None:
    old, new = "old-callback-secret", "new-callback-secret"
    for secret in (old, new):
        header = sign_heart_callback(secret, BODY, T)
        assert check_heart_callback(BODY, header, [new, old], now=T)["username"] == "Aria"
    # Once the old one is dropped from the list, what it signed is refused.
    with pytest.raises(BadSignatureError, match="callback secret"):
        check_heart_callback(BODY, sign_heart_callback(old, BODY, T), [new], now=T)


@pytest.mark.parametrize("drift", [-300, 300])
def test_the_replay_window_holds_300_s_either_way(drift: int) -> None:
    header = sign_heart_callback(SECRET, BODY, T)
    assert check_heart_callback(BODY, header, SECRET, now=T + drift)
    with pytest.raises(StaleSignatureError, match="outside the ±300 s window"):
        check_heart_callback(BODY, header, SECRET, now=T + drift + (1 if drift > 0 else -1))
    query = sign_legacy_get(SECRET, "Aria", T)
    assert check_legacy_get(query, SECRET, now=T + drift)
    with pytest.raises(StaleSignatureError):
        check_legacy_get(query, SECRET, now=T + 2 * drift)


def test_the_two_header_forms_are_kept_apart() -> None:
    referral_form = sign_referral_body(SECRET, BODY, T)  # t=..,v1=sha256=<hex>
    with pytest.raises(MalformedSignatureError, match="Referral Kit's form"):
        check_heart_callback(BODY, referral_form, SECRET, now=T)
    callback_form = sign_heart_callback(SECRET, BODY, T)  # t=..,v1=<hex>
    with pytest.raises(MalformedSignatureError, match="reward-callback form"):
        verify_signature(SECRET, BODY, callback_form, now=T)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "t=1",
        "v1=" + "a" * 64,
        f"t={T},v1=" + "A" * 64,
        f"t={T},v1=abc",
        f"t=0{T},v1=" + "a" * 64,
    ],
)
def test_a_malformed_header_is_named_and_refused(header: str) -> None:
    with pytest.raises(MalformedSignatureError):
        parse_callback_signature(header)
    assert verify_heart_callback(BODY, header, SECRET) is None


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"event": "heart.counted", "username": "Aria"}', "server_id, heart_id"),
        (
            b'{"event": "heart.refunded", "server_id": "s", "username": "u", "heart_id": "h"}',
            "not one of heart.counted, heart.test",
        ),
        (b'{"event":"heart.counted","server_id":"s","username":7,"heart_id":"h"}', "username"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_a_signed_body_that_is_no_vote_is_refused_with_its_reason(body: bytes, error: str) -> None:
    header = sign_heart_callback(SECRET, body, T)
    with pytest.raises(CallbackPayloadError, match=error):
        check_heart_callback(body, header, SECRET, now=T)


def test_the_verifier_shaped_like_mmoloves_returns_none_for_any_failure() -> None:
    assert verify_heart_callback(BODY, sign_heart_callback(SECRET, BODY), SECRET) is not None
    assert verify_heart_callback(BODY, sign_heart_callback("other", BODY), SECRET) is None
    assert verify_heart_callback(BODY, sign_heart_callback(SECRET, BODY, T), SECRET) is None
    unsigned_junk = b"{}"
    assert verify_heart_callback(unsigned_junk, sign_heart_callback(SECRET, b"{}"), SECRET) is None
    vote = verify_legacy_get(sign_legacy_get(SECRET, "Aria"), SECRET)
    assert vote is not None
    assert vote["username"] == "Aria"
    assert verify_legacy_get({"username": "Aria", "ts": "1", "sig": "0" * 64}, SECRET) is None
    assert verify_legacy_get({}, SECRET) is None


def test_an_empty_secret_never_verifies() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        check_heart_callback(BODY, sign_heart_callback(SECRET, BODY, T), "", now=T)
    with pytest.raises(ValueError, match="non-empty"):
        check_legacy_get(sign_legacy_get(SECRET, "Aria", T), [], now=T)


@FAST
@given(position=st.integers(min_value=0, max_value=len(BODY) - 1), flip=st.integers(1, 255))
def test_property_any_byte_of_the_body_changed_is_refused(position: int, flip: int) -> None:
    header = sign_heart_callback(SECRET, BODY, T)
    tampered = bytearray(BODY)
    tampered[position] ^= flip
    with pytest.raises(BadSignatureError):
        check_heart_callback(bytes(tampered), header, SECRET, now=T)


@FAST
@given(data=st.data())
def test_property_any_character_of_the_mac_changed_is_refused(data: st.DataObject) -> None:
    header = sign_heart_callback(SECRET, BODY, T)
    mac_start = header.index("v1=") + 3
    position = data.draw(st.integers(min_value=mac_start, max_value=len(header) - 1))
    replacement = data.draw(
        st.sampled_from("0123456789abcdef").filter(lambda c: c != header[position])
    )
    tampered = header[:position] + replacement + header[position + 1 :]
    with pytest.raises(BadSignatureError):
        check_heart_callback(BODY, tampered, SECRET, now=T)


@FAST
@given(
    username=st.text(min_size=1, max_size=40).filter(lambda u: "|" not in u),
    other=st.text(max_size=3),
)
def test_property_a_legacy_query_for_another_player_is_refused(username: str, other: str) -> None:
    query = sign_legacy_get(SECRET, username, T)
    assert check_legacy_get(query, SECRET, now=T)["username"] == username
    changed = {**query, "username": username + other} if other else {**query, "ts": str(T + 1)}
    with pytest.raises(BadSignatureError):
        check_legacy_get(changed, SECRET, now=T)
