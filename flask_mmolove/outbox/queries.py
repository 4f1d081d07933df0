"""Every SQL statement of the outbox, by name, with all that differs between dialects.

Statements are built from bound parameters where they are run often, and those are
built once per :class:`Statements` and reused: building one afresh costs more than
running it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Dialect

from .clauses import _ON_CONFLICT, Lease, unleased
from .schema import Tables
from .values import DEAD, DELIVERED, DRY_RUN, PENDING

#: The columns a vote's record writes (the rest start empty).
HEART_INSERT: Final = (
    "heart_id",
    "event",
    "username",
    "payload",
    "received_at",
    "granted_at",
    "attempts",
    "next_attempt_at",
)
#: The columns an enqueue writes (the rest start empty).
EVENT_INSERT: Final = (
    "event",
    "token",
    "identity",
    "server_event_id",
    "body",
    "state",
    "attempts",
    "created_at",
    "next_attempt_at",
)


class Statements:
    """The statements on one set of tables, for the engine's dialect."""

    def __init__(self, tables: Tables, dialect: Dialect) -> None:
        self.tables = tables
        self.dialect = dialect
        self._lease_ends: dict[tuple[str, ...], sa.Update] = {}

    # --- bindings and events written ----------------------------------------------

    def bound_token(self, identity: str) -> sa.Select[Any]:
        b = self.tables.bindings
        return sa.select(b.c.token).where(b.c.identity == identity)

    @cached_property
    def bound_token_of(self) -> sa.Select[Any]:
        """The token bound to the parameter ``identity``."""
        b = self.tables.bindings
        return sa.select(b.c.token).where(b.c.identity == sa.bindparam("identity"))

    @cached_property
    def event_id_of(self) -> sa.Select[Any]:
        """The id of the event stored under the parameters ``token``, ``event`` and
        ``server_event_id``."""
        e = self.tables.events
        return sa.select(e.c.id).where(
            e.c.token == sa.bindparam("token"),
            e.c.event == sa.bindparam("event"),
            e.c.server_event_id == sa.bindparam("server_event_id"),
        )

    @cached_property
    def bind(self) -> sa.Insert | None:
        """Insert the binding (parameters: its columns) unless the identity or the token
        is bound; returns the token when it inserted. None where the dialect cannot."""
        # No conflict target: either unique key yields, and a registration racing
        # another on one token waits for it, then inserts nothing (no error, nothing
        # aborted in the portal's transaction).
        return self._insert_returning(
            self.tables.bindings, ("identity", "token", "bound_at"), None, "token"
        )

    @cached_property
    def insert_event(self) -> sa.Insert | None:
        """Insert the event (parameters: its columns) unless its key is stored; returns
        the new id when it inserted. None where the dialect cannot."""
        return self._insert_returning(
            self.tables.events, EVENT_INSERT, ("token", "event", "server_event_id"), "id"
        )

    def _insert_returning(
        self, table: sa.Table, columns: Sequence[str], key: Sequence[str] | None, returned: str
    ) -> sa.Insert | None:
        # One round trip where a row is new (the usual case) instead of an insert and a
        # read back; on a conflict nothing comes back and the caller reads the row.
        name = self.dialect.name
        if name not in _ON_CONFLICT or not self.dialect.insert_returning:
            return None
        insert = pg_dialect.insert if name == "postgresql" else sqlite_dialect.insert
        return (
            insert(table)
            .values({column: sa.bindparam(column) for column in columns})
            .on_conflict_do_nothing(index_elements=None if key is None else list(key))
            .returning(table.c[returned])
        )

    # --- claiming -----------------------------------------------------------------

    @cached_property
    def waits_for_older(self) -> sa.Exists:
        """True for an event while an earlier event of its token is still pending.

        One token's events go in the order they were written: a ``qualified`` sent
        while its ``registered`` is undelivered would be refused with a 422.
        """
        e = self.tables.events
        older = e.alias("older")
        return (
            sa.exists()
            .where(
                older.c.token == e.c.token,
                older.c.state == PENDING,
                older.c.id < e.c.id,
                # Held after a dry run: sent for real before the younger one is, once
                # test mode is off and it is released; a dry run needs no order.
                older.c.outcome.is_(None),
            )
            .correlate(e)
        )

    @cached_property
    def release_dry_runs(self) -> sa.Update:
        """Make the events held after a dry run due at the parameter ``now``."""
        e = self.tables.events
        return (
            sa.update(e)
            .where(e.c.state == PENDING, e.c.outcome == DRY_RUN)
            .values(next_attempt_at=sa.bindparam("now"), outcome=None)
        )

    @cached_property
    def database_now(self) -> sa.Select[Any]:
        """The database's clock, in unix seconds (PostgreSQL)."""
        return sa.select(sa.func.extract("epoch", sa.func.clock_timestamp()))

    @cached_property
    def renew_leases(self) -> sa.Update:
        """Extend to the parameter ``until`` the leases the parameter ``owner`` holds on
        the events with the parameter ``ids`` (expanding); a lease another has taken
        over is left alone."""
        e = self.tables.events
        return (
            sa.update(e)
            .where(
                e.c.id.in_(sa.bindparam("ids", expanding=True)),
                e.c.lease_owner == sa.bindparam("owner"),
                e.c.state == PENDING,
            )
            # A leased row is next due when its lease runs out (see _lease).
            .values(lease_until=sa.bindparam("until"), next_attempt_at=sa.bindparam("until"))
        )

    @cached_property
    def claim_events(self) -> Lease:
        """Due events, oldest due first."""
        return self._claim_events(by_id=False)

    @cached_property
    def claim_events_by_id(self) -> Lease:
        """Due events among the ``ids``, oldest due first."""
        return self._claim_events(by_id=True)

    def _claim_events(self, *, by_id: bool) -> Lease:
        e = self.tables.events
        due = sa.and_(
            e.c.state == PENDING,
            e.c.next_attempt_at <= sa.bindparam("now"),
            unleased(e, sa.bindparam("lease_now")),
            ~self.waits_for_older,
        )
        if by_id:
            due = sa.and_(due, e.c.id.in_(sa.bindparam("ids", expanding=True)))
        return self._lease(e.c.id, due, (e.c.next_attempt_at, e.c.id), ("last_attempt_at",))

    @cached_property
    def claim_credits(self) -> Lease:
        """Unannounced credits, oldest due first."""
        c = self.tables.credits
        due = sa.and_(
            c.c.notified_at.is_(None),
            c.c.next_attempt_at <= sa.bindparam("now"),
            unleased(c, sa.bindparam("lease_now")),
        )
        return self._lease(c.c.identity, due, (c.c.next_attempt_at, c.c.created_at, c.c.identity))

    def _lease(
        self,
        key: sa.Column[Any],
        due: sa.ColumnElement[bool],
        order: Sequence[sa.Column[Any]],
        values: Sequence[str] = (),
    ) -> Lease:
        table = key.table
        assert isinstance(table, sa.Table)
        pick = self.locking(sa.select(key).where(due).order_by(*order).limit(sa.bindparam("limit")))
        chosen = key.in_(sa.bindparam("chosen", expanding=True))
        # On SQLite the chosen rows are still due: BEGIN IMMEDIATE has held the write
        # lock since the SELECT. Matched by key alone, they are found by primary key;
        # with ``due`` SQLite walks the whole due range of the index.
        lease = (
            sa.update(table)
            .where(chosen, due if self.dialect.name != "sqlite" else sa.true())
            .values(
                lease_owner=sa.bindparam("owner"),
                lease_until=sa.bindparam("until"),
                # Leased rows move out of the due range of the index, so the next
                # claim does not wade through what is in flight.
                next_attempt_at=sa.bindparam("until"),
                attempts=table.c.attempts + 1,
                **{column: sa.bindparam(f"v_{column}") for column in values},
            )
        )
        read: sa.Select[Any] | None = None
        if self.dialect.update_returning:
            lease = lease.returning(*table.c)
        else:
            read = sa.select(table).where(chosen, table.c.lease_owner == sa.bindparam("owner"))
        return Lease(key, pick, lease, read)

    def locking(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """``query``, locking the rows it picks where the dialect has row locks."""
        name = self.dialect.name
        if name == "postgresql":
            # Concurrent claimers pass over each other's rows instead of queueing.
            return query.with_for_update(skip_locked=True)
        if name == "sqlite":
            # No row locks in SQLite; BEGIN IMMEDIATE already serialises writers.
            return query
        return query.with_for_update()

    # --- settling -----------------------------------------------------------------

    def settle_pick(self, ids: Sequence[int]) -> sa.Select[Any]:
        """The events ``ids`` with their lease, held until the commit."""
        e = self.tables.events
        # Found by primary key alone: given "state = 'pending'" too, SQLite reads
        # every pending event through the due index, and settling grows with the
        # backlog. Held under SQLite's write lock, or row locks elsewhere, until
        # the commit: the leases found held here are still held when the updates
        # run. The row locks wait, as an UPDATE would (skipping a row locked for a
        # moment by a claimer's pick would refuse a live lease's answer), in id
        # order (two settles never deadlock), and NO KEY on PostgreSQL (a portal's
        # foreign key to the events table locks rows KEY SHARE).
        pick = sa.select(e.c.id, e.c.identity, e.c.token, e.c.lease_owner, e.c.state).where(
            e.c.id.in_(ids)
        )
        if self.dialect.name != "sqlite":
            pick = pick.order_by(e.c.id).with_for_update(
                key_share=self.dialect.name == "postgresql"
            )
        return pick

    def lease_end(self, columns: tuple[str, ...]) -> sa.Update:
        """Set ``columns`` (parameters ``v_<column>``) on the pending event ``k_id``
        leased to ``k_owner``, and end its lease."""
        statement = self._lease_ends.get(columns)
        if statement is None:
            # Built once per set of columns and reused with new parameters: building
            # and caching a statement afresh costs more than executing it.
            e = self.tables.events
            statement = (
                sa.update(e)
                .where(
                    e.c.id == sa.bindparam("k_id"),
                    e.c.lease_owner == sa.bindparam("k_owner"),
                    e.c.state == PENDING,
                )
                .values(
                    {
                        **{name: sa.bindparam(f"v_{name}") for name in columns},
                        "lease_owner": None,
                        "lease_until": None,
                    }
                )
            )
            self._lease_ends[columns] = statement
        return statement

    def requeue(self, ids: Sequence[int] | None, now: float) -> sa.Update:
        """Make due at ``now`` every undelivered event not in flight (dead, or pending
        and due later: backing off, or held after a 401), or those of ``ids`` that are
        dead or pending without a live lease; a dead one starts over at zero attempts."""
        e = self.tables.events
        waiting = sa.and_(e.c.state == PENDING, unleased(e, now))
        if ids is None:
            # Events already due are left as they are: their place in line is kept.
            which: sa.ColumnElement[bool] = sa.or_(
                e.c.state == DEAD, sa.and_(waiting, e.c.next_attempt_at > now)
            )
        else:
            which = sa.and_(e.c.id.in_(ids), sa.or_(e.c.state == DEAD, waiting))
        return (
            sa.update(e)
            .where(which)
            .values(
                state=PENDING,
                next_attempt_at=now,
                lease_owner=None,
                lease_until=None,
                attempts=sa.case((e.c.state == DEAD, 0), else_=e.c.attempts),
            )
        )

    def purge(self, before: float) -> sa.Delete:
        e = self.tables.events
        return sa.delete(e).where(e.c.state == DELIVERED, e.c.delivered_at < before)

    # --- reading ------------------------------------------------------------------

    def next_event_due(self) -> sa.Select[Any]:
        """The earliest due time of an unleased pending event (host clocks), and the
        earliest end of a live lease on one (the lease clock, ``lease_now``)."""
        e = self.tables.events
        return self._next_due(e).where(e.c.state == PENDING, ~self.waits_for_older)

    def next_credit_due(self) -> sa.Select[Any]:
        """As :meth:`next_event_due`, for unannounced credits."""
        c = self.tables.credits
        return self._next_due(c).where(c.c.notified_at.is_(None))

    @staticmethod
    def _next_due(table: sa.Table) -> sa.Select[Any]:
        free = unleased(table, sa.bindparam("lease_now"))
        return sa.select(
            sa.func.min(sa.case((free, table.c.next_attempt_at))),
            sa.func.min(sa.case((~free, table.c.lease_until))),
        )

    def event_counts(self, now: float) -> sa.Select[Any]:
        """Per state: how many, how many leased at ``now``, and the oldest's creation."""
        e = self.tables.events
        return sa.select(
            e.c.state,
            sa.func.count(),
            sa.func.sum(sa.case((e.c.lease_until > now, 1), else_=0)),
            sa.func.min(e.c.created_at),
        ).group_by(e.c.state)

    def credits_unnotified(self) -> sa.Select[Any]:
        c = self.tables.credits
        return sa.select(sa.func.count()).select_from(c).where(c.c.notified_at.is_(None))

    def list_events(self, state: str | None, limit: int, offset: int) -> sa.Select[Any]:
        e = self.tables.events
        query = sa.select(e).order_by(e.c.id.desc()).limit(limit).offset(offset)
        return query if state is None else query.where(e.c.state == state)

    def event(self, event_id: int) -> sa.Select[Any]:
        e = self.tables.events
        return sa.select(e).where(e.c.id == event_id)

    # --- hearts -------------------------------------------------------------------

    @cached_property
    def record_heart(self) -> sa.Insert | None:
        """Insert the heart (parameters: its columns) unless its ``heart_id`` is stored;
        returns the id when it inserted. None where the dialect cannot."""
        return self._insert_returning(self.tables.hearts, HEART_INSERT, ("heart_id",), "heart_id")

    @cached_property
    def heart_known(self) -> sa.Select[Any]:
        """The parameter ``heart_id``, if stored."""
        h = self.tables.hearts
        return sa.select(h.c.heart_id).where(h.c.heart_id == sa.bindparam("heart_id"))

    @cached_property
    def claim_hearts(self) -> Lease:
        """Unannounced votes, oldest due first."""
        h = self.tables.hearts
        due = sa.and_(
            h.c.granted_at.is_(None),
            h.c.next_attempt_at <= sa.bindparam("now"),
            unleased(h, sa.bindparam("lease_now")),
        )
        return self._lease(h.c.heart_id, due, (h.c.next_attempt_at, h.c.received_at, h.c.heart_id))

    def end_heart_lease(self, heart_id: str, owner: str, **values: Any) -> sa.Update:
        """Set ``values`` on the unannounced vote ``heart_id`` if ``owner`` holds its
        lease, and end the lease."""
        h = self.tables.hearts
        return (
            sa.update(h)
            .where(h.c.heart_id == heart_id, h.c.lease_owner == owner, h.c.granted_at.is_(None))
            .values(lease_owner=None, lease_until=None, **values)
        )

    def heart_counts(self) -> sa.Select[Any]:
        """Per event: how many votes, and how many announced."""
        h = self.tables.hearts
        return sa.select(h.c.event, sa.func.count(), sa.func.count(h.c.granted_at)).group_by(
            h.c.event
        )

    # --- credits ------------------------------------------------------------------

    def end_credit_lease(self, identity: str, owner: str, **values: Any) -> sa.Update:
        """Set ``values`` on the unannounced credit of ``identity`` if ``owner`` holds
        its lease, and end the lease."""
        c = self.tables.credits
        return (
            sa.update(c)
            .where(c.c.identity == identity, c.c.lease_owner == owner, c.c.notified_at.is_(None))
            .values(lease_owner=None, lease_until=None, **values)
        )
