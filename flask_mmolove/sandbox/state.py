"""The sandbox's memory: referrals, dedup keys, the delivery log and scripted faults.

Everything here is in memory behind one lock, because the server is threaded and an
exactly-once check is only as good as the atomicity of "seen? then record".
"""

from __future__ import annotations

import json
import math
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from ..protocol import (
    DEFAULT_TOLERANCE,
    EVENTS,
    SIGNATURE_HEADER,
    BadSignatureError,
    MalformedSignatureError,
    StaleSignatureError,
    verify_signature,
)
from ..redaction import Redactor
from .tokens import TokenError, TokenMinter, derive_token_key

ReferralState = Literal["clicked", "registered", "qualified"]
FaultKind = Literal["status", "delay", "drop"]

_REQUIRED: Final = ("event", "token", "server_id", "server_event_id")


@dataclass(frozen=True)
class Referral:
    """One referral: a click on a share link and what the portal reported since."""

    token: str
    referral_id: str
    referrer: str
    server_id: str
    state: ReferralState
    clicked_at: float
    referee_identity: str | None = None
    registered_at: float | None = None
    qualified_at: float | None = None
    #: The referee a ``registered`` named when first touch went to another referrer.
    conflicting_identity: str | None = None
    #: ``reversed`` events received; recorded, never acted on (protocol.md section 3).
    reversals: int = 0


@dataclass(frozen=True)
class LogRecord:
    """One request to the ingest endpoint and what the sandbox made of it."""

    seq: int
    time: float
    #: The raw body bytes exactly as received.
    body: bytes
    #: The ``X-MMOLove-Signature`` header, or None when absent.
    signature: str | None
    content_type: str | None
    #: The HTTP status sent, or None when the connection was dropped without an answer.
    status: int | None
    #: A short id for what happened: ``advanced``, ``duplicate``, ``bad_signature``...
    verdict: str
    #: The JSON the sandbox answered, or would have answered had it not dropped.
    response: dict[str, Any] | None
    #: Read from the body when it is a JSON object with string fields; else None.
    event: str | None = None
    token: str | None = None
    server_event_id: str | None = None
    #: Which scripted fault touched this request, if any.
    fault: str | None = None
    #: Whether the event was written (counted, deduplicated, state advanced).
    committed: bool = False

    @property
    def body_text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    @property
    def dropped(self) -> bool:
        return self.status is None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view; the body as text, the signature header as received."""
        return {
            "seq": self.seq,
            "time": self.time,
            "time_iso": datetime.fromtimestamp(self.time, timezone.utc).isoformat(),
            "event": self.event,
            "token": self.token,
            "server_event_id": self.server_event_id,
            "status": self.status,
            "verdict": self.verdict,
            "fault": self.fault,
            "committed": self.committed,
            "response": self.response,
            "body": self.body_text,
            "signature": self.signature,
            "content_type": self.content_type,
        }


@dataclass
class Fault:
    """A scripted misbehaviour for the next ``remaining`` ingest requests."""

    kind: FaultKind
    remaining: int
    status: int = 500
    retry_after: str | None = None
    body: Any = None
    seconds: float = 0.0
    after_commit: bool = False

    @property
    def label(self) -> str:
        if self.kind == "drop":
            return "drop_after_commit" if self.after_commit else "drop"
        return self.kind

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "remaining": self.remaining}
        if self.kind == "status":
            data.update(status=self.status, retry_after=self.retry_after, body=self.body)
        elif self.kind == "delay":
            data["seconds"] = self.seconds
        else:
            data["after_commit"] = self.after_commit
        return data


@dataclass(frozen=True)
class Reply:
    """What the ingest endpoint answers, and how to file it."""

    status: int
    data: dict[str, Any]
    verdict: str
    committed: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)


class _Rejected(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.verdict)
        self.reply = reply


def _reject(status: int, verdict: str, error: str, **extra: Any) -> _Rejected:
    return _Rejected(Reply(status, {"error": error, **extra}, verdict))


def _no_constants(name: str) -> Any:
    # NaN and Infinity are Python extensions, not JSON; MMOLove would not parse them.
    raise ValueError(f"{name} is not valid JSON")


def _parse(raw: bytes) -> Any:
    return json.loads(raw.decode("utf-8"), parse_constant=_no_constants)


def _string_field(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        raise _reject(400, "invalid_field", f"{name} is required", field=name)
    if not isinstance(value, str):
        raise _reject(
            400, "invalid_field", f"{name} must be a string, not {_json_type(value)}", field=name
        )
    trimmed = value.strip()
    if not trimmed:
        raise _reject(400, "invalid_field", f"{name} is required and must not be blank", field=name)
    return trimmed


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


@dataclass(frozen=True)
class _Event:
    event: str
    token: str
    server_id: str
    server_event_id: str
    referee_identity: str | None
    test: bool


def _validate(data: Mapping[str, Any]) -> _Event:
    event = _string_field(data, "event")
    if event not in EVENTS:
        raise _reject(
            400, "invalid_field", f"event must be one of {', '.join(EVENTS)}", field="event"
        )
    token = _string_field(data, "token")
    server_id = _string_field(data, "server_id")
    # Required on registered only; later events may carry it and it is ignored there.
    identity = _string_field(data, "referee_identity") if event == "registered" else None
    server_event_id = _string_field(data, "server_event_id")
    ts = data.get("ts")
    if ts is not None and (
        isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts <= 0
    ):
        raise _reject(
            400, "invalid_field", "ts must be a positive number of unix seconds", field="ts"
        )
    test = data.get("test", False)
    # A string "true" must not silently turn a dry run into a real event.
    if test is not None and not isinstance(test, bool):
        raise _reject(400, "invalid_field", "test must be a boolean", field="test")
    return _Event(event, token, server_id, server_event_id, identity, test is True)


def _peek(raw: bytes) -> dict[str, str | None]:
    """Best-effort event, token and server_event_id for the log, whatever the verdict."""
    try:
        data = _parse(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    peeked: dict[str, str | None] = {}
    for name in ("event", "token", "server_event_id"):
        value = data.get(name)
        peeked[name] = value.strip() if isinstance(value, str) else None
    return peeked


class SandboxState:
    """The in-memory MMOLove: one server, its secret, its referrals and its log."""

    def __init__(
        self,
        *,
        secret: str,
        server_id: str,
        registration_url: str,
        token_key: str | None = None,
        tolerance: int = DEFAULT_TOLERANCE,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not isinstance(secret, str) or not secret:
            raise ValueError("secret must be a non-empty string")
        if not isinstance(server_id, str) or not server_id.strip():
            raise ValueError("server_id must be a non-empty string")
        parts = urlsplit(registration_url) if isinstance(registration_url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"registration_url must be an http(s) URL, got {registration_url!r}")
        if tolerance < 0:
            raise ValueError("tolerance must not be negative")
        self.server_id = server_id.strip()
        self.registration_url = registration_url
        self.tolerance = tolerance
        self.clock: Callable[[], float] = clock or time.time
        self._secret = secret
        self._token_key = token_key or derive_token_key(secret)
        self._redact = Redactor(secret, self._token_key)
        self.tokens = TokenMinter(self._token_key, clock=self.clock)
        self._lock = threading.Lock()
        # Set on stop or clear_faults so a scripted delay never outlives its purpose.
        self._wake = threading.Event()
        self._referrals: dict[str, Referral] = {}
        self._referees: dict[str, str] = {}
        self._seen: set[tuple[str, str, str]] = set()
        self._log: list[LogRecord] = []
        self._faults: list[Fault] = []
        self._accepted: Counter[str] = Counter()
        self._posts: Counter[tuple[str, str]] = Counter()
        self._clicks = 0
        self._seq = 0

    def __repr__(self) -> str:
        return f"<SandboxState server_id={self.server_id!r} events={len(self._log)}>"

    @property
    def secret(self) -> str:
        """The event-signing secret. Deliberately absent from every page and repr."""
        return self._secret

    # --- tokens and clicks --------------------------------------------------------

    def mint_token(self, referrer: str = "friend", *, server_id: str | None = None) -> str:
        """Mint a token as a click on the share link would, and record the click.

        ``server_id`` mints for another server (the token then fails here with 404).
        """
        referrer = referrer.strip()
        if not referrer:
            raise ValueError("referrer code must not be blank")
        target = self.server_id if server_id is None else server_id
        token = self.tokens.mint(target, referrer)
        now = self.clock()
        with self._lock:
            if target == self.server_id:
                self._clicks += 1
                self._referrals[token] = Referral(
                    token=token,
                    referral_id=_referral_id(),
                    referrer=referrer,
                    server_id=target,
                    state="clicked",
                    clicked_at=now,
                )
        return token

    @property
    def clicks(self) -> int:
        with self._lock:
            return self._clicks

    # --- faults -------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        retry_after: int | float | str | None = None,
        body: Any = None,
    ) -> None:
        """Answer the next ``n`` ingest requests with ``status`` without handling them.

        ``body`` is answered as JSON, or as text when it is a str.
        """
        self.add_faults([status_fault(n, status, retry_after, body)])

    def delay_next(self, n: int, seconds: float) -> None:
        """Hold each of the next ``n`` ingest requests ``seconds`` before handling it."""
        self.add_faults([delay_fault(n, seconds)])

    def drop_next(self, n: int = 1, *, after_commit: bool = False) -> None:
        """Close the connection of the next ``n`` ingest requests with no answer.

        With ``after_commit`` the event is handled and written first, so the sender
        sees a transport failure for an event MMOLove has in fact accepted.
        """
        self.add_faults([drop_fault(n, after_commit=after_commit)])

    def add_faults(self, faults: Iterable[Fault]) -> None:
        """Queue faults; each applies to its next ``remaining`` requests, in order."""
        with self._lock:
            self._faults.extend(replace(fault) for fault in faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
        # Release any request now sleeping in a delay, then re-arm for later delays.
        self._wake.set()
        self._wake = threading.Event()

    @property
    def faults(self) -> list[dict[str, Any]]:
        with self._lock:
            return [fault.as_dict() for fault in self._faults]

    def take_fault(self) -> Fault | None:
        """The fault for the request arriving now, if one is scripted; queued in order."""
        with self._lock:
            if not self._faults:
                return None
            fault = self._faults[0]
            fault.remaining -= 1
            if fault.remaining == 0:
                self._faults.pop(0)
            return replace(fault)

    def wait(self, seconds: float) -> None:
        """Sleep for a delay fault, cut short by ``clear_faults`` or shutdown."""
        self._wake.wait(seconds)

    def wake(self) -> None:
        self._wake.set()

    # --- ingest -------------------------------------------------------------------

    def ingest(
        self,
        raw: bytes,
        signature: str | None,
        *,
        content_type: str | None = None,
        fault: Fault | None = None,
        answered: bool = True,
    ) -> Reply:
        """Handle one POST to the ingest endpoint and log it.

        ``answered`` False logs the request as dropped (no status reached the sender),
        while still writing the event: the lost-response case.
        """
        with self._lock:
            now = self.clock()
            try:
                reply = self._decide(raw, signature, now)
            except _Rejected as rejected:
                reply = rejected.reply
            self._append(
                now,
                raw,
                signature,
                content_type,
                status=reply.status if answered else None,
                verdict=reply.verdict,
                response=reply.data,
                fault=fault.label if fault else None,
                committed=reply.committed,
            )
            return reply

    def log_fault(
        self,
        raw: bytes,
        signature: str | None,
        fault: Fault,
        *,
        content_type: str | None = None,
        status: int | None = None,
        response: dict[str, Any] | None = None,
    ) -> None:
        """Log a request a fault answered with ``status`` or, with None, dropped unhandled."""
        with self._lock:
            self._append(
                self.clock(),
                raw,
                signature,
                content_type,
                status=status,
                verdict="dropped" if status is None else "fault_status",
                response=response,
                fault=fault.label,
                committed=False,
            )

    def _append(
        self,
        now: float,
        raw: bytes,
        signature: str | None,
        content_type: str | None,
        *,
        status: int | None,
        verdict: str,
        response: dict[str, Any] | None,
        fault: str | None,
        committed: bool,
    ) -> None:
        self._seq += 1
        peeked = _peek(raw)
        self._log.append(
            LogRecord(
                seq=self._seq,
                time=now,
                body=raw,
                signature=signature,
                content_type=content_type,
                status=status,
                verdict=verdict,
                response=response,
                event=peeked.get("event"),
                token=peeked.get("token"),
                server_event_id=peeked.get("server_event_id"),
                fault=fault,
                committed=committed,
            )
        )

    def _decide(self, raw: bytes, signature: str | None, now: float) -> Reply:
        # Order per protocol.md section 9: signature, JSON, fields, dry run, then state.
        if not signature:
            raise _reject(400, "malformed_signature", f"missing {SIGNATURE_HEADER} header")
        try:
            verify_signature(self._secret, raw, signature, tolerance=self.tolerance, now=int(now))
        except MalformedSignatureError as exc:
            raise _reject(400, "malformed_signature", str(exc)) from None
        except StaleSignatureError as exc:
            raise _reject(401, "stale_signature", "bad_signature", detail=str(exc)) from None
        except BadSignatureError as exc:
            raise _reject(401, "bad_signature", "bad_signature", detail=str(exc)) from None
        try:
            data = _parse(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise _reject(400, "invalid_json", "body is not valid JSON") from None
        if not isinstance(data, dict):
            raise _reject(400, "invalid_json", "body must be a JSON object")
        event = _validate(data)
        if event.test:
            return Reply(200, {"ok": True, "test": True}, "test")
        if event.server_id != self.server_id:
            raise _reject(404, "unknown_server", "unknown server")
        try:
            claims = self.tokens.verify(event.token, self.server_id)
        except TokenError as exc:
            raise _reject(404, exc.reason, str(exc)) from None
        key = (event.token, event.event, event.server_event_id)
        if key in self._seen:
            self._posts[event.token, event.event] += 1
            return Reply(200, {"ok": True, "duplicate": True}, "duplicate")
        referral = self._referrals.get(event.token) or Referral(
            token=event.token,
            referral_id=_referral_id(),
            referrer=claims.referrer,
            server_id=claims.server_id,
            state="clicked",
            clicked_at=float(claims.issued_at),
        )
        reply, referral = self._transition(event, referral, now)
        if reply.committed:
            self._referrals[event.token] = referral
            self._seen.add(key)
            self._accepted[event.event] += 1
            self._posts[event.token, event.event] += 1
        return reply

    def _transition(self, event: _Event, referral: Referral, now: float) -> tuple[Reply, Referral]:
        def state_reply(ref: Referral, verdict: str) -> tuple[Reply, Referral]:
            data = {"ok": True, "referral_id": ref.referral_id, "state": ref.state}
            return Reply(200, data, verdict, committed=True), ref

        conflict = Reply(
            200, {"ok": True, "ignored": "first_touch_conflict"}, "first_touch_conflict", True
        )
        if event.event == "registered":
            if referral.state != "clicked":
                return state_reply(referral, "unchanged")
            identity = event.referee_identity
            assert identity is not None
            owner = self._referees.get(identity)
            if owner is not None and owner != event.token:
                return conflict, replace(referral, conflicting_identity=identity)
            self._referees[identity] = event.token
            advanced = replace(
                referral, state="registered", referee_identity=identity, registered_at=now
            )
            return state_reply(advanced, "advanced")
        if event.event == "qualified":
            if referral.state == "registered":
                return state_reply(
                    replace(referral, state="qualified", qualified_at=now), "advanced"
                )
            if referral.state == "qualified":
                return state_reply(referral, "unchanged")
            if referral.conflicting_identity is not None:
                # The referee belongs to another referrer; qualifying them here is the
                # same expected, harmless no-op as the registered that lost first touch.
                return conflict, referral
            reply = Reply(
                422,
                {"error": "qualified before registered: send registered first", "state": "clicked"},
                "invalid_transition",
            )
            return reply, referral
        # reversed: accepted and recorded, but the endpoint does not act on it yet.
        return state_reply(replace(referral, reversals=referral.reversals + 1), "recorded")

    # --- reading ------------------------------------------------------------------

    @property
    def log(self) -> list[LogRecord]:
        with self._lock:
            return list(self._log)

    @property
    def referrals(self) -> dict[str, Referral]:
        with self._lock:
            return dict(self._referrals)

    def accepted_count(self, event: str | None = None) -> int:
        """Events written (not duplicates, not dry runs), of one kind or all."""
        with self._lock:
            if event is None:
                return sum(self._accepted.values())
            return self._accepted[event]

    def accepted_posts(self, token: str, event: str) -> int:
        """200 answers (duplicates included) to real ``event`` posts for ``token``."""
        with self._lock:
            return self._posts[token, event]

    def redact(self, text: str) -> str:
        """``text`` with the secret and token key scrubbed, for anything shown to people."""
        return self._redact(text)

    def public_log(self) -> list[dict[str, Any]]:
        """The log as JSON-ready dicts with every secret scrubbed, for /log and /log.json."""
        return [self.scrub(record.as_dict()) for record in self.log]

    def scrub(self, value: Any) -> Any:
        # Field by field, before any encoding: a secret with characters that JSON or
        # HTML escape would otherwise slip past a search of the encoded text.
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {self.scrub(key): self.scrub(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.scrub(item) for item in value]
        return value

    def snapshot(self) -> dict[str, Any]:
        """Referrals and counters, JSON-ready, for tests that drive another process."""
        with self._lock:
            return {
                "server_id": self.server_id,
                "clicks": self._clicks,
                "accepted": dict(self._accepted),
                "referrals": [
                    {
                        "token": ref.token,
                        "referral_id": ref.referral_id,
                        "referrer": ref.referrer,
                        "state": ref.state,
                        "referee_identity": ref.referee_identity,
                        "conflicting_identity": ref.conflicting_identity,
                        "reversals": ref.reversals,
                        "accepted_posts": {
                            event: self._posts[ref.token, event]
                            for event in EVENTS
                            if self._posts[ref.token, event]
                        },
                    }
                    for ref in self._referrals.values()
                ],
            }

    def reset(self) -> None:
        """Forget every referral, key, log record and fault; keep server and secret."""
        with self._lock:
            self._referrals.clear()
            self._referees.clear()
            self._seen.clear()
            self._log.clear()
            self._faults.clear()
            self._accepted.clear()
            self._posts.clear()
            self._clicks = 0
            self._seq = 0
        self._wake.set()
        self._wake = threading.Event()


def _count(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError("the request count must be a whole number, at least 1")
    return n


def status_fault(
    n: int = 1, status: int = 500, retry_after: int | float | str | None = None, body: Any = None
) -> Fault:
    """A fault answering ``status`` (with ``Retry-After`` and ``body`` if given)."""
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise ValueError("status must be an HTTP status between 200 and 599")
    header = None if retry_after is None else _retry_after_header(retry_after)
    return Fault("status", _count(n), status=status, retry_after=header, body=body)


def delay_fault(n: int, seconds: float) -> Fault:
    """A fault holding each request ``seconds`` before handling it normally."""
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or seconds < 0
    ):
        raise ValueError("seconds must be a non-negative number")
    return Fault("delay", _count(n), seconds=float(seconds))


def drop_fault(n: int = 1, *, after_commit: bool = False) -> Fault:
    """A fault closing the connection unanswered, before or after handling the event."""
    if not isinstance(after_commit, bool):
        raise ValueError("after_commit must be a boolean")
    return Fault("drop", _count(n), after_commit=after_commit)


def fault_from_json(spec: Any) -> Fault:
    """A fault from a ``POST /_faults`` item; raises ValueError when malformed.

    ``{"kind": "status", "count": 2, "status": 503, "retry_after": 5, "body": {...}}``,
    ``{"kind": "delay", "count": 1, "seconds": 2.5}`` or
    ``{"kind": "drop", "count": 1, "after_commit": true}``.
    """
    if not isinstance(spec, dict):
        raise ValueError("a fault must be a JSON object")
    kind = spec.get("kind")
    count = spec.get("count", 1)
    if kind == "status":
        retry_after = spec.get("retry_after")
        if retry_after is not None and (
            isinstance(retry_after, bool) or not isinstance(retry_after, (int, float, str))
        ):
            raise ValueError("retry_after must be seconds or an HTTP date")
        return status_fault(count, spec.get("status", 500), retry_after, spec.get("body"))
    if kind == "delay":
        seconds = spec.get("seconds")
        if seconds is None:
            raise ValueError("a delay needs seconds")
        return delay_fault(count, seconds)
    if kind == "drop":
        return drop_fault(count, after_commit=spec.get("after_commit", False))
    raise ValueError("kind must be one of status, delay, drop")


def _referral_id() -> str:
    return "ref_" + secrets.token_hex(8)


def _retry_after_header(value: int | float | str) -> str:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("retry_after must not be blank")
        return value.strip()
    if isinstance(value, bool) or value < 0:
        raise ValueError("retry_after must be a non-negative number of seconds")
    return str(int(value)) if float(value).is_integer() else str(value)
