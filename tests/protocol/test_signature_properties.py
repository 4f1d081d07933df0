"""Properties of signing and verifying, over generated secrets, bodies and headers:
round trips, any flipped byte or character refused, and only SignatureError (or, from
parsing, MalformedSignatureError) ever raised. Pure: no network, no Flask.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flask_mmolove.protocol import (
    BadSignatureError,
    MalformedSignatureError,
    SignatureError,
    parse_signature_header,
    sign_referral_body,
    verify_signature,
)

FAST = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


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
