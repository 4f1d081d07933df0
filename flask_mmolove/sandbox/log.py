"""The delivery log: every request to the ingest endpoint and what the sandbox made of it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .rules import peek


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
    #: When the request arrived, before any scripted delay (``time`` is when it was
    #: decided): the span a sender waited on it, to tell overlapping sends apart.
    received: float | None = None
    #: The sender's address, as the server saw it.
    peer: str | None = None

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
            "received": self.received,
            "peer": self.peer,
            "response": self.response,
            "body": self.body_text,
            "signature": self.signature,
            "content_type": self.content_type,
        }


class DeliveryLog:
    """The records in arrival order, numbered from 1.

    Not locked: its owner appends under the same lock that decides the request, so the
    numbering follows the order in which requests were decided.
    """

    def __init__(self) -> None:
        self._records: list[LogRecord] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._records)

    def append(
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
        received: float | None = None,
        peer: str | None = None,
    ) -> None:
        self._seq += 1
        peeked = peek(raw)
        self._records.append(
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
                received=received,
                peer=peer,
            )
        )

    def records(self) -> list[LogRecord]:
        """A copy of the records, oldest first."""
        return list(self._records)

    def clear(self) -> None:
        """Forget every record and number the next one 1 again."""
        self._records.clear()
        self._seq = 0
