"""An outbox as flask-mmolove 0.1.0 made it: its tables, no schema version.

``create_010`` is the table code of 0.1.0's ``Outbox.__init__`` and ``create_all``
(``git show 87897e6:flask_mmolove/outbox.py``), lengths written out as they were
then, so that the upgrade is proven against what 0.1.0 really created, not against
today's ``make_tables``.
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa


def tables_010(p: str) -> sa.MetaData:
    """0.1.0's three tables for the prefix ``p``."""
    metadata = sa.MetaData()
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    sa.Table(
        f"{p}events",
        metadata,
        sa.Column("id", big_id, primary_key=True, autoincrement=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("token", sa.String(512), nullable=False),
        sa.Column("identity", sa.String(255), nullable=False),
        sa.Column("server_event_id", sa.String(255), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
        sa.Column("last_attempt_at", sa.Double),
        sa.Column("lease_owner", sa.String(255)),
        sa.Column("lease_until", sa.Double),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_reason", sa.String(64)),
        sa.Column("last_error", sa.Text),
        sa.Column("response", sa.Text),
        sa.Column("outcome", sa.String(32)),
        sa.Column("delivered_at", sa.Double),
        sa.UniqueConstraint("token", "event", "server_event_id", name=f"{p}events_dedup"),
        sa.CheckConstraint("state IN ('pending', 'delivered', 'dead')", name=f"{p}events_state"),
        sa.Index(f"{p}events_due", "state", "next_attempt_at", "id"),
        sa.Index(f"{p}events_token", "token", "state", "id"),
        sqlite_autoincrement=True,
    )
    sa.Table(
        f"{p}bindings",
        metadata,
        sa.Column("identity", sa.String(255), primary_key=True),
        sa.Column("token", sa.String(512), nullable=False),
        sa.Column("bound_at", sa.Double, nullable=False),
    )
    sa.Table(
        f"{p}credits",
        metadata,
        sa.Column("identity", sa.String(255), primary_key=True),
        sa.Column("token", sa.String(512), nullable=False),
        sa.Column("event_id", sa.BigInteger, nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("notified_at", sa.Double),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(255)),
        sa.Column("lease_until", sa.Double),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
        sa.Index(f"{p}credits_due", "notified_at", "next_attempt_at"),
    )
    return metadata


def create_010(engine: sa.Engine, p: str = "mmolove_") -> None:
    """Create the tables as 0.1.0's ``create_all`` did: under its lock, no version."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            digest = hashlib.sha256(f"flask_mmolove:{p}".encode()).digest()
            key = int.from_bytes(digest[:8], "big", signed=True)
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))
        tables_010(p).create_all(conn, checkfirst=True)


def rows(engine: sa.Engine, p: str = "mmolove_") -> dict[str, list[tuple[object, ...]]]:
    """Every row of the three tables, in key order: what an upgrade must keep."""
    metadata = tables_010(p)
    with engine.connect() as conn:
        return {
            name: [
                tuple(row)
                for row in conn.execute(sa.select(table).order_by(*table.primary_key.columns))
            ]
            for name, table in metadata.tables.items()
        }
