"""What every part of the :class:`~flask_mmolove.outbox.store.Outbox` stands on: its
tables and named statements, its clock, its transactions and its one way to lease rows."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import migrate, schema
from .clauses import Lease
from .engine import CREATE_HINT, explained, transaction
from .queries import Statements


class StoreBase:
    """The state the Outbox's topics share (see :class:`Outbox` for the arguments)."""

    def __init__(
        self,
        engine: Engine,
        *,
        table_prefix: str = "mmolove_",
        clock: Callable[[], float] | None = None,
        metadata: sa.MetaData | None = None,
        create_hint: str = CREATE_HINT,
    ) -> None:
        self._tables = schema.make_tables(table_prefix, metadata)
        self._create_hint = create_hint
        self._sql = Statements(self._tables, engine.dialect)
        self.engine = engine
        self.table_prefix = table_prefix
        self.clock: Callable[[], float] = clock or time.time
        # Without a clock of the caller's, leases are timed by the database's clock on
        # PostgreSQL: hosts' clocks may be minutes apart, the database is one.
        self._database_clock = clock is None and engine.dialect.name == "postgresql"
        self.metadata = self._tables.metadata
        self.events = self._tables.events
        self.bindings = self._tables.bindings
        self.credits = self._tables.credits
        self.hearts = self._tables.hearts
        #: Why this outbox refuses every use (an outdated schema), or None.
        self._refusal: str | None = None

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"<Outbox {self.table_prefix!r} at {url}>"

    def _lease(
        self,
        statements: Lease,
        params: dict[str, Any],
        *,
        owner: str,
        lease: float,
        stamp_attempt: bool = False,
    ) -> list[sa.Row[Any]]:
        """Lease up to ``params["limit"]`` rows that are due now to ``owner`` for
        ``lease`` seconds; the rows as they are now, oldest due first. With
        ``stamp_attempt``, ``last_attempt_at`` is set to now.

        The one claiming mechanism of the outbox, for events and credits alike: each
        claim counts as an attempt, and the row is next due when its lease runs out.
        """
        with self._transaction() as conn:
            # Due times were written by the hosts' own clocks, so "due" is by this
            # one's; leases, which other hosts must respect, by the lease clock.
            now = self.clock()
            lease_now = self._now(conn)
            params = {**params, "now": now, "lease_now": lease_now}
            until = lease_now + lease
            values = {"last_attempt_at": now} if stamp_attempt else {}
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

    def _now(self, conn: Connection) -> float:
        """Now, for leases: the database's clock or the outbox's own (see ``__init__``)."""
        if self._database_clock:
            return float(conn.execute(self._sql.database_now).scalar_one())
        return self.clock()

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
