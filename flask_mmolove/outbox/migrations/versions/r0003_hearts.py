"""hearts

The votes MMOLove's reward callbacks deliver (``heart.counted``, and the dashboard's
``heart.test``), one row per ``heart_id``, kept until ``heart_counted`` has been
announced for it, under a lease like a credit's.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Frozen: lengths and names are written out here, not imported (see 0001).
    p: str = context.config.attributes["table_prefix"]
    op.create_table(
        f"{p}hearts",
        sa.Column("heart_id", sa.String(64), primary_key=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("username", sa.Text, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("received_at", sa.Double, nullable=False),
        sa.Column("granted_at", sa.Double),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(255)),
        sa.Column("lease_until", sa.Double),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
    )
    op.create_index(f"{p}hearts_due", f"{p}hearts", ["granted_at", "next_attempt_at"])


def downgrade() -> None:
    p: str = context.config.attributes["table_prefix"]
    op.drop_index(f"{p}hearts_due", table_name=f"{p}hearts")
    op.drop_table(f"{p}hearts")
