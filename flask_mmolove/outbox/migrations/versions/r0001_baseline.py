"""0.1.0 baseline

The events, bindings and credits tables as flask-mmolove 0.1.0 created them. An
outbox made by 0.1.0 has exactly these and no version table; ``flask mmolove db
upgrade`` stamps it at this revision without touching it.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Frozen: lengths and names are written out here, not imported, so that changing a
    # limit in values.py cannot silently change what this revision creates.
    p: str = context.config.attributes["table_prefix"]
    # BIGINT on PostgreSQL; SQLite only auto-increments "INTEGER PRIMARY KEY".
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        f"{p}events",
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
        sqlite_autoincrement=True,
    )
    op.create_index(f"{p}events_due", f"{p}events", ["state", "next_attempt_at", "id"])
    op.create_index(f"{p}events_token", f"{p}events", ["token", "state", "id"])
    op.create_table(
        f"{p}bindings",
        sa.Column("identity", sa.String(255), primary_key=True),
        sa.Column("token", sa.String(512), nullable=False),
        sa.Column("bound_at", sa.Double, nullable=False),
    )
    op.create_table(
        f"{p}credits",
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
    )
    op.create_index(f"{p}credits_due", f"{p}credits", ["notified_at", "next_attempt_at"])


def downgrade() -> None:
    p: str = context.config.attributes["table_prefix"]
    for name in ("credits", "bindings", "events"):
        op.drop_table(f"{p}{name}")
