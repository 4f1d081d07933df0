"""What the sandbox's reward callbacks are made of: MMOLove's retry schedule, a
delivery's states, the callback configuration and the record of one attempt."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final
from urllib.parse import urlsplit

#: The wait before each attempt, in seconds: the first at once, then 1 min, 5 min,
#: 30 min, 2 h and 6 h after the attempt before it failed.
RETRY_DELAYS: Final = (0.0, 60.0, 300.0, 1800.0, 7200.0, 21600.0)
MAX_ATTEMPTS: Final = len(RETRY_DELAYS)
#: How long an attempt may wait on each socket operation; MMOLove's own is not documented.
DEFAULT_CALLBACK_TIMEOUT: Final = 10.0
#: What the dashboard's "Send test callback" button sends.
TEST_HEART_ID: Final = "00000000-0000-0000-0000-000000000000"
TEST_USERNAME: Final = "test-user"
#: The body fields the sandbox writes itself; ``extra`` may add others, not replace these.
CORE_FIELDS: Final = ("event", "server_id", "username", "heart_id", "period", "timestamp")

#: A delivery's states. The last four are final.
PENDING: Final = "pending"
RETRYING: Final = "retrying"
DELIVERED: Final = "delivered"
EXHAUSTED: Final = "exhausted"
#: The test callback's one attempt failed (the button would show its status or error),
#: or the sandbox itself could not send.
FAILED: Final = "failed"
#: stop() ended the delivery before it was delivered or exhausted.
CANCELLED: Final = "cancelled"
FINAL_STATES: Final = frozenset({DELIVERED, EXHAUSTED, FAILED, CANCELLED})


class Unset(enum.Enum):
    UNSET = enum.auto()


UNSET: Final = Unset.UNSET


@dataclass(frozen=True)
class CallbackConfig:
    """Where and how MMOLove sends this server's callbacks (its Integration tab)."""

    url: str | None
    secret: str
    legacy_get: bool = False
    retry_scale: float = 1.0
    timeout: float = DEFAULT_CALLBACK_TIMEOUT

    def __repr__(self) -> str:
        # The secret never shows in a repr, a traceback or a test report.
        return (
            f"CallbackConfig(url={self.url!r}, secret='[redacted]', legacy_get="
            f"{self.legacy_get!r}, retry_scale={self.retry_scale!r}, timeout={self.timeout!r})"
        )


def checked_config(config: CallbackConfig) -> CallbackConfig:
    if config.url is not None:
        parts = urlsplit(config.url) if isinstance(config.url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            # Real MMOLove requires public https; the sandbox also reaches local portals.
            raise ValueError(f"callback_url must be an http(s) URL, got {config.url!r}")
    if not isinstance(config.secret, str) or not config.secret:
        raise ValueError("callback_secret must be a non-empty string")
    if not config.retry_scale >= 0:
        raise ValueError("retry_scale must be a number >= 0")
    if not config.timeout > 0:
        raise ValueError("callback timeout must be a number > 0")
    return config


@dataclass(frozen=True)
class CallbackAttempt:
    """One attempt to deliver a callback, and the delivery's state after it."""

    seq: int
    heart_id: str
    event: str
    username: str
    #: 1 for the first attempt, up to MAX_ATTEMPTS.
    attempt: int
    #: When it was sent, on the sandbox's clock (MMOLove's).
    time: float
    method: str
    url: str
    #: The HTTP status answered, or None when there was no answer (see ``error``).
    status: int | None
    #: ``timeout``, ``refused``, ``disconnected``, ``stopped``... when no status came.
    error: str | None
    #: The delivery's state once this attempt was judged: delivered, retrying,
    #: exhausted, failed (the test callback) or cancelled.
    state: str
    #: Seconds the attempt took, on the monotonic clock.
    duration: float
    #: The X-MMOLove-Signature sent (None in legacy GET mode, which signs the query).
    signature: str | None
    #: The bytes sent: the JSON body, or the query string in legacy GET mode.
    body: bytes
    #: The start of the answer's body, as text.
    response: str | None = None
    #: A redirect's Location, never followed.
    location: str | None = None
    #: The (scaled) seconds until the next attempt, when one is due.
    next_delay: float | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "heart_id": self.heart_id,
            "event": self.event,
            "username": self.username,
            "attempt": self.attempt,
            "time": self.time,
            "time_iso": datetime.fromtimestamp(self.time, timezone.utc).isoformat(),
            "method": self.method,
            "url": self.url,
            "status": self.status,
            "error": self.error,
            "state": self.state,
            "duration": self.duration,
            "next_delay": self.next_delay,
            "signature": self.signature,
            "body": self.body.decode("utf-8", errors="replace"),
            "response": self.response,
            "location": self.location,
        }
