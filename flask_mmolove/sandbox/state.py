"""The sandbox's memory: referrals, dedup keys, counters, the delivery log and faults.

Everything here is in memory behind one lock, because the server is threaded and an
exactly-once check is only as good as the atomicity of "seen? then record".
:mod:`.rules` decides each request, :mod:`.log` files it, :mod:`.faults` scripts
misbehaviour; :class:`SandboxState` ties them together.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from ..protocol import DEFAULT_TOLERANCE, EVENTS
from ..redaction import Redactor
from .faults import Fault, FaultQueue, delay_fault, drop_fault, status_fault
from .log import DeliveryLog, LogRecord
from .rules import (
    Referral,
    Rejected,
    Reply,
    check_server,
    check_target,
    dry_run_reply,
    duplicate_reply,
    new_referral,
    read_event,
    transition,
)
from .tokens import TokenMinter, derive_token_key


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
        # Taken before the fault queue's own lock, never after it.
        self._lock = threading.Lock()
        self._faults = FaultQueue()
        self._referrals: dict[str, Referral] = {}
        self._referees: dict[str, str] = {}
        self._seen: set[tuple[str, str, str]] = set()
        self._log = DeliveryLog()
        self._accepted: Counter[str] = Counter()
        self._posts: Counter[tuple[str, str]] = Counter()
        self._clicks = 0

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
                self._referrals[token] = new_referral(
                    token, referrer=referrer, server_id=target, clicked_at=now
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
        self._faults.add(faults)

    def clear_faults(self) -> None:
        self._faults.clear()

    @property
    def faults(self) -> list[dict[str, Any]]:
        return self._faults.as_dicts()

    def take_fault(self) -> Fault | None:
        """The fault for the request arriving now, if one is scripted; queued in order."""
        return self._faults.take()

    def wait(self, seconds: float) -> None:
        """Sleep for a delay fault, cut short by ``clear_faults`` or shutdown."""
        self._faults.wait(seconds)

    def wake(self) -> None:
        self._faults.wake()

    # --- ingest -------------------------------------------------------------------

    def ingest(
        self,
        raw: bytes,
        signature: str | None,
        *,
        content_type: str | None = None,
        fault: Fault | None = None,
        answered: bool = True,
        received: float | None = None,
        peer: str | None = None,
    ) -> Reply:
        """Handle one POST to the ingest endpoint and log it.

        ``answered`` False logs the request as dropped (no status reached the sender),
        while still writing the event: the lost-response case.
        """
        with self._lock:
            now = self.clock()
            try:
                reply = self._decide(raw, signature, now)
            except Rejected as rejected:
                reply = rejected.reply
            self._log.append(
                now,
                raw,
                signature,
                content_type,
                status=reply.status if answered else None,
                verdict=reply.verdict,
                response=reply.data,
                fault=fault.label if fault else None,
                committed=reply.committed,
                received=received,
                peer=peer,
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
        received: float | None = None,
        peer: str | None = None,
    ) -> None:
        """Log a request a fault answered with ``status`` or, with None, dropped unhandled."""
        with self._lock:
            self._log.append(
                self.clock(),
                raw,
                signature,
                content_type,
                status=status,
                verdict="dropped" if status is None else "fault_status",
                response=response,
                fault=fault.label,
                committed=False,
                received=received,
                peer=peer,
            )

    def _decide(self, raw: bytes, signature: str | None, now: float) -> Reply:
        # Order per protocol.md section 9: signature, JSON, fields, server, dry run, then
        # state. The server comes before the dry run: it selects the secret (section 8).
        event = read_event(raw, signature, secret=self._secret, tolerance=self.tolerance, now=now)
        check_server(event, server_id=self.server_id)
        if event.test:
            return dry_run_reply()
        claims = check_target(event, server_id=self.server_id, tokens=self.tokens)
        key = (event.token, event.event, event.server_event_id)
        if key in self._seen:
            self._posts[event.token, event.event] += 1
            return duplicate_reply()
        referral = self._referrals.get(event.token) or new_referral(
            event.token,
            referrer=claims.referrer,
            server_id=claims.server_id,
            clicked_at=float(claims.issued_at),
        )
        reply, updated = transition(event, referral, self._referees, now)
        if reply.committed:
            if referral.referee_identity is None and updated.referee_identity is not None:
                # First touch: the referral that registers a referee first owns it.
                self._referees[updated.referee_identity] = event.token
            self._referrals[event.token] = updated
            self._seen.add(key)
            self._accepted[event.event] += 1
            self._posts[event.token, event.event] += 1
        return reply

    # --- reading ------------------------------------------------------------------

    @property
    def log(self) -> list[LogRecord]:
        with self._lock:
            return self._log.records()

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
            self._accepted.clear()
            self._posts.clear()
            self._clicks = 0
            # Under the store's lock too, so a reset stays one step to whatever waits
            # on that lock (ingest, the log, the snapshot).
            self._faults.clear()
