"""The Outbox: checks what it is given, runs the named statements in a transaction, and
turns rows into values."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import migrate, schema
from .engine import CREATE_HINT, explained, transaction
from .queries import Lease, Statements, insert_if_absent
from .values import (
    DEAD,
    DELIVERED,
    IDENTITY_MAX,
    PENDING,
    STATES,
    Credit,
    Ending,
    OutboxError,
    OutboxEvent,
    Stats,
    _event_fields,
    _limit,
    _owner,
    _positive,
    _text,
    _time,
)


class Outbox:
    """The events, first-touch bindings and credits of one portal, in three tables.

    ``table_prefix`` namespaces the tables (``<prefix>events``, ``<prefix>bindings``,
    ``<prefix>credits``) so they can live in the portal's own database. ``clock``
    returns unix seconds; every stored time comes from it, never from the database.
    ``metadata``: declare the tables there (the portal's, whose migrations then own
    them) instead of in a metadata of the outbox's own; ``create_hint`` says how to
    create them when they are missing.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        table_prefix: str = "mmolove_",
        clock: Callable[[], float] = time.time,
        metadata: sa.MetaData | None = None,
        create_hint: str = CREATE_HINT,
    ) -> None:
        self._tables = schema.make_tables(table_prefix, metadata)
        self._create_hint = create_hint
        self._sql = Statements(self._tables, engine.dialect)
        self.engine = engine
        self.table_prefix = table_prefix
        self.clock = clock
        self.metadata = self._tables.metadata
        self.events = self._tables.events
        self.bindings = self._tables.bindings
        self.credits = self._tables.credits
        #: Why this outbox refuses every use (an outdated schema), or None.
        self._refusal: str | None = None

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"<Outbox {self.table_prefix!r} at {url}>"

    # --- schema -------------------------------------------------------------------

    def create_all(self, *, defer_refusal: bool = False) -> None:
        """Create a fresh outbox at the current schema version, or check the one there.

        An outdated one (0.1.0's included) is refused with :class:`OutboxOutdated`
        naming ``flask mmolove db upgrade``; with ``defer_refusal``, every later use
        of this Outbox is refused instead, until :meth:`upgrade`. Safe when several
        processes start at once: SQLite's ``BEGIN IMMEDIATE`` and a PostgreSQL
        advisory lock make the check-then-create a critical section.
        """
        try:
            migrate.ensure_current(self.engine, self._tables)
        except migrate.OutboxOutdated as exc:
            if not defer_refusal:
                raise
            self._refusal = str(exc)

    def upgrade(self) -> tuple[migrate.SchemaVersion, migrate.SchemaVersion]:
        """Migrate the schema to the current version, events kept; (before, after)."""
        versions = migrate.upgrade(self.engine, self._tables)
        self._refusal = None
        return versions

    def schema_version(self) -> migrate.SchemaVersion:
        return migrate.read_version(self.engine, self._tables)

    def drop_all(self) -> None:
        """Drop the outbox tables, everything in them and the schema version (tests)."""
        migrate.drop_all(self.engine, self._tables)

    # --- enqueue ------------------------------------------------------------------

    def bind_and_enqueue(
        self,
        *,
        identity: str,
        token: str,
        event: str,
        server_event_id: str,
        body: bytes,
        connection: Connection | None = None,
    ) -> tuple[str, int | None]:
        """Bind ``identity`` to ``token`` if it is unbound, then enqueue if they match.

        First touch wins: an identity already bound keeps its first token. Returns the
        bound token and the event's id, or None when the identity belongs to another
        token (nothing is enqueued then). One transaction; idempotent like
        :meth:`enqueue`. With ``connection``, both are written in the caller's
        transaction (see :meth:`enqueue`).
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

    def _bind(self, conn: Connection, binding: Mapping[str, Any]) -> str:
        """Bind the identity unless it is bound (first touch); the token it is bound to."""
        insert = self._sql.bind
        if insert is None:
            insert_if_absent(conn, self.bindings, binding, ("identity",))
        elif conn.execute(insert, binding).first() is not None:
            return str(binding["token"])
        return str(conn.execute(self._sql.bound_token_of, binding).scalar_one())

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

    # --- claiming and settling events ---------------------------------------------

    def claim(
        self,
        owner: str,
        *,
        limit: int,
        lease: float,
        ids: Sequence[int] | None = None,
    ) -> list[OutboxEvent]:
        """Lease up to ``limit`` due events to ``owner`` for ``lease`` seconds.

        Due means pending, ``next_attempt_at`` reached and no live lease; oldest due
        first. ``ids`` narrows the choice to those events (still only if due: to retry
        one early, :meth:`requeue` it first). Each claim counts as an attempt.
        ``owner`` must be unique per claimer (host, pid and a random part).
        """
        owner = _owner(owner)
        limit = _limit(limit)
        _positive("lease", lease)
        params: dict[str, Any] = {"limit": limit}
        statements = self._sql.claim_events
        if ids is not None:
            params["ids"] = [int(i) for i in ids]
            if not params["ids"]:
                return []
            statements = self._sql.claim_events_by_id
        now = self.clock()
        rows = self._lease(
            statements, now, params, owner=owner, until=now + lease, last_attempt_at=now
        )
        return [OutboxEvent.from_row(row) for row in rows]

    def _lease(
        self,
        statements: Lease,
        now: float,
        params: dict[str, Any],
        *,
        owner: str,
        until: float,
        **values: Any,
    ) -> list[sa.Row[Any]]:
        """Lease up to ``params["limit"]`` rows that are due at ``now`` to ``owner``;
        the rows as they are now, oldest due first. ``values`` sets further columns.

        The one claiming mechanism of the outbox, for events and credits alike: each
        claim counts as an attempt, and the row is next due when its lease runs out.
        """
        params = {**params, "now": now}
        with self._transaction() as conn:
            chosen = list(conn.scalars(statements.pick, params))
            if not chosen:
                return []
            leased = conn.execute(
                statements.lease,
                {
                    **params,
                    "chosen": chosen,
                    "owner": owner,
                    "until": until,
                    **{f"v_{column}": value for column, value in values.items()},
                },
            )
            if statements.read is None:
                rows = leased.all()
            else:
                rows = conn.execute(statements.read, {"chosen": chosen, "owner": owner}).all()
        position = {k: n for n, k in enumerate(chosen)}
        key = statements.key.name
        return sorted(rows, key=lambda row: position[row._mapping[key]])

    def settle(self, owner: str, endings: Sequence[Ending]) -> set[int]:
        """Record how ``owner``'s attempts at these events ended, in one transaction.

        Returns the ids whose lease ``owner`` still held: only those changed. An event
        whose lease ran out and was taken over keeps what its new owner records. A
        delivered event that owes a credit writes it in the same transaction, at most
        once per referee identity, ever.
        """
        owner = _owner(owner)
        ids = [ending.event_id for ending in endings]
        if len(set(ids)) != len(ids):
            raise ValueError("settle: each event may end only once per call")
        if not ids:
            return set()
        now = self.clock()
        with self._transaction() as conn:
            held = {
                int(row.id): row
                for row in conn.execute(self._sql.settle_pick(ids))
                if row.lease_owner == owner and row.state == PENDING
            }
            by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for ending in endings:
                if ending.event_id not in held:
                    continue
                values = dict(ending.values)
                if values.get("state") == DELIVERED:
                    values["delivered_at"] = now
                by_columns.setdefault(tuple(sorted(values)), []).append(
                    {
                        "k_id": ending.event_id,
                        "k_owner": owner,
                        **{f"v_{name}": value for name, value in values.items()},
                    }
                )
            # One statement per kind of ending, each given every row of that kind.
            for columns, rows in by_columns.items():
                conn.execute(self._sql.lease_end(columns), rows)
            for ending in endings:
                if ending.credit and ending.event_id in held:
                    row = held[ending.event_id]
                    credit = {
                        "identity": row.identity,
                        "token": row.token,
                        "event_id": ending.event_id,
                        "outcome": ending.values["outcome"],
                        "created_at": now,
                        "attempts": 0,
                        "next_attempt_at": now,
                    }
                    insert_if_absent(conn, self.credits, credit, ("identity",))
        return set(held)

    def complete(
        self,
        event_id: int,
        owner: str,
        *,
        status: int,
        response: str,
        outcome: str,
        credit: bool,
    ) -> bool:
        """Record an accepted event (see :meth:`settle`); False if the lease is not ours."""
        ending = Ending.delivered(
            event_id, status=status, response=response, outcome=outcome, credit=credit
        )
        return event_id in self.settle(owner, [ending])

    def reschedule(
        self,
        event_id: int,
        owner: str,
        *,
        at: float,
        status: int | None,
        reason: str,
        error: str,
    ) -> bool:
        """Give up ``owner``'s lease and make the event due again at ``at``."""
        ending = Ending.retry(event_id, at=at, status=status, reason=reason, error=error)
        return event_id in self.settle(owner, [ending])

    def dead_letter(
        self, event_id: int, owner: str, *, status: int | None, reason: str, error: str
    ) -> bool:
        """Stop retrying the event; only :meth:`requeue` brings it back."""
        ending = Ending.dead(event_id, status=status, reason=reason, error=error)
        return event_id in self.settle(owner, [ending])

    def release_dry_runs(self) -> int:
        """Make every event held after a dry run due now, to be sent for real (test
        mode is off); return how many."""
        with self._transaction() as conn:
            done = conn.execute(self._sql.release_dry_runs, {"now": self.clock()})
            return int(done.rowcount)

    def requeue(self, ids: Sequence[int] | None = None) -> int:
        """Make events due now; return how many changed.

        Without ``ids``: every undelivered event not in flight, that is every dead
        event and every pending one due later (backing off, or held after a 401). With
        ``ids``: those that are dead, or pending and waiting for a retry ("retry now").
        Either way an event in flight keeps its lease and a delivered one stays
        delivered. A dead event starts over at zero attempts.
        """
        now = self.clock()
        if ids is not None:
            ids = [int(i) for i in ids]
            if not ids:
                return 0
        with self._transaction() as conn:
            return int(conn.execute(self._sql.requeue(ids, now)).rowcount)

    # --- reading ------------------------------------------------------------------

    def next_due_at(self) -> float | None:
        """When something next needs doing: the earliest due time (or lease expiry) of a
        pending event or an unannounced credit; None when there is nothing at all.

        A time in the past means "now". A deliverer may sleep until then. An event
        waiting for an earlier one of its token does not count: it becomes due when that
        one is settled, by the deliverer that settles it.
        """
        with self._transaction(read_only=True) as conn:
            event_due = conn.execute(self._sql.next_event_due()).scalar_one_or_none()
            credit_due = conn.execute(self._sql.next_credit_due()).scalar_one_or_none()
        times = [float(t) for t in (event_due, credit_due) if t is not None]
        return min(times) if times else None

    def stats(self) -> Stats:
        now = self.clock()
        counts: dict[str, int] = {}
        in_flight = 0
        oldest: float | None = None
        with self._transaction(read_only=True) as conn:
            # One statement for the events, so that on PostgreSQL (a snapshot per
            # statement) the counts agree with each other.
            for state, n, leased, first in conn.execute(self._sql.event_counts(now)):
                counts[str(state)] = int(n)
                if state == PENDING:
                    in_flight, oldest = int(leased or 0), float(first)
            unnotified = conn.execute(self._sql.credits_unnotified()).scalar_one()
        return Stats(
            pending=counts.get(PENDING, 0) - in_flight,
            in_flight=in_flight,
            delivered=counts.get(DELIVERED, 0),
            dead=counts.get(DEAD, 0),
            oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
            credits_unnotified=int(unnotified),
        )

    def purge(self, *, before: float) -> int:
        """Delete delivered events delivered before ``before``; return how many.

        Dead and pending events are never purged, and credits and first-touch bindings
        are kept whatever happens to the events that made them.
        """
        statement = self._sql.purge(_time("before", before))
        with self._transaction() as conn:
            return int(conn.execute(statement).rowcount)

    def list_events(
        self, *, state: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[OutboxEvent]:
        """Events newest first, optionally only those in ``state``."""
        if state is not None and state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must not be negative")
        with self._transaction(read_only=True) as conn:
            rows = conn.execute(self._sql.list_events(state, limit, offset))
            return [OutboxEvent.from_row(row) for row in rows]

    def get(self, event_id: int) -> OutboxEvent | None:
        with self._transaction(read_only=True) as conn:
            row = conn.execute(self._sql.event(event_id)).one_or_none()
        return None if row is None else OutboxEvent.from_row(row)

    # --- credits ------------------------------------------------------------------

    def claim_credits(self, owner: str, *, limit: int, lease: float) -> list[Credit]:
        """Lease up to ``limit`` unannounced credits to ``owner``, oldest due first.

        Announce each, then :meth:`finish_credit`; if announcing failed,
        :meth:`release_credit`. A lease that runs out makes the credit claimable again.
        """
        owner = _owner(owner)
        limit = _limit(limit)
        _positive("lease", lease)
        now = self.clock()
        rows = self._lease(
            self._sql.claim_credits, now, {"limit": limit}, owner=owner, until=now + lease
        )
        return [Credit.from_row(row) for row in rows]

    def finish_credit(
        self, identity: str, owner: str, *, connection: Connection | None = None
    ) -> bool:
        """Record that ``owner`` announced the credit; False if the lease is not ours.

        With ``connection``, in the caller's transaction: recorded if and when the
        caller commits (with whatever its receivers wrote there).
        """
        with self._transaction_on(connection) as conn:
            done = conn.execute(
                self._sql.end_credit_lease(identity, owner, notified_at=self.clock())
            )
            return done.rowcount == 1

    def release_credit(self, identity: str, owner: str, *, retry_at: float) -> bool:
        """Announcing failed: give the lease up and try again at ``retry_at``."""
        retry_at = _time("retry_at", retry_at)
        with self._transaction() as conn:
            done = conn.execute(
                self._sql.end_credit_lease(identity, owner, next_attempt_at=retry_at)
            )
            return done.rowcount == 1

    def dispose(self) -> None:
        """Close the engine's pooled connections (in a forked child use
        ``engine.dispose(close=False)`` instead)."""
        self.engine.dispose()

    # --- plumbing -----------------------------------------------------------------

    def _transaction(self, *, read_only: bool = False) -> AbstractContextManager[Connection]:
        if self._refusal is not None:
            raise migrate.OutboxOutdated(self._refusal)
        return transaction(
            self.engine,
            read_only=read_only,
            tables=self._tables.names,
            create_hint=self._create_hint,
        )

    @contextmanager
    def _transaction_on(
        self, connection: Connection | None, *, read_only: bool = False
    ) -> Iterator[Connection]:
        """``connection`` as it is, in whatever transaction the caller has it in;
        without one, a transaction of our own."""
        if connection is None:
            with self._transaction(read_only=read_only) as conn:
                yield conn
        else:
            with explained(connection.engine, self._tables.names, self._create_hint):
                yield connection
