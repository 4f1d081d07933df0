"""The building blocks of the outbox's statements: an insert that yields to an existing
row on every dialect, the "no live lease" condition, and the statements of a claim."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection

#: The dialects whose INSERT has ON CONFLICT DO NOTHING.
_ON_CONFLICT: Final = frozenset({"postgresql", "sqlite"})


def insert_if_absent(
    conn: Connection, table: sa.Table, values: Mapping[str, Any], key: Sequence[str] | None
) -> None:
    """Insert ``values`` unless a row with the same ``key`` exists (None: the same value
    of any unique key of ``table``); never an error, and never one that aborts the
    transaction ``conn`` is in."""
    # ON CONFLICT DO NOTHING waits for a concurrent inserter of the same key and then
    # yields to it, so racing enqueuers never see an error; elsewhere a SAVEPOINT
    # keeps a unique violation from aborting the caller's transaction.
    name = conn.dialect.name
    if name not in _ON_CONFLICT:
        try:
            with conn.begin_nested():
                conn.execute(table.insert().values(**values))
        except sa_exc.IntegrityError:
            pass
    else:
        insert = pg_dialect.insert if name == "postgresql" else sqlite_dialect.insert
        conn.execute(insert(table).values(**values).on_conflict_do_nothing(index_elements=key))


def unleased(table: sa.Table, now: float | sa.BindParameter[Any]) -> sa.ColumnElement[bool]:
    """No lease on the row, or its lease has run out."""
    return sa.or_(table.c.lease_until.is_(None), table.c.lease_until <= now)


@dataclass(frozen=True)
class Lease:
    """The statements of one kind of claim (see :meth:`Outbox._lease`).

    ``pick`` selects the ``key`` of up to ``limit`` due rows at ``now``; ``lease``
    leases the ``chosen`` keys to ``owner`` until ``until``, setting each further
    column ``c`` to the parameter ``v_c``; ``read`` reads them back where the dialect
    has no UPDATE ... RETURNING.
    """

    key: sa.Column[Any]
    pick: sa.Select[Any]
    lease: sa.Update
    read: sa.Select[Any] | None
