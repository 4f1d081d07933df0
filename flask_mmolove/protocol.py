"""The MMOLove referral event protocol: bodies, signatures and answers.

Pure functions and values: no I/O, no Flask. Everything that decides what a byte on
the wire looks like, or what an answer from MMOLove means, lives here and only here.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import urlsplit

DEFAULT_ENDPOINT: Final = "https://mmolove.com/api/referral/events"
SIGNATURE_HEADER: Final = "X-MMOLove-Signature"
#: How far ``t`` may stray from the receiver's clock, either way (protocol.md section 2).
DEFAULT_TOLERANCE: Final = 300

EVENTS: Final = ("registered", "qualified", "reversed")
#: The docs' key order; a body is always serialised in this order, extras after.
FIELD_ORDER: Final = (
    "event",
    "token",
    "server_id",
    "referee_identity",
    "server_event_id",
    "ts",
    "test",
)
_REQUIRED_STRINGS: Final = ("event", "token", "server_id", "server_event_id")


class BodyError(ValueError):
    """A referral event body cannot be built; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _required(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise BodyError(field, f"must be a string, got {type(value).__name__}")
    trimmed = value.strip()
    if not trimmed:
        raise BodyError(field, "is required and must not be empty or blank")
    return trimmed


def build_body(
    event: str,
    *,
    token: str,
    server_id: str,
    server_event_id: str,
    referee_identity: str | None = None,
    ts: int | None = None,
    test: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """Serialise one referral event, once, as the exact bytes to sign and send.

    Strings are trimmed (MMOLove trims them too, so the stored body says what MMOLove
    sees); ``ts`` is the time of the event itself and defaults to now.
    """
    fields: dict[str, Any] = {
        "event": _required("event", event),
        "token": _required("token", token),
        "server_id": _required("server_id", server_id),
    }
    if fields["event"] not in EVENTS:
        raise BodyError("event", f"must be one of {', '.join(EVENTS)}, got {event!r}")
    if fields["event"] == "registered" or referee_identity is not None:
        fields["referee_identity"] = _required("referee_identity", referee_identity)
    fields["server_event_id"] = _required("server_event_id", server_event_id)
    if ts is None:
        ts = int(time.time())
    if isinstance(ts, bool) or not isinstance(ts, int) or ts <= 0:
        raise BodyError("ts", f"must be a positive whole number of unix seconds, got {ts!r}")
    fields["ts"] = ts
    if test:
        fields["test"] = True
    for key, value in (extra or {}).items():
        if not isinstance(key, str):
            raise BodyError(repr(key), "extra field names must be strings")
        if key in FIELD_ORDER:
            raise BodyError(key, "is a protocol field; pass it as an argument, not in extra")
        fields[key] = value
    try:
        return json.dumps(fields, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise BodyError("extra", f"is not JSON-serialisable: {exc}") from None


def with_server_id(body: bytes, server_id: str, *, test: bool | None = None) -> bytes:
    """``body`` as it goes on this attempt: carrying ``server_id`` and, when ``test`` is
    given, marked a dry run (``"test": true``) or not (no ``test`` field); every other
    field unchanged and in its place.

    MMOLove picks the secret by server id, so an event goes with the id in force when
    it is sent, not the one set when it was written (a typo fixed, an id set after
    events were held without one); likewise with the test mode in force. ``body``
    itself when nothing changes; otherwise rebuilt as :func:`build_body` writes it
    (compact JSON, the same key order, ``test`` last), to be signed and sent as these
    exact bytes. A body that is not a JSON object with a ``server_id`` is returned as
    it is: there is nothing to change.
    """
    wanted = _required("server_id", server_id)
    try:
        fields = json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return body
    if not isinstance(fields, dict) or not isinstance(fields.get("server_id"), str):
        return body
    retest = test is not None and (fields.get("test") is True) != test
    if fields["server_id"] == wanted and not retest:
        return body
    fields["server_id"] = wanted
    if retest:
        fields.pop("test", None)
        if test:
            fields["test"] = True
    return json.dumps(fields, separators=(",", ":"), allow_nan=False).encode("ascii")


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; a body holding them is left for MMOLove to refuse.
    raise ValueError(name)


# --- signatures -------------------------------------------------------------------

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


def parse_signature_header(header: str) -> ParsedSignature:
    """Parse a header strictly; raise :class:`MalformedSignatureError` on anything else."""
    if not isinstance(header, str) or not header:
        raise MalformedSignatureError("signature header is missing or empty")
    if not header.isascii() or not header.isprintable() or " " in header:
        raise MalformedSignatureError(
            "signature header must be printable ASCII without spaces: "
            "t=<unix seconds>,v1=sha256=<hex>"
        )
    t: int | None = None
    macs: list[str] = []
    key_id: str | None = None
    for part in header.split(","):
        name, sep, value = part.partition("=")
        if not sep or not _FIELD_NAME.fullmatch(name):
            raise MalformedSignatureError(f"signature header has a malformed field {part[:40]!r}")
        if name == "t":
            if t is not None or not _T.fullmatch(value):
                raise MalformedSignatureError("signature header needs exactly one t=<unix seconds>")
            t = int(value)
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


# --- answers ----------------------------------------------------------------------


class Outcome(enum.Enum):
    """What an accepted (2xx) answer says happened."""

    #: The referral's state advanced, or was already there: ``referral_id`` and ``state``.
    ADVANCED = "advanced"
    #: This (token, event, server_event_id) arrived before.
    DUPLICATE = "duplicate"
    #: Another referrer registered this referee first; first touch wins.
    FIRST_TOUCH_CONFLICT = "first_touch_conflict"
    #: A dry run passed; nothing was written.
    TEST = "test"
    #: Accepted, but in a shape the docs do not describe. Still never retried.
    ACCEPTED = "accepted"


def parse_json_object(body: bytes | str) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def outcome_of(data: Mapping[str, Any] | None) -> Outcome:
    """Which of the documented 200 bodies ``data`` is."""
    if data is None:
        return Outcome.ACCEPTED
    if data.get("duplicate") is True:
        return Outcome.DUPLICATE
    if data.get("ignored") == "first_touch_conflict":
        return Outcome.FIRST_TOUCH_CONFLICT
    if data.get("test") is True:
        return Outcome.TEST
    if "referral_id" in data and "state" in data:
        return Outcome.ADVANCED
    return Outcome.ACCEPTED


class Action(enum.Enum):
    """What the delivery layer does with an event after an answer."""

    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True)
class Decision:
    """The one verdict on an answer: what to do, a short reason id and a hint for people."""

    action: Action
    reason: str
    hint: str
    #: Seconds the server asked us to wait (``Retry-After``), if it did.
    retry_after: float | None = None
    #: Retry, but slowly: the fault is ours (secret, clock, endpoint) and needs a person.
    slow: bool = False


_REJECT_HINTS: Final = {
    400: ("malformed", "MMOLove says the request is malformed; fix the payload (see its error)"),
    404: (
        "not_found",
        "unknown server or token, or referrals are off: check MMOLOVE_SERVER_ID, enable "
        "referrals on the Referrals tab, check MMOLOVE_ENDPOINT (a wrong path answers 404 "
        "too) and the captured token",
    ),
    422: ("invalid_transition", "illegal from the referral's state: send registered first"),
}


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """Parse ``Retry-After`` (seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(min(int(value), 86_400))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = datetime.now(timezone.utc).timestamp() if now is None else now
    return max(0.0, min(when.timestamp() - current, 86_400.0))


def classify(
    status: int | None, *, retry_after: str | None = None, outcome: Outcome | None = None
) -> Decision:
    """Decide what an answer means for delivery (protocol.md sections 5 and 9).

    ``status`` None is a transport failure: no answer at all. ``outcome``, when given,
    is what a 2xx body says (:func:`outcome_of`): only one of MMOLove's documented
    acceptances counts as delivered.
    """
    if status is None:
        return Decision(Action.RETRY, "transport", "MMOLove could not be reached; retrying")
    if 200 <= status < 300 and outcome is Outcome.ACCEPTED:
        # A proxy's HTML challenge page, {"ok": false}: MMOLove may have recorded
        # nothing, so nothing is credited; a person looks, and a re-send after the fix
        # is answered as a duplicate if MMOLove had recorded it after all.
        return Decision(
            Action.DEAD,
            "unrecognised",
            f"MMOLove answered {status} with a body it does not document (a proxy or "
            "captive page, or an error): nothing is credited. Check MMOLOVE_ENDPOINT, "
            "then requeue with `flask mmolove retry`",
        )
    if 200 <= status < 300:
        return Decision(Action.DELIVERED, "accepted", "accepted by MMOLove")
    if status in _REJECT_HINTS:
        reason, hint = _REJECT_HINTS[status]
        return Decision(Action.DEAD, reason, hint)
    if status == 401:
        return Decision(
            Action.RETRY,
            "bad_signature",
            "MMOLove rejected the signature: wrong secret or clock drift. Check "
            "MMOLOVE_REFERRAL_SECRET against the Referrals tab and the server's clock; "
            "the event is kept and retried slowly",
            slow=True,
        )
    if status == 429 or status == 408 or status >= 500:
        return Decision(
            Action.RETRY,
            "server_error" if status >= 500 else "rate_limited",
            f"MMOLove answered {status}; retrying with backoff",
            retry_after=retry_after_seconds(retry_after),
        )
    if 300 <= status < 400:
        return Decision(
            Action.RETRY,
            "redirect",
            f"the endpoint answered a {status} redirect, which is not followed: set "
            "MMOLOVE_ENDPOINT to the final https URL; the event is kept and retried slowly",
            slow=True,
        )
    return Decision(
        Action.DEAD,
        "unexpected_status",
        f"MMOLove answered {status}, which the protocol does not describe; check "
        "MMOLOVE_ENDPOINT, then requeue with `flask mmolove retry`",
    )
