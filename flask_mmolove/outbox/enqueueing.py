"""The write path of the Outbox: binding an identity to its token (first touch) and
enqueueing events, on the outbox's own engine or in the caller's transaction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import Connection

from ._base import StoreBase
from .clauses import insert_if_absent
from .values import IDENTITY_MAX, PENDING, OutboxError, _event_fields, _text


class Enqueueing(StoreBase):
    """``bind_and_enqueue``, ``enqueue`` and ``token_for``."""

    def bind_and_enqueue(
        self,
        *,
        identity: str,
        token: str,
        event: str,
        server_event_id: str,
        body: bytes,
        connection: Connection | None = None,
    ) -> tuple[str | None, int | None]:
        """Bind ``identity`` to ``token`` if both are unbound, then enqueue if they match.

        First touch wins: an identity already bound keeps its first token. One token is
        one MMOLove referral: a token bound to another identity is not bound again
        (enforced by the database, concurrent registrations included). Returns the
        token ``identity`` is bound to (None when the token was another's and the
        identity stays unbound) and the event's id, or None when they differ (nothing
        is enqueued then). One transaction; idempotent like :meth:`enqueue`. With
        ``connection``, both are written in the caller's transaction (see
        :meth:`enqueue`); a refused binding never aborts it.
        """
        values = self._event_values(
            event=event,
            token=token,
            identity=identity,
            server_event_id=server_event_id,
            body=body,
        )
        binding = {
            "identity": values["identity"],
            "token": values["token"],
            "bound_at": values["created_at"],
        }
        with self._transaction_on(connection) as conn:
            bound = self._bind(conn, binding)
            if bound != values["token"]:
                return bound, None
            return bound, self._enqueue(conn, values)

    def enqueue(
        self,
        *,
        event: str,
        token: str,
        identity: str,
        server_event_id: str,
        body: bytes,
        connection: Connection | None = None,
    ) -> int:
        """Store one event to be delivered now; return its id.

        Idempotent: enqueueing the same (token, event, server_event_id) again returns
        the existing id and leaves the stored body as it was.

        With ``connection``, the event is written on it, inside whatever transaction
        it is in: it is stored if and when the caller commits, and never if the caller
        rolls back. Nothing is begun or committed here, and a duplicate never aborts
        the caller's transaction.
        """
        values = self._event_values(
            event=event,
            token=token,
            identity=identity,
            server_event_id=server_event_id,
            body=body,
        )
        with self._transaction_on(connection) as conn:
            return self._enqueue(conn, values)

    def token_for(self, identity: str, *, connection: Connection | None = None) -> str | None:
        """The token ``identity`` is bound to (first touch), or None; with
        ``connection``, as the caller's transaction sees it."""
        identity = _text("identity", identity, IDENTITY_MAX)
        with self._transaction_on(connection, read_only=True) as conn:
            token = conn.execute(self._sql.bound_token(identity)).scalar_one_or_none()
        return None if token is None else str(token)

    def _event_values(self, **fields: Any) -> dict[str, Any]:
        """The row :meth:`enqueue` inserts for these arguments."""
        now = self.clock()
        return {
            **_event_fields(**fields),
            "state": PENDING,
            "attempts": 0,
            "created_at": now,
            "next_attempt_at": now,
        }

    def _bind(self, conn: Connection, binding: Mapping[str, Any]) -> str | None:
        """Bind the identity unless it or the token is bound; the token the identity is
        bound to, None when the token is another identity's."""
        insert = self._sql.bind
        if insert is None:
            insert_if_absent(conn, self.bindings, binding, None)
        elif conn.execute(insert, binding).first() is not None:
            return str(binding["token"])
        token = conn.execute(self._sql.bound_token_of, binding).scalar_one_or_none()
        return None if token is None else str(token)

    def _enqueue(self, conn: Connection, values: Mapping[str, Any]) -> int:
        insert = self._sql.insert_event
        if insert is None:
            insert_if_absent(conn, self.events, values, ("token", "event", "server_event_id"))
        else:
            new = conn.execute(insert, values).scalar_one_or_none()
            if new is not None:
                return int(new)
        found = conn.execute(self._sql.event_id_of, values).scalar_one_or_none()
        if found is None:
            raise OutboxError("the event was neither stored nor found; see the database log")
        return int(found)
