"""verify_signature and the signature header: what passes, what is refused and as
which error (bad, stale, malformed), secret rotation and key ids, and secrets that are
a configuration error. Pure: no network, no Flask.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from protocol_support import BODY, SECRET, T

from flask_mmolove.protocol import (
    DEFAULT_TOLERANCE,
    BadSignatureError,
    BodyError,
    MalformedSignatureError,
    SignatureError,
    StaleSignatureError,
    parse_signature_header,
    sign_referral_body,
    verify_signature,
)


def test_verify_accepts_what_sign_produces() -> None:
    verify_signature(SECRET, BODY, sign_referral_body(SECRET, BODY, T), now=T)
    verify_signature(SECRET, BODY, sign_referral_body(SECRET, BODY))  # default now
    verify_signature(SECRET, BODY, sign_referral_body(SECRET, BODY, T, key_id="k1"), now=T)
    verify_signature(SECRET, bytearray(BODY), sign_referral_body(SECRET, BODY, T), now=T)
    verify_signature(SECRET, memoryview(BODY), sign_referral_body(SECRET, BODY, T), now=T)


def test_verify_rejects_wrong_secret_and_changed_body() -> None:
    header = sign_referral_body(SECRET, BODY, T)
    with pytest.raises(BadSignatureError):
        verify_signature("another-secret", BODY, header, now=T)
    with pytest.raises(BadSignatureError):
        verify_signature(SECRET, BODY + b" ", header, now=T)
    # Re-serialising (the classic integration bug) changes the bytes.
    reserialised = json.dumps(json.loads(BODY)).encode()
    assert reserialised != BODY
    with pytest.raises(BadSignatureError):
        verify_signature(SECRET, reserialised, header, now=T)


def test_verify_refuses_str_body() -> None:
    with pytest.raises(TypeError):
        verify_signature(SECRET, BODY.decode(), sign_referral_body(SECRET, BODY, T), now=T)  # type: ignore[arg-type]


@pytest.mark.parametrize("tolerance", [DEFAULT_TOLERANCE, 10, 0])
def test_verify_tolerance_boundaries(tolerance: int) -> None:
    header = sign_referral_body(SECRET, BODY, T)
    verify_signature(SECRET, BODY, header, now=T + tolerance, tolerance=tolerance)
    verify_signature(SECRET, BODY, header, now=T - tolerance, tolerance=tolerance)
    for now in (T + tolerance + 1, T - tolerance - 1):
        with pytest.raises(StaleSignatureError):
            verify_signature(SECRET, BODY, header, now=now, tolerance=tolerance)


def test_verify_default_tolerance_is_five_minutes() -> None:
    assert DEFAULT_TOLERANCE == 300
    header = sign_referral_body(SECRET, BODY, T)
    verify_signature(SECRET, BODY, header, now=T + 300)
    verify_signature(SECRET, BODY, header, now=T - 300)
    with pytest.raises(StaleSignatureError):
        verify_signature(SECRET, BODY, header, now=T + 301)
    with pytest.raises(StaleSignatureError):
        verify_signature(SECRET, BODY, header, now=T - 301)


def test_verify_stale_header_with_real_clock() -> None:
    header = sign_referral_body(SECRET, BODY, int(time.time()) - 3600)
    with pytest.raises(StaleSignatureError):
        verify_signature(SECRET, BODY, header)


@pytest.mark.parametrize("container", [list, tuple])
def test_verify_several_secrets_for_rotation(container: type[Sequence[str]]) -> None:
    secrets = container(["old-secret", "new-secret"])  # type: ignore[call-arg]
    for secret in ("old-secret", "new-secret"):
        verify_signature(secrets, BODY, sign_referral_body(secret, BODY, T), now=T)
    with pytest.raises(BadSignatureError):
        verify_signature(secrets, BODY, sign_referral_body("third", BODY, T), now=T)
    # No secret at all is a configuration error, not a bad signature.
    with pytest.raises(ValueError, match="every secret must be a non-empty string"):
        verify_signature(container([]), BODY, sign_referral_body("x", BODY, T), now=T)  # type: ignore[call-arg]


def _mac_of(header: str) -> str:
    match = re.search(r"v1=sha256=([0-9a-f]{64})", header)
    assert match is not None
    return match.group(1)


def test_verify_any_of_several_v1_entries() -> None:
    good = _mac_of(sign_referral_body(SECRET, BODY, T))
    bad = _mac_of(sign_referral_body("other", BODY, T))
    for header in (
        f"t={T},v1=sha256={bad},v1=sha256={good}",
        f"t={T},v1=sha256={good},v1=sha256={bad}",
        f"t={T},v1=sha256={bad},v1=sha256={bad},v1=sha256={good},kid=k",
        f"v1=sha256={bad},t={T},v1=sha256={good}",
    ):
        verify_signature(SECRET, BODY, header, now=T)
    with pytest.raises(BadSignatureError):
        verify_signature(SECRET, BODY, f"t={T},v1=sha256={bad},v1=sha256={bad}", now=T)


def test_verify_ignores_unknown_well_formed_fields() -> None:
    header = sign_referral_body(SECRET, BODY, T) + ",v2=whatever"
    verify_signature(SECRET, BODY, header, now=T)


def test_verify_kid_selects_the_secret() -> None:
    keys: Mapping[str, str] = {"k1": "secret-one", "k2": "secret-two"}
    verify_signature(keys, BODY, sign_referral_body("secret-two", BODY, T, key_id="k2"), now=T)
    verify_signature(keys, BODY, sign_referral_body("secret-one", BODY, T, key_id="k1"), now=T)
    # The right MAC under the wrong kid is refused: the kid names the only secret tried.
    with pytest.raises(BadSignatureError):
        verify_signature(keys, BODY, sign_referral_body("secret-one", BODY, T, key_id="k2"), now=T)
    # An unknown kid is refused even when the MAC matches one of the secrets.
    with pytest.raises(BadSignatureError, match="kid"):
        verify_signature(keys, BODY, sign_referral_body("secret-one", BODY, T, key_id="k3"), now=T)
    # No kid: any of the mapping's secrets may match.
    verify_signature(keys, BODY, sign_referral_body("secret-two", BODY, T), now=T)
    with pytest.raises(BadSignatureError):
        verify_signature(keys, BODY, sign_referral_body("secret-three", BODY, T), now=T)


def test_verify_single_secret_ignores_kid() -> None:
    verify_signature(SECRET, BODY, sign_referral_body(SECRET, BODY, T, key_id="any"), now=T)


_GOOD_HEADER = sign_referral_body(SECRET, BODY, T)


_GOOD_HEX = _mac_of(_GOOD_HEADER)


def _digits(zero: int) -> str:
    """``T`` written with the ten digits that start at code point ``zero``."""
    return "".join(chr(zero + int(d)) for d in str(T))


MALFORMED_HEADERS = [
    "",
    f"v1=sha256={_GOOD_HEX}",  # missing t
    f"t={T}",  # missing v1
    f"t={T},kid=k1",  # missing v1
    f"t={T},t={T},v1=sha256={_GOOD_HEX}",  # duplicate t
    f"t={T},v1=sha256={_GOOD_HEX},t={T}",  # duplicate t, later
    f"t=abc,v1=sha256={_GOOD_HEX}",
    f"t=,v1=sha256={_GOOD_HEX}",
    f"t=1.7e9,v1=sha256={_GOOD_HEX}",
    f"t=-{T},v1=sha256={_GOOD_HEX}",
    f"t=+{T},v1=sha256={_GOOD_HEX}",
    f"t=0,v1=sha256={_GOOD_HEX}",
    f"t=0{T},v1=sha256={_GOOD_HEX}",  # leading zero
    f"t=1{'0' * 18},v1=sha256={_GOOD_HEX}",  # absurdly long
    f"t={_digits(0x0660)},v1=sha256={_GOOD_HEX}",  # Arabic-Indic digits
    f"t={_digits(0xFF10)},v1=sha256={_GOOD_HEX}",  # fullwidth digits
    f"t={_digits(0x1D7CE)},v1=sha256={_GOOD_HEX}",  # mathematical bold digits
    f"t=17²,v1=sha256={_GOOD_HEX}",  # superscript: isdigit() but not a digit
    f"t={T}, v1=sha256={_GOOD_HEX}",  # spaces
    f" t={T},v1=sha256={_GOOD_HEX}",
    f"t={T},v1=sha256={_GOOD_HEX},ext=a b",  # a space even in an ignored field
    f"t={T},v1=sha256={_GOOD_HEX} ",
    f"t = {T},v1=sha256={_GOOD_HEX}",
    f"t={T},v1=sha256={_GOOD_HEX.upper()}",  # uppercase hex
    f"t={T},v1=sha256={_GOOD_HEX[:20].upper()}{_GOOD_HEX[20:]}",
    f"t={T},v1=sha256={_GOOD_HEX[:-1]}",  # 63 hex digits
    f"t={T},v1=sha256={_GOOD_HEX}0",  # 65 hex digits
    f"t={T},v1=sha256=",
    f"t={T},v1=sha256={'g' * 64}",
    f"t={T},v1={_GOOD_HEX}",  # the reward-callback form
    f"t={T},v1=sha1={_GOOD_HEX}",
    f"t={T},v1=SHA256={_GOOD_HEX}",
    f"t={T},v1:sha256={_GOOD_HEX}",
    f"T={T},V1=sha256={_GOOD_HEX}",
    f"t={T};v1=sha256={_GOOD_HEX}",
    f"t={T},v1=sha256={_GOOD_HEX},",  # trailing comma
    f",t={T},v1=sha256={_GOOD_HEX}",
    f"t={T},,v1=sha256={_GOOD_HEX}",
    f"t={T},v1=sha256={_GOOD_HEX},kid=",
    f"t={T},v1=sha256={_GOOD_HEX},kid=k1,kid=k1",  # duplicate kid
    f"t={T},v1=sha256={_GOOD_HEX},kid=a/b",
    f"t={T},v1=sha256={_GOOD_HEX},kid={'k' * 129}",
    f"t={T},v1=sha256={_GOOD_HEX},kid=ä",  # non-ASCII
    f"t={T},v1=sha256={_GOOD_HEX[:-1]}é",
    f"t={T},v1=sha256={_GOOD_HEX},x=\ud800",  # lone surrogate
    f"t={T},v1=sha256={_GOOD_HEX}\n",  # control characters
    f"t={T},v1=sha256={_GOOD_HEX}\r\nX-Injected: 1",
    f"t={T}\x00,v1=sha256={_GOOD_HEX}",
    f"t={T},v1=sha256={_GOOD_HEX}\t",
    f"t={T},v1=sha256={_GOOD_HEX}\x7f",
    f"t={T},v1=sha256={_GOOD_HEX}\u00a0",  # no-break space
    "t",
    "=",
    ",",
    "t=",
]


@pytest.mark.parametrize("header", MALFORMED_HEADERS)
def test_verify_malformed_headers(header: str) -> None:
    with pytest.raises(MalformedSignatureError):
        verify_signature(SECRET, BODY, header, now=T)
    with pytest.raises(MalformedSignatureError):
        parse_signature_header(header)


@pytest.mark.parametrize("header", [None, b"t=1,v1=sha256=00", 1700000000])
def test_verify_non_str_header_is_malformed(header: Any) -> None:
    with pytest.raises(MalformedSignatureError):
        verify_signature(SECRET, BODY, header, now=T)


def test_parse_signature_header_fields() -> None:
    parsed = parse_signature_header(f"t={T},v1=sha256={_GOOD_HEX},v1=sha256={'0' * 64},kid=k.1")
    assert parsed.t == T
    assert parsed.macs == (_GOOD_HEX, "0" * 64)
    assert parsed.key_id == "k.1"
    assert parse_signature_header(_GOOD_HEADER).key_id is None


def test_verify_body_that_is_not_utf8() -> None:
    body = b"\xff\xfe\xc3\x28\x80\x00{"
    header = sign_referral_body(SECRET, body, T)
    verify_signature(SECRET, body, header, now=T)
    with pytest.raises(BadSignatureError):
        verify_signature(SECRET, body[:-1], header, now=T)


def test_verify_checks_freshness_before_mac() -> None:
    # A stale header is reported as stale even under the wrong secret: the hint is the clock.
    header = sign_referral_body(SECRET, BODY, T)
    with pytest.raises(StaleSignatureError):
        verify_signature("wrong", BODY, header, now=T + 10_000)


@pytest.mark.parametrize(
    "secrets", ["", [""], ["real-secret", ""], {"k1": ""}, [b"bytes"], {"k1": None}]
)
def test_verify_refuses_empty_secret(secrets: Any) -> None:
    # Anyone can compute this MAC: the key is empty. A receiver whose secret came from an
    # unset-but-present environment variable must not accept it.
    forged_mac = hmac.new(b"", f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    # A configuration error, loud, and deliberately not a SignatureError.
    with pytest.raises(ValueError, match="every secret must be a non-empty string"):
        verify_signature(secrets, BODY, f"t={T},v1=sha256={forged_mac}", now=T)


@pytest.mark.parametrize("header", ["", "garbage", "t=1,v1=sha256=" + "0" * 64])
def test_missing_secret_fails_loudly_before_the_header_is_read(header: str) -> None:
    # A receiver deployed without its secret must learn it from the first request,
    # not answer every sender "malformed" or "stale".
    with pytest.raises(ValueError, match="non-empty"):
        verify_signature([], BODY, header, now=T)
    with pytest.raises(ValueError, match="non-empty"):
        verify_signature("", BODY, header, now=T)


def test_signature_error_hierarchy() -> None:
    assert not issubclass(SignatureError, ValueError)
    for cls in (MalformedSignatureError, BadSignatureError, StaleSignatureError):
        assert issubclass(cls, SignatureError)
        assert not issubclass(cls, ValueError)
    assert not issubclass(StaleSignatureError, BadSignatureError)
    assert not issubclass(MalformedSignatureError, BadSignatureError)
    assert issubclass(BodyError, ValueError)
