"""MMOLove's reward callbacks (votes), the other direction: MMOLove POSTs a signed
``heart.counted`` (or the dashboard's ``heart.test``) to the portal, which verifies it.

The signature is HMAC-SHA256 with the callback secret over ``"<t>.<raw body>"``, as for
referral events, but its header reads ``t=<t>,v1=<hex>``: bare hex, no ``sha256=``, no
``kid``. The two forms are kept apart on purpose: each parser refuses the other's.
The legacy GET mode signs ``username + "|" + ts`` instead, in the query string.

:func:`verify_heart_callback` and :func:`verify_legacy_get` have the shape of MMOLove's
own verifier (``mmolove-callback``): the event, or None. :func:`check_heart_callback`
and :func:`check_legacy_get` say why instead, raising a :class:`SignatureError` (or a
:class:`CallbackPayloadError` for a body that is signed but not a vote).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from .bodies import DEFAULT_TOLERANCE
from .signatures import (
    BadSignatureError,
    MalformedSignatureError,
    SignatureError,
    StaleSignatureError,
    header_fields,
    header_time,
)

#: The header naming the callback's event (the body's ``event`` says the same).
EVENT_HEADER: Final = "X-MMOLove-Event"
HEART_COUNTED: Final = "heart.counted"
HEART_TEST: Final = "heart.test"
HEART_EVENTS: Final = (HEART_COUNTED, HEART_TEST)
#: The fields every vote carries; any others (streaks, loyalty...) are kept as sent.
REQUIRED_FIELDS: Final = ("event", "server_id", "username", "heart_id")

_T = re.compile(r"[1-9][0-9]{0,17}", re.ASCII)
_HEX = re.compile(r"[0-9a-f]{64}", re.ASCII)


class CallbackPayloadError(ValueError):
    """A callback whose signature holds but whose body is not a vote MMOLove sends."""


@dataclass(frozen=True)
class CallbackSignature:
    t: int
    macs: tuple[str, ...]


def _raw(body: bytes | bytearray | memoryview | str) -> bytes:
    # MMOLove's verifier takes either; a str is the body as UTF-8 text.
    return body.encode("utf-8") if isinstance(body, str) else bytes(body)


@runtime_checkable
class Revealing(Protocol):
    """A secret held wrapped (``flask_mmolove.redaction.Secret``): its value only when
    asked, so no frame of a verification holds it in plain."""

    def reveal(self) -> str: ...


Key = str | Revealing


def _plain(secret: Key) -> str:
    return secret if isinstance(secret, str) else secret.reveal()


def _secrets(secrets: Key | Sequence[Key]) -> tuple[Key, ...]:
    candidates = (secrets,) if isinstance(secrets, str) or hasattr(secrets, "reveal") else secrets
    found = tuple(candidates)
    if not found or not all(isinstance(s, str | Revealing) and len(_plain(s)) > 0 for s in found):
        # An empty key is a MAC anyone can compute: an unset secret must never verify.
        raise ValueError("every callback secret must be a non-empty string")
    return found


def _matches(candidates: Sequence[Key], message: bytes, macs: Sequence[str]) -> bool:
    matched = False
    for secret in candidates:
        expected = hmac.new(_plain(secret).encode("utf-8"), message, hashlib.sha256).hexdigest()
        for mac in macs:
            # No early exit: timing says nothing about which secret or MAC matched.
            matched |= hmac.compare_digest(expected, mac)
    return matched


def _check_time(t: int, now: int | None, tolerance: int) -> None:
    now = int(time.time()) if now is None else now
    if abs(now - t) > tolerance:
        raise StaleSignatureError(
            f"t is {now - t:+d} s from now, outside the ±{tolerance} s window: a replay, "
            "or this host's clock is off (check NTP)"
        )


def sign_heart_callback(
    secret: str, body: bytes | bytearray | memoryview | str, t: int | None = None
) -> str:
    """The ``X-MMOLove-Signature`` MMOLove sends with ``body`` at ``t`` (default now):
    for the sandbox and tests, which play MMOLove's side."""
    (key,) = _secrets(secret)
    t = int(time.time()) if t is None else t
    if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
        raise ValueError(f"t must be a positive whole number of unix seconds, got {t!r}")
    message = b"%d." % t + _raw(body)
    mac = hmac.new(_plain(key).encode("utf-8"), message, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def parse_callback_signature(header: str) -> CallbackSignature:
    """Parse a reward callback's header strictly; :class:`MalformedSignatureError` on
    anything else (a referral event's ``v1=sha256=<hex>`` included)."""
    t: int | None = None
    macs: list[str] = []
    for name, value in header_fields(header, "t=<unix seconds>,v1=<hex>"):
        if name == "t":
            t = header_time(value, t)
        elif name == "v1":
            if value.startswith("sha256="):
                raise MalformedSignatureError(
                    "v1 must be bare hex, v1=<hex>: v1=sha256=<hex> is the Referral Kit's "
                    "form, not a reward callback's"
                )
            if not _HEX.fullmatch(value):
                raise MalformedSignatureError("v1 must carry 64 lower-case hex digits")
            macs.append(value)
        # Other well-formed fields are ignored: room for what MMOLove adds later.
    if t is None:
        raise MalformedSignatureError("signature header has no t=<unix seconds>")
    if not macs:
        raise MalformedSignatureError("signature header has no v1=<hex>")
    return CallbackSignature(t=t, macs=tuple(macs))


def check_heart_callback(
    raw_body: bytes | bytearray | memoryview | str,
    signature_header: str,
    secrets: Key | Sequence[Key],
    *,
    tolerance: int = DEFAULT_TOLERANCE,
    now: int | None = None,
) -> dict[str, Any]:
    """The vote ``raw_body`` carries, once ``signature_header`` is shown to authenticate
    it under one of ``secrets`` (several during a rotation) within ±``tolerance`` s.

    The raw bytes are verified before anything is parsed. Raises a
    :class:`SignatureError` (malformed, stale, or no MAC matches), then
    :class:`CallbackPayloadError` for a signed body that is not a JSON object with the
    string fields every vote has and a known ``event``. Every field is kept.
    """
    candidates = _secrets(secrets)
    raw = _raw(raw_body)
    parsed = parse_callback_signature(signature_header)
    _check_time(parsed.t, now, tolerance)
    if not _matches(candidates, b"%d." % parsed.t + raw, parsed.macs):
        raise BadSignatureError(
            "no v1 MAC matches: the callback secret (Integration tab, not the Referrals "
            "tab's), or the body was changed on its way"
        )
    try:
        event = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: arrays nested deeper than the parser goes, a hostile body.
        raise CallbackPayloadError(f"the body is not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise CallbackPayloadError("the body is not a JSON object")
    missing = [f for f in REQUIRED_FIELDS if not isinstance(event.get(f), str) or not event[f]]
    if missing:
        raise CallbackPayloadError(f"the body lacks the string field(s) {', '.join(missing)}")
    if event["event"] not in HEART_EVENTS:
        raise CallbackPayloadError(
            f"event {event['event'][:40]!r} is not one of {', '.join(HEART_EVENTS)}"
        )
    return event


def verify_heart_callback(
    raw_body: bytes | bytearray | memoryview | str,
    signature_header: str,
    secret: str | Sequence[str],
    tolerance: int = DEFAULT_TOLERANCE,
) -> dict[str, Any] | None:
    """The vote, or None for a bad signature, a stale ``t`` or an unparseable body: the
    shape of MMOLove's ``mmolove-callback`` verifier. :func:`check_heart_callback` says
    which."""
    try:
        return check_heart_callback(raw_body, signature_header, secret, tolerance=tolerance)
    except (SignatureError, CallbackPayloadError):
        return None


def sign_legacy_get(secret: str, username: str, ts: int | None = None) -> dict[str, str]:
    """The query MMOLove's legacy GET mode sends for ``username`` at ``ts``."""
    (key,) = _secrets(secret)
    ts = int(time.time()) if ts is None else ts
    message = f"{username}|{ts}".encode()
    sig = hmac.new(_plain(key).encode("utf-8"), message, hashlib.sha256).hexdigest()
    return {"username": username, "ts": str(ts), "sig": sig}


def check_legacy_get(
    args: Mapping[str, str],
    secrets: Key | Sequence[Key],
    *,
    tolerance: int = DEFAULT_TOLERANCE,
    now: int | None = None,
) -> dict[str, Any]:
    """``{"username", "ts"}`` from a legacy GET's query, once ``sig`` is shown to be
    HMAC-SHA256 of ``username + "|" + ts`` under one of ``secrets``, within
    ±``tolerance`` s (the docs name no window; the Referral Kit's is used). Raises a
    :class:`SignatureError` saying what is wrong."""
    candidates = _secrets(secrets)
    username, ts, sig = (args.get(name) for name in ("username", "ts", "sig"))
    if not username or not isinstance(username, str):
        raise MalformedSignatureError("the query has no username")
    if not isinstance(ts, str) or not _T.fullmatch(ts):
        raise MalformedSignatureError("the query needs ts=<unix seconds>")
    if not isinstance(sig, str) or not _HEX.fullmatch(sig):
        raise MalformedSignatureError("the query needs sig=<64 lower-case hex digits>")
    _check_time(int(ts), now, tolerance)
    if not _matches(candidates, f"{username}|{ts}".encode(), (sig,)):
        raise BadSignatureError("sig does not match: the callback secret, or a changed query")
    return {"username": username, "ts": int(ts)}


def verify_legacy_get(
    args: Mapping[str, str], secret: str | Sequence[str], tolerance: int = DEFAULT_TOLERANCE
) -> dict[str, Any] | None:
    """``{"username", "ts"}``, or None: :func:`check_legacy_get` without the reason."""
    try:
        return check_legacy_get(args, secret, tolerance=tolerance)
    except SignatureError:
        return None
