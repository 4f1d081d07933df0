"""MMOLove's answers: what a 2xx body says, and ``classify``, the one judge of what an
answer means for delivery."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Final


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
