"""The protocol core: bodies, signatures and answers. Pure: no network, no Flask.

Golden MACs are computed independently with ``openssl dgst -sha256 -hmac`` so that a
shared misunderstanding between the signer and the verifier cannot hide.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flask_mmolove import ReferralClient
from flask_mmolove.protocol import (
    DEFAULT_TOLERANCE,
    FIELD_ORDER,
    Action,
    BadSignatureError,
    BodyError,
    Decision,
    MalformedSignatureError,
    Outcome,
    SignatureError,
    StaleSignatureError,
    build_body,
    classify,
    outcome_of,
    parse_json_object,
    parse_signature_header,
    retry_after_seconds,
    sign_referral_body,
    verify_signature,
)

T = 1_700_000_000
SECRET = "whsec_test_5f2a"
BODY = b'{"event":"qualified","token":"tok","server_id":"srv","server_event_id":"q-1","ts":1}'

FAST = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def openssl_hmac(secret: str, message: bytes) -> str:
    """HMAC-SHA256 of ``message`` keyed by the UTF-8 bytes of ``secret``, by openssl."""
    proc = subprocess.run(
        ["openssl", "dgst", "-sha256", "-hmac", secret],
        input=message,
        capture_output=True,
        check=True,
    )
    digest = proc.stdout.decode("ascii").rsplit("= ", 1)[1].strip()
    assert re.fullmatch(r"[0-9a-f]{64}", digest), proc.stdout
    return digest


# --- golden vectors ---------------------------------------------------------------


def test_hardcoded_golden_vector() -> None:
    # Computed once with:
    #   printf '1700000000.{"event":"registered"}' | openssl dgst -sha256 -hmac whsec_golden
    assert sign_referral_body("whsec_golden", b'{"event":"registered"}', T) == (
        "t=1700000000,v1=sha256=c01eb7a08487d692c1560c6c0671156bc22671ff6cb3378b6654b4d1cba849b5"
    )


GOLDEN_SECRETS = [
    "whsec_test_5f2a",
    "ünïcödé-秘密-🔑",  # non-ASCII: the key is its UTF-8 bytes, not hex-decoded
    "00112233445566778899aabbccddeeff",  # looks like hex; must still be used as text
    "k" * 200,  # longer than the SHA-256 block: HMAC hashes the key first
    "with spaces, commas=and;other$chars",
]
GOLDEN_BODIES = [
    b"",
    BODY,
    '{"token":"ä€😀"}'.encode(),  # raw non-ASCII UTF-8 bytes
    b'{"token":"\\u00e4\\u20ac\\ud83d\\ude00"}',  # the same text, \u-escaped
    b"\xff\xfe\x00not utf-8\x80",
]


@needs_openssl
@pytest.mark.parametrize("secret", GOLDEN_SECRETS)
@pytest.mark.parametrize("body", GOLDEN_BODIES)
@pytest.mark.parametrize("t", [1, T, 9_999_999_999])
def test_sign_matches_openssl(secret: str, body: bytes, t: int) -> None:
    expected = openssl_hmac(secret, str(t).encode() + b"." + body)
    assert sign_referral_body(secret, body, t) == f"t={t},v1=sha256={expected}"
    assert sign_referral_body(secret, body, t, key_id="key-2024.1") == (
        f"t={t},v1=sha256={expected},kid=key-2024.1"
    )
    verify_signature(secret, body, f"t={t},v1=sha256={expected}", now=t)


@needs_openssl
def test_sign_accepts_bytearray_and_memoryview() -> None:
    expected = f"t={T},v1=sha256={openssl_hmac(SECRET, f'{T}.'.encode() + BODY)}"
    assert sign_referral_body(SECRET, bytearray(BODY), T) == expected
    assert sign_referral_body(SECRET, memoryview(BODY), T) == expected


def test_sign_default_t_is_now() -> None:
    before = int(time.time())
    header = sign_referral_body(SECRET, BODY)
    after = int(time.time())
    match = re.fullmatch(r"t=([0-9]+),v1=sha256=([0-9a-f]{64})", header)
    assert match is not None, header
    t = int(match.group(1))
    assert before <= t <= after
    assert header == sign_referral_body(SECRET, BODY, t)


@pytest.mark.parametrize("t", [0, -1, True, 1.5, "1700000000"])
def test_sign_rejects_bad_t(t: Any) -> None:
    with pytest.raises(ValueError, match="t must be a positive whole number"):
        sign_referral_body(SECRET, BODY, t)


@pytest.mark.parametrize("secret", ["", None, b"bytes-secret"])
def test_sign_rejects_bad_secret(secret: Any) -> None:
    with pytest.raises(ValueError, match="secret must be a non-empty string"):
        sign_referral_body(secret, BODY, T)


@pytest.mark.parametrize("key_id", ["", "has space", "ä", "a,b", "a=b", "k" * 129])
def test_sign_rejects_bad_key_id(key_id: str) -> None:
    with pytest.raises(ValueError, match="key_id must be"):
        sign_referral_body(SECRET, BODY, T, key_id=key_id)


def test_sign_refuses_str_body() -> None:
    with pytest.raises(TypeError, match="raw bytes"):
        sign_referral_body(SECRET, BODY.decode(), T)  # type: ignore[arg-type]


# --- build_body -------------------------------------------------------------------


def test_build_body_registered_exact_bytes() -> None:
    body = build_body(
        "registered",
        token="tok-abc",
        server_id="srv-1",
        server_event_id="reg-7842",
        referee_identity="7842",
        ts=T,
        test=True,
    )
    assert body == (
        b'{"event":"registered","token":"tok-abc","server_id":"srv-1",'
        b'"referee_identity":"7842","server_event_id":"reg-7842","ts":1700000000,"test":true}'
    )


def test_build_body_qualified_exact_bytes() -> None:
    body = build_body("qualified", token="tok-abc", server_id="srv-1", server_event_id="q-1", ts=T)
    assert body == (
        b'{"event":"qualified","token":"tok-abc","server_id":"srv-1",'
        b'"server_event_id":"q-1","ts":1700000000}'
    )


def test_build_body_reversed_and_optional_referee_identity_keeps_key_order() -> None:
    body = build_body(
        "reversed", token="t", server_id="s", server_event_id="rev-1", referee_identity="p", ts=5
    )
    assert body == (
        b'{"event":"reversed","token":"t","server_id":"s","referee_identity":"p",'
        b'"server_event_id":"rev-1","ts":5}'
    )


def test_build_body_trims_strings() -> None:
    body = build_body(
        " registered\n",
        token="\t tok ",
        server_id=" srv ",
        server_event_id=" reg-1 ",
        referee_identity="  p-1\r\n",
        ts=T,
    )
    assert body == (
        b'{"event":"registered","token":"tok","server_id":"srv",'
        b'"referee_identity":"p-1","server_event_id":"reg-1","ts":1700000000}'
    )


def test_build_body_escapes_non_ascii_and_is_ascii() -> None:
    body = build_body(
        "registered",
        token="ä€",
        server_id="srv",
        server_event_id="reg-😀",
        referee_identity='a"b\\c',
        ts=T,
    )
    assert body == (
        b'{"event":"registered","token":"\\u00e4\\u20ac","server_id":"srv",'
        b'"referee_identity":"a\\"b\\\\c","server_event_id":"reg-\\ud83d\\ude00",'
        b'"ts":1700000000}'
    )
    assert json.loads(body)["token"] == "ä€"


_VALID: dict[str, Any] = {
    "token": "tok",
    "server_id": "srv",
    "server_event_id": "reg-1",
    "referee_identity": "p-1",
}


@pytest.mark.parametrize("field", ["event", "token", "server_id", "server_event_id"])
@pytest.mark.parametrize("value", ["", "   ", "\t\n", None, 5, b"tok", ["tok"]])
def test_build_body_required_fields(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"event": "registered", **_VALID, "ts": T}
    kwargs[field] = value
    event = kwargs.pop("event")
    with pytest.raises(BodyError) as info:
        build_body(event, **kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [None, "", "  ", 7842])
def test_build_body_referee_identity_required_on_registered(value: Any) -> None:
    kwargs = {**_VALID, "referee_identity": value}
    with pytest.raises(BodyError) as info:
        build_body("registered", ts=T, **kwargs)
    assert info.value.field == "referee_identity"


@pytest.mark.parametrize("event", ["signup", "Registered", "QUALIFIED", "registered2", "clicked"])
def test_build_body_unknown_event(event: str) -> None:
    with pytest.raises(BodyError) as info:
        build_body(event, ts=T, **_VALID)
    assert info.value.field == "event"
    assert repr(event) in str(info.value)


def test_build_body_extras_follow_protocol_fields_in_order() -> None:
    body = build_body(
        "qualified",
        token="t",
        server_id="s",
        server_event_id="q",
        ts=T,
        test=True,
        extra={"zeta": 1, "alpha": {"nested": [1, "ä"]}, "flag": None},
    )
    assert body == (
        b'{"event":"qualified","token":"t","server_id":"s","server_event_id":"q",'
        b'"ts":1700000000,"test":true,"zeta":1,"alpha":{"nested":[1,"\\u00e4"]},"flag":null}'
    )


@pytest.mark.parametrize("key", FIELD_ORDER)
def test_build_body_extras_cannot_overwrite_protocol_fields(key: str) -> None:
    with pytest.raises(BodyError) as info:
        build_body("registered", ts=T, extra={key: "sneaky"}, **_VALID)
    assert info.value.field == key


@pytest.mark.parametrize("value", [object(), {1, 2}, float("nan"), float("inf"), b"raw"])
def test_build_body_extras_must_be_json(value: Any) -> None:
    with pytest.raises(BodyError) as info:
        build_body("registered", ts=T, extra={"x": value}, **_VALID)
    assert info.value.field == "extra"


def test_build_body_ts_defaults_to_now() -> None:
    before = int(time.time())
    body = build_body("registered", **_VALID)
    after = int(time.time())
    ts = json.loads(body)["ts"]
    assert type(ts) is int
    assert before <= ts <= after


def test_build_body_explicit_ts_is_kept() -> None:
    assert json.loads(build_body("registered", ts=12345, **_VALID))["ts"] == 12345
    assert json.loads(build_body("registered", ts=T, **_VALID))["ts"] == T


@pytest.mark.parametrize("ts", [0, -1, True, False, 1.5, "1700000000"])
def test_build_body_rejects_bad_ts(ts: Any) -> None:
    with pytest.raises(BodyError) as info:
        build_body("registered", ts=ts, **_VALID)
    assert info.value.field == "ts"


def test_build_body_test_flag_only_when_true() -> None:
    assert list(json.loads(build_body("registered", ts=T, **_VALID))) == [
        "event",
        "token",
        "server_id",
        "referee_identity",
        "server_event_id",
        "ts",
    ]
    assert b'"test"' not in build_body("registered", ts=T, test=False, **_VALID)
    with_test = build_body("registered", ts=T, test=True, **_VALID)
    assert with_test.endswith(b',"ts":1700000000,"test":true}')


# --- verify_signature -------------------------------------------------------------


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


def test_signature_error_hierarchy() -> None:
    assert not issubclass(SignatureError, ValueError)
    for cls in (MalformedSignatureError, BadSignatureError, StaleSignatureError):
        assert issubclass(cls, SignatureError)
        assert not issubclass(cls, ValueError)
    assert not issubclass(StaleSignatureError, BadSignatureError)
    assert not issubclass(MalformedSignatureError, BadSignatureError)
    assert issubclass(BodyError, ValueError)


# --- properties -------------------------------------------------------------------

secrets_st = st.text(min_size=1, max_size=40)
t_st = st.integers(min_value=1, max_value=10**12)


@FAST
@given(secret=secrets_st, body=st.binary(max_size=300), t=t_st)
def test_property_sign_then_verify_round_trips(secret: str, body: bytes, t: int) -> None:
    header = sign_referral_body(secret, body, t)
    verify_signature(secret, body, header, now=t)
    verify_signature([secret], body, header, now=t)


@FAST
@given(secret=secrets_st, body=st.binary(min_size=1, max_size=300), t=t_st, data=st.data())
def test_property_flipping_any_body_byte_fails(
    secret: str, body: bytes, t: int, data: st.DataObject
) -> None:
    header = sign_referral_body(secret, body, t)
    index = data.draw(st.integers(min_value=0, max_value=len(body) - 1), label="index")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != body[index]), label="byte")
    flipped = body[:index] + bytes([new]) + body[index + 1 :]
    with pytest.raises(BadSignatureError):
        verify_signature(secret, flipped, header, now=t)


any_char = st.one_of(
    st.characters(),  # everything but surrogates
    st.sampled_from("0123456789abcdefABCDEF=,tkv1 "),  # near misses
    st.characters(categories=["Cs"]),  # lone surrogates
    st.characters(max_codepoint=31),  # control characters
)


@FAST
@given(secret=secrets_st, body=st.binary(max_size=100), t=t_st, data=st.data())
def test_property_flipping_any_header_character_fails(
    secret: str, body: bytes, t: int, data: st.DataObject
) -> None:
    header = sign_referral_body(secret, body, t)
    index = data.draw(st.integers(min_value=0, max_value=len(header) - 1), label="index")
    new = data.draw(any_char.filter(lambda c: c != header[index]), label="char")
    flipped = header[:index] + new + header[index + 1 :]
    with pytest.raises(SignatureError):
        verify_signature(secret, body, flipped, now=t)


@FAST
@given(body=st.binary(max_size=100), t=t_st, data=st.data())
def test_property_flipping_kid_value_fails_under_key_map(
    body: bytes, t: int, data: st.DataObject
) -> None:
    keys = {"key-a": "secret-a", "key-b": "secret-b"}
    header = sign_referral_body("secret-b", body, t, key_id="key-b")
    start = header.index(",kid=") + len(",kid=")
    index = data.draw(st.integers(min_value=start, max_value=len(header) - 1), label="index")
    new = data.draw(any_char.filter(lambda c: c != header[index]), label="char")
    flipped = header[:index] + new + header[index + 1 :]
    with pytest.raises(SignatureError):
        verify_signature(keys, body, flipped, now=t)


# A receiver has at least one real secret; having none is a ValueError, tested apart.
secrets_any = st.one_of(
    secrets_st,
    st.lists(secrets_st, min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=8), secrets_st, min_size=1, max_size=3),
)
header_part = st.one_of(
    st.builds("t={}".format, st.one_of(st.integers(-5, 10**20), st.text(max_size=12))),
    st.builds(
        "v1=sha256={}".format,
        st.one_of(st.text("0123456789abcdefABCDEF", min_size=60, max_size=68), st.text()),
    ),
    st.builds("v1={}".format, st.text("0123456789abcdef", min_size=64, max_size=64)),
    st.builds("kid={}".format, st.text(max_size=10)),
    st.text(max_size=20),
    st.text(st.characters(categories=["Cs", "Cc", "Zs", "Nd"]), max_size=5),
)
near_headers = st.lists(header_part, max_size=5).map(",".join)


@FAST
@given(
    secrets=secrets_any,
    body=st.binary(max_size=200),
    header=st.one_of(st.text(), near_headers),
    now=st.integers(min_value=-(2**63), max_value=2**63),
)
def test_property_arbitrary_headers_only_raise_signature_errors(
    secrets: str | list[str] | dict[str, str], body: bytes, header: str, now: int
) -> None:
    # No random header can carry a valid MAC, so verification must fail, and only ever
    # with a SignatureError: a ValueError, UnicodeError, IndexError or TypeError here
    # would escape a receiver's `except SignatureError` and become a 500.
    with pytest.raises(SignatureError):
        verify_signature(secrets, body, header, now=now)


@FAST
@given(header=st.one_of(st.text(), near_headers))
def test_property_parse_only_raises_malformed(header: str) -> None:
    try:
        parsed = parse_signature_header(header)
    except MalformedSignatureError:
        return
    assert parsed.t > 0
    assert parsed.macs
    assert all(re.fullmatch(r"[0-9a-f]{64}", mac) for mac in parsed.macs)


# --- classify and outcome_of ------------------------------------------------------


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


# --- the client's manners ---------------------------------------------------------


def test_client_repr_and_str_hide_the_secret() -> None:
    secret = "whsec_SUPER_secret_value_123"
    client = ReferralClient("srv-1", secret, "http://127.0.0.1:9/api/referral/events", key_id="k1")
    try:
        for text in (repr(client), str(client), f"{client}", f"{client!r}"):
            assert secret not in text
            assert "srv-1" in text
        assert repr(client) == (
            "<ReferralClient server_id='srv-1' endpoint='http://127.0.0.1:9/api/referral/events'>"
        )
    finally:
        client.close()


@pytest.mark.parametrize("header", ["", "garbage", "t=1,v1=sha256=" + "0" * 64])
def test_missing_secret_fails_loudly_before_the_header_is_read(header: str) -> None:
    # A receiver deployed without its secret must learn it from the first request,
    # not answer every sender "malformed" or "stale".
    with pytest.raises(ValueError, match="non-empty"):
        verify_signature([], BODY, header, now=T)
    with pytest.raises(ValueError, match="non-empty"):
        verify_signature("", BODY, header, now=T)


def test_extra_field_names_must_be_strings() -> None:
    with pytest.raises(BodyError, match="names must be strings"):
        build_body(
            "qualified",
            token="tok",
            server_id="srv",
            server_event_id="q-1",
            extra={1: "a", "1": "b"},  # type: ignore[dict-item]
        )
