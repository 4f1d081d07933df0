"""Scripted faults: how the sandbox misbehaves on purpose, and the queue of those pending.

A fault stands in for what the network or MMOLove can do to a sender: answer an error
status (with ``Retry-After``), answer late, or close the connection with no answer,
before or after the event was written.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

FaultKind = Literal["status", "delay", "drop"]


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


def _retry_after_header(value: int | float | str) -> str:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("retry_after must not be blank")
        return value.strip()
    if isinstance(value, bool) or value < 0:
        raise ValueError("retry_after must be a non-negative number of seconds")
    return str(int(value)) if float(value).is_integer() else str(value)


class FaultQueue:
    """The faults waiting for requests, applied in order, and the cut-off for delays.

    Thread-safe on its own lock. An owner that holds a lock of its own takes it before
    this one, never after, so the two cannot deadlock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Fault] = []
        # Set on stop, clear or reset so a scripted delay never outlives its purpose.
        self._wake = threading.Event()

    def add(self, faults: Iterable[Fault]) -> None:
        """Queue faults; each applies to its next ``remaining`` requests, in order."""
        with self._lock:
            # Copies: the caller's Fault objects are not counted down under its feet.
            self._pending.extend(replace(fault) for fault in faults)

    def take(self) -> Fault | None:
        """The fault for the request arriving now, if one is scripted; queued in order."""
        with self._lock:
            if not self._pending:
                return None
            fault = self._pending[0]
            fault.remaining -= 1
            if fault.remaining == 0:
                self._pending.pop(0)
            return replace(fault)

    def as_dicts(self) -> list[dict[str, Any]]:
        """The pending faults, JSON-ready, first to apply first."""
        with self._lock:
            return [fault.as_dict() for fault in self._pending]

    def clear(self) -> None:
        """Forget every pending fault and release any request held by a delay."""
        with self._lock:
            self._pending.clear()
        # Release any request now sleeping in a delay, then re-arm for later delays.
        self._wake.set()
        self._wake = threading.Event()

    def wait(self, seconds: float) -> None:
        """Sleep for a delay fault, cut short by :meth:`clear` or :meth:`wake`."""
        self._wake.wait(seconds)

    def wake(self) -> None:
        """Release every request held by a delay, and any later one until the next clear."""
        self._wake.set()
