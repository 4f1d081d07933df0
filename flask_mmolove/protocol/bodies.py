"""Referral event bodies: the fields, their order, and the bytes that are signed and sent."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, Final

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
