"""sign_referral_body: golden vectors, and what it refuses. Pure: no network, no Flask.

Golden MACs are computed independently with ``openssl dgst -sha256 -hmac`` so that a
shared misunderstanding between the signer and the verifier cannot hide.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from typing import Any

import pytest
from protocol_support import BODY, SECRET, T

from flask_mmolove.protocol import sign_referral_body, verify_signature

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
