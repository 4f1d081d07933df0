"""MMOLove's rules for one ingest request: its checks, its answers, its state machine.

Nothing here keeps state: :class:`~.state.SandboxState` hands in what it has stored
(referrals, who owns which referee) and, under its lock, writes back what comes out.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..protocol import (
    EVENTS,
    SIGNATURE_HEADER,
    BadSignatureError,
    MalformedSignatureError,
    StaleSignatureError,
    verify_signature,
)
from .tokens import TokenClaims, TokenError, TokenMinter

ReferralState = Literal["clicked", "registered", "qualified"]


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


def new_referral(token: str, *, referrer: str, server_id: str, clicked_at: float) -> Referral:
    """A referral just clicked, under a fresh random referral id."""
    return Referral(
        token=token,
        referral_id="ref_" + secrets.token_hex(8),
        referrer=referrer,
        server_id=server_id,
        state="clicked",
        clicked_at=clicked_at,
    )


@dataclass(frozen=True)
class Reply:
    """What the ingest endpoint answers, and how to file it."""

    status: int
    data: dict[str, Any]
    verdict: str
    committed: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)


class Rejected(Exception):
    """A request refused before any state changed; ``reply`` is the answer to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.verdict)
        self.reply = reply


def reject(status: int, verdict: str, error: str, **extra: Any) -> Rejected:
    return Rejected(Reply(status, {"error": error, **extra}, verdict))


def dry_run_reply() -> Reply:
    """The answer to a ``test`` event that passed every check (protocol.md section 8)."""
    return Reply(200, {"ok": True, "test": True}, "test")


def duplicate_reply() -> Reply:
    """The answer to a (token, event, server_event_id) that arrived before."""
    return Reply(200, {"ok": True, "duplicate": True}, "duplicate")


# --- the body -----------------------------------------------------------------------


def _no_constants(name: str) -> Any:
    # NaN and Infinity are Python extensions, not JSON; MMOLove would not parse them.
    raise ValueError(f"{name} is not valid JSON")


def _parse(raw: bytes) -> Any:
    return json.loads(raw.decode("utf-8"), parse_constant=_no_constants)


def _string_field(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        raise reject(400, "invalid_field", f"{name} is required", field=name)
    if not isinstance(value, str):
        raise reject(
            400, "invalid_field", f"{name} must be a string, not {_json_type(value)}", field=name
        )
    trimmed = value.strip()
    if not trimmed:
        raise reject(400, "invalid_field", f"{name} is required and must not be blank", field=name)
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
class Event:
    """The fields of a valid event body, trimmed."""

    event: str
    token: str
    server_id: str
    server_event_id: str
    referee_identity: str | None
    test: bool


def _validate(data: Mapping[str, Any]) -> Event:
    event = _string_field(data, "event")
    if event not in EVENTS:
        raise reject(
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
        raise reject(
            400, "invalid_field", "ts must be a positive number of unix seconds", field="ts"
        )
    test = data.get("test", False)
    # A string "true" must not silently turn a dry run into a real event.
    if test is not None and not isinstance(test, bool):
        raise reject(400, "invalid_field", "test must be a boolean", field="test")
    return Event(event, token, server_id, server_event_id, identity, test is True)


def peek(raw: bytes) -> dict[str, str | None]:
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


# --- the checks, in protocol order ----------------------------------------------------


def read_event(
    raw: bytes, signature: str | None, *, secret: str, tolerance: int, now: float
) -> Event:
    """The event a request carries once its signature, JSON and fields check out.

    Raises :class:`Rejected` with the 400 or 401 MMOLove answers at the first failure.
    """
    if not signature:
        raise reject(400, "malformed_signature", f"missing {SIGNATURE_HEADER} header")
    try:
        verify_signature(secret, raw, signature, tolerance=tolerance, now=int(now))
    except MalformedSignatureError as exc:
        raise reject(400, "malformed_signature", str(exc)) from None
    except StaleSignatureError as exc:
        raise reject(401, "stale_signature", "bad_signature", detail=str(exc)) from None
    except BadSignatureError as exc:
        raise reject(401, "bad_signature", "bad_signature", detail=str(exc)) from None
    try:
        data = _parse(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise reject(400, "invalid_json", "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise reject(400, "invalid_json", "body must be a JSON object")
    return _validate(data)


def check_server(event: Event, *, server_id: str) -> None:
    """Raises :class:`Rejected` (404) unless the event names ``server_id``.

    Dry runs too: MMOLove picks the secret by server id, so a dry run for an unknown
    server cannot pass (protocol.md section 8), and ``flask mmolove ping`` catches a
    wrong ``MMOLOVE_SERVER_ID``.
    """
    if event.server_id != server_id:
        raise reject(404, "unknown_server", "unknown server")


def check_target(event: Event, *, server_id: str, tokens: TokenMinter) -> TokenClaims:
    """The claims of the event's token; raises :class:`Rejected` (404) unless it is live
    and minted for ``server_id``, the server the event names."""
    check_server(event, server_id=server_id)
    try:
        return tokens.verify(event.token, server_id)
    except TokenError as exc:
        raise reject(404, exc.reason, str(exc)) from None


# --- the state machine ----------------------------------------------------------------


def transition(
    event: Event, referral: Referral, referees: Mapping[str, str], now: float
) -> tuple[Reply, Referral]:
    """The answer to ``event`` and the referral as it stands after it.

    ``referees`` maps each referee identity to the token that registered it first.
    A ``registered`` that advances the referral claims its referee (first touch): the
    caller records that when it writes the referral.
    """

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
        owner = referees.get(identity)
        if owner is not None and owner != event.token:
            return conflict, replace(referral, conflicting_identity=identity)
        advanced = replace(
            referral, state="registered", referee_identity=identity, registered_at=now
        )
        return state_reply(advanced, "advanced")
    if event.event == "qualified":
        if referral.state == "registered":
            return state_reply(replace(referral, state="qualified", qualified_at=now), "advanced")
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
