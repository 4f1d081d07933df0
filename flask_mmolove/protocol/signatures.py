"""Signatures: ``X-MMOLove-Signature`` made and checked, and the endpoint and key id it
goes with."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from .bodies import DEFAULT_ENDPOINT, DEFAULT_TOLERANCE

KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}", re.ASCII)
_T = re.compile(r"[1-9][0-9]{0,17}", re.ASCII)
_HEX = re.compile(r"[0-9a-f]{64}", re.ASCII)
_FIELD_NAME = re.compile(r"[a-z][a-z0-9]{0,15}", re.ASCII)


class SignatureError(Exception):
    """A signature header does not authenticate a body."""


class MalformedSignatureError(SignatureError):
    """The header is not ``t=<t>,v1=sha256=<hex>[,kid=<id>]``."""


class BadSignatureError(SignatureError):
    """No ``v1`` MAC matches the body under any of the given secrets."""


class StaleSignatureError(SignatureError):
    """``t`` lies outside the replay window."""


def _as_bytes(body: bytes | bytearray | memoryview) -> bytes:
    if isinstance(body, str):
        raise TypeError("body must be the raw bytes that are sent, not a str")
    return bytes(body)


def _mac(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), b"%d." % t + body, hashlib.sha256).hexdigest()


def sign_referral_body(
    secret: str,
    body: bytes | bytearray | memoryview,
    t: int | None = None,
    *,
    key_id: str | None = None,
) -> str:
    """Return the ``X-MMOLove-Signature`` value for ``body`` signed at ``t`` (default now)."""
    if not isinstance(secret, str) or not secret:
        raise ValueError("secret must be a non-empty string (the Referrals tab shows it)")
    raw = _as_bytes(body)
    if t is None:
        t = int(time.time())
    if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
        raise ValueError(f"t must be a positive whole number of unix seconds, got {t!r}")
    header = f"t={t},v1=sha256={_mac(secret, t, raw)}"
    if key_id is not None:
        header += f",kid={check_key_id(key_id)}"
    return header


def check_key_id(value: object) -> str:
    """``value`` if it can name a signing key in the header, else ValueError saying why."""
    if not isinstance(value, str) or not KEY_ID_PATTERN.fullmatch(value):
        raise ValueError("key_id must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    return value


def check_endpoint(value: object) -> str:
    """``value`` if it is an http(s) URL events can be posted to, else ValueError."""
    if isinstance(value, str):
        parts = urlsplit(value)
        if parts.scheme in ("http", "https") and parts.netloc:
            return value
    raise ValueError(f"endpoint must be an http(s) URL such as {DEFAULT_ENDPOINT}, got {value!r}")


@dataclass(frozen=True)
class ParsedSignature:
    t: int
    macs: tuple[str, ...]
    key_id: str | None


def header_fields(header: str, form: str) -> Iterator[tuple[str, str]]:
    """The ``name=value`` fields of a signature header of the given ``form`` (named in
    the error), each name well formed; :class:`MalformedSignatureError` otherwise."""
    if not isinstance(header, str) or not header:
        raise MalformedSignatureError("signature header is missing or empty")
    if not header.isascii() or not header.isprintable() or " " in header:
        raise MalformedSignatureError(
            f"signature header must be printable ASCII without spaces: {form}"
        )
    for part in header.split(","):
        name, sep, value = part.partition("=")
        if not sep or not _FIELD_NAME.fullmatch(name):
            raise MalformedSignatureError(f"signature header has a malformed field {part[:40]!r}")
        yield name, value


def header_time(value: str, seen: int | None) -> int:
    """The header's one ``t``, from ``value``; ``seen`` is a ``t`` already read."""
    if seen is not None or not _T.fullmatch(value):
        raise MalformedSignatureError("signature header needs exactly one t=<unix seconds>")
    return int(value)


def parse_signature_header(header: str) -> ParsedSignature:
    """Parse a header strictly; raise :class:`MalformedSignatureError` on anything else."""
    t: int | None = None
    macs: list[str] = []
    key_id: str | None = None
    for name, value in header_fields(header, "t=<unix seconds>,v1=sha256=<hex>"):
        if name == "t":
            t = header_time(value, t)
        elif name == "v1":
            scheme, sep, digest = value.partition("=")
            if scheme != "sha256" or not sep:
                raise MalformedSignatureError(
                    "v1 must read v1=sha256=<hex> (the reward-callback form v1=<hex> "
                    "is a different product)"
                )
            if not _HEX.fullmatch(digest):
                raise MalformedSignatureError("v1 must carry 64 lower-case hex digits")
            macs.append(digest)
        elif name == "kid":
            if key_id is not None or not KEY_ID_PATTERN.fullmatch(value):
                raise MalformedSignatureError("signature header has a malformed kid")
            key_id = value
        # Other well-formed fields are ignored: the docs leave room for new schemes.
    if t is None:
        raise MalformedSignatureError("signature header has no t=<unix seconds>")
    if not macs:
        raise MalformedSignatureError("signature header has no v1=sha256=<hex>")
    return ParsedSignature(t=t, macs=tuple(macs), key_id=key_id)


def verify_signature(
    secrets: str | Sequence[str] | Mapping[str, str],
    body: bytes | bytearray | memoryview,
    header: str,
    *,
    tolerance: int = DEFAULT_TOLERANCE,
    now: int | None = None,
) -> None:
    """Check that ``header`` authenticates ``body``; raise a :class:`SignatureError` if not.

    ``secrets`` may be one secret, several (any may match, for rotation), or a mapping
    from key id to secret: then a header with ``kid`` is checked only against that
    key's secret (an unknown ``kid`` fails), and a header without one against them all.
    ``kid`` is a hint, not signed: nothing forged passes either way.
    """
    raw = _as_bytes(body)
    if isinstance(secrets, str):
        candidates: Sequence[str] = (secrets,)
    elif isinstance(secrets, Mapping):
        candidates = tuple(secrets.values())
    else:
        candidates = tuple(secrets)
    if not candidates or not all(isinstance(s, str) and s for s in candidates):
        # An empty key is a MAC anyone can compute: an unset secret must never verify.
        raise ValueError("every secret must be a non-empty string")
    parsed = parse_signature_header(header)
    if now is None:
        now = int(time.time())
    if abs(now - parsed.t) > tolerance:
        raise StaleSignatureError(
            f"t is {now - parsed.t:+d} s from now, outside the ±{tolerance} s window: "
            "sign each attempt afresh and check the sender's clock"
        )
    if isinstance(secrets, Mapping) and parsed.key_id is not None:
        if parsed.key_id not in secrets:
            raise BadSignatureError("no secret is known for this kid")
        candidates = (secrets[parsed.key_id],)
    matched = False
    for secret in candidates:
        expected = _mac(secret, parsed.t, raw)
        for mac in parsed.macs:
            # No early exit: every comparison runs, so timing says nothing about which.
            matched |= hmac.compare_digest(expected, mac)
    if not matched:
        raise BadSignatureError(
            "no v1 MAC matches: wrong secret, or the body was re-serialised after signing"
        )
