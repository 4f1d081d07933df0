"""What the outbox stores and hands out, its limits, and the checks on what it is given."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..protocol import EVENTS

PENDING: Final = "pending"
DELIVERED: Final = "delivered"
DEAD: Final = "dead"
STATES: Final = (PENDING, DELIVERED, DEAD)
#: The outcome of a pending event whose dry run passed (``MMOLOVE_TEST_MODE``).
DRY_RUN: Final = "test"
#: When a held event is due: never, until it is released.
HELD: Final = 1e15

TOKEN_MAX: Final = 512
IDENTITY_MAX: Final = 255
SERVER_EVENT_ID_MAX: Final = 255
EVENT_MAX: Final = 32
OWNER_MAX: Final = 255
#: A vote's ``heart_id`` (a UUID; the test callback's is all zeros).
HEART_ID_MAX: Final = 64
REASON_MAX: Final = 64
OUTCOME_MAX: Final = 32
#: Answers and errors are kept for people to read, not replayed: a bounded prefix is enough.
TEXT_MAX: Final = 2000


class OutboxError(RuntimeError):
    """The outbox database cannot do what was asked; the message says what to fix."""


class OutboxUnreachable(OutboxError):
    """The outbox database could not be used just now (the connection lost, a lock or
    a timeout): the same work may succeed when tried again."""


@dataclass(frozen=True)
class OutboxEvent:
    """One stored referral event, as it was when it was read.

    While an event is leased, ``next_attempt_at`` equals ``lease_until``: the time it
    becomes claimable again should its owner die.
    """

    id: int
    event: str
    token: str
    identity: str
    server_event_id: str
    #: The exact bytes that are signed and sent, never re-serialised.
    body: bytes = field(repr=False)
    state: str
    attempts: int
    created_at: float
    next_attempt_at: float
    last_status: int | None
    last_reason: str | None
    last_error: str | None
    outcome: str | None
    delivered_at: float | None
    #: MMOLove's answer to the accepted attempt (a prefix of ``TEXT_MAX`` characters).
    response: str | None = None
    last_attempt_at: float | None = None
    lease_owner: str | None = None
    lease_until: float | None = None

    @classmethod
    def from_row(cls, row: Any) -> OutboxEvent:
        """The event of a row of the events table."""
        return cls(
            id=int(row.id),
            event=row.event,
            token=row.token,
            identity=row.identity,
            server_event_id=row.server_event_id,
            body=bytes(row.body),
            state=row.state,
            attempts=int(row.attempts),
            created_at=float(row.created_at),
            next_attempt_at=float(row.next_attempt_at),
            last_status=row.last_status,
            last_reason=row.last_reason,
            last_error=row.last_error,
            outcome=row.outcome,
            delivered_at=row.delivered_at,
            response=row.response,
            last_attempt_at=row.last_attempt_at,
            lease_owner=row.lease_owner,
            lease_until=row.lease_until,
        )


@dataclass(frozen=True)
class Ending:
    """How one attempt at a leased event ended, for :meth:`Outbox.settle`.

    Made with :meth:`delivered`, :meth:`retry` or :meth:`dead`, which check and clip
    what is stored.
    """

    event_id: int
    #: The event's columns to set (``delivered_at`` is added when it is recorded).
    values: Mapping[str, Any]
    #: Delivered, and owes the referee's referrer a credit.
    credit: bool = False

    @classmethod
    def delivered(
        cls, event_id: int, *, status: int, response: str, outcome: str, credit: bool
    ) -> Ending:
        """MMOLove accepted it; with ``credit``, its referee's referrer earned a reward."""
        return cls(
            int(event_id),
            {
                "state": DELIVERED,
                "last_status": status,
                "last_reason": None,
                "last_error": None,
                "response": _clip(response, TEXT_MAX),
                "outcome": _clip(outcome, OUTCOME_MAX),
            },
            credit=bool(credit),
        )

    @classmethod
    def retry(
        cls, event_id: int, *, at: float, status: int | None, reason: str, error: str
    ) -> Ending:
        """Not delivered: due again at ``at``."""
        return cls(
            int(event_id),
            {
                "next_attempt_at": _time("at", at),
                "last_status": status,
                "last_reason": _clip(reason, REASON_MAX),
                "last_error": _clip(error, TEXT_MAX),
            },
        )

    @classmethod
    def dry_run_passed(cls, event_id: int, *, status: int, response: str) -> Ending:
        """MMOLove accepted a dry run of it: held (pending, never due) until test mode
        is off, when :meth:`Outbox.release_dry_runs` makes it due for real."""
        return cls(
            int(event_id),
            {
                "next_attempt_at": HELD,
                "last_status": status,
                "last_reason": None,
                "last_error": None,
                "response": _clip(response, TEXT_MAX),
                "outcome": DRY_RUN,
            },
        )

    @classmethod
    def dead(cls, event_id: int, *, status: int | None, reason: str, error: str) -> Ending:
        """Not delivered, and never retried unless requeued."""
        return cls(
            int(event_id),
            {
                "state": DEAD,
                "last_status": status,
                "last_reason": _clip(reason, REASON_MAX),
                "last_error": _clip(error, TEXT_MAX),
            },
        )


@dataclass(frozen=True)
class Credit:
    """A referee whose referrer earned a reward, waiting to be announced."""

    identity: str
    token: str
    event_id: int
    outcome: str
    created_at: float
    #: Claims so far, including this one: for the announcer's backoff.
    attempts: int = 0

    @classmethod
    def from_row(cls, row: Any) -> Credit:
        """The credit of a row of the credits table."""
        return cls(
            identity=row.identity,
            token=row.token,
            event_id=int(row.event_id),
            outcome=row.outcome,
            created_at=float(row.created_at),
            attempts=int(row.attempts),
        )


@dataclass(frozen=True)
class Heart:
    """A vote MMOLove's reward callback delivered, waiting to be announced."""

    heart_id: str
    event: str
    username: str
    #: The body exactly as received and verified.
    payload: bytes
    received_at: float
    #: Claims so far, including this one.
    attempts: int = 0

    @property
    def fields(self) -> dict[str, Any]:
        """Every field of the vote, as MMOLove sent it."""
        data = json.loads(self.payload)
        return data if isinstance(data, dict) else {}

    @classmethod
    def from_row(cls, row: Any) -> Heart:
        """The heart of a row of the hearts table."""
        return cls(
            heart_id=row.heart_id,
            event=row.event,
            username=row.username,
            payload=bytes(row.payload),
            received_at=float(row.received_at),
            attempts=int(row.attempts),
        )


@dataclass(frozen=True)
class HeartStats:
    """Votes received by reward callback: counted ones, those announced, tests."""

    received: int
    granted: int
    tests: int


@dataclass(frozen=True)
class Stats:
    """Counts for a dashboard. ``pending`` excludes ``in_flight`` (leased) events."""

    pending: int
    in_flight: int
    delivered: int
    dead: int
    #: Seconds since the oldest undelivered, not dead event was created.
    oldest_pending_age: float | None
    credits_unnotified: int


# --- checks on what the outbox is given --------------------------------------------


def _event_fields(
    *, event: str, token: str, identity: str, server_event_id: str, body: bytes
) -> dict[str, Any]:
    """An event's key and body as they are stored, trimmed like MMOLove trims them."""
    event = _text("event", event, EVENT_MAX)
    if event not in EVENTS:
        raise ValueError(f"event must be one of {', '.join(EVENTS)}, got {event!r}")
    return {
        "event": event,
        "token": _text("token", token, TOKEN_MAX),
        "identity": _text("identity", identity, IDENTITY_MAX),
        "server_event_id": _text("server_event_id", server_event_id, SERVER_EVENT_ID_MAX),
        "body": _body(body),
    }


def _text(name: str, value: object, limit: int) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    # MMOLove trims string fields before it dedups: keep our key the same as theirs.
    trimmed = value.strip()
    if not trimmed:
        raise ValueError(f"{name} must not be empty or blank")
    if len(trimmed) > limit:
        raise ValueError(f"{name} must be at most {limit} characters, got {len(trimmed)}")
    return trimmed


def _body(value: object) -> bytes:
    if isinstance(value, str) or not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(
            "body must be the exact bytes to send (protocol.build_body), "
            f"not {type(value).__name__}"
        )
    return bytes(value)


def _clip(value: str | None, limit: int) -> str | None:
    if value is None:
        return None
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _time(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValueError(f"{name} must be unix seconds, got {value!r}")
    return float(value)


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _owner(value: object) -> str:
    # Not trimmed, unlike the event's fields: an owner is compared verbatim later.
    if not isinstance(value, str) or not value.strip() or len(value) > OWNER_MAX:
        raise ValueError(f"owner must be a non-blank string of at most {OWNER_MAX} characters")
    return value


def _limit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"limit must be a whole number of at least 1, got {value!r}")
    return value
