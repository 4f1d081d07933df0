"""one token, one referral

A share-link token is one MMOLove referral: it binds one account at most
(``<prefix>bindings_token``), and pays one credit at most (``<prefix>credits_token``),
whatever identities its events name. Both are unique indexes, so that the database
itself refuses a second account on one token, concurrent registrations included.

An outbox that already holds one token bound to several accounts, or credited several
times, is not upgraded: which account is the referral's is the operator's decision, and
rows are never deleted here. The upgrade refuses, changing nothing, and names the rows;
once the operator has removed the ones that are not the referral's, it runs again.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from flask_mmolove.outbox.values import OutboxError

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

#: How many shared tokens the refusal lists before it only counts the rest.
_SHOWN = 20


def upgrade() -> None:
    p: str = context.config.attributes["table_prefix"]
    conn = op.get_bind()
    found = [
        *_shared_tokens(conn, f"{p}bindings", "bound_at"),
        *_shared_tokens(conn, f"{p}credits", "created_at"),
    ]
    if found:
        raise OutboxError(_refusal(p, found))
    op.create_index(f"{p}bindings_token", f"{p}bindings", ["token"], unique=True)
    op.create_index(f"{p}credits_token", f"{p}credits", ["token"], unique=True)


def downgrade() -> None:
    p: str = context.config.attributes["table_prefix"]
    op.drop_index(f"{p}credits_token", table_name=f"{p}credits")
    op.drop_index(f"{p}bindings_token", table_name=f"{p}bindings")


def _shared_tokens(conn: sa.Connection, name: str, when: str) -> list[tuple[str, str, list[str]]]:
    """(table, token, identities in the order they were written) for each token of
    ``name`` that more than one row holds."""
    table = sa.table(name, sa.column("identity"), sa.column("token"), sa.column(when))
    shared = (
        sa.select(table.c.token).group_by(table.c.token).having(sa.func.count() > 1)
    ).scalar_subquery()
    rows = conn.execute(
        sa.select(table.c.token, table.c.identity)
        .where(table.c.token.in_(shared))
        .order_by(table.c.token, table.c[when], table.c.identity)
    )
    by_token: dict[str, list[str]] = {}
    for token, identity in rows:
        by_token.setdefault(str(token), []).append(str(identity))
    return [(name, token, identities) for token, identities in by_token.items()]


def _refusal(prefix: str, found: list[tuple[str, str, list[str]]]) -> str:
    lines = [
        f"{table}: token {_short(token)} is held by identities "
        + ", ".join(repr(identity) for identity in identities)
        + " (earliest first)"
        for table, token, identities in found[:_SHOWN]
    ]
    if len(found) > _SHOWN:
        lines.append(f"... and {len(found) - _SHOWN} more shared tokens")
    return (
        "cannot upgrade the outbox to revision 0002 (one token, one referral): a token "
        "is bound to several accounts, or credited several times, and MMOLove keeps "
        "each token as one referral. Nothing was changed. Decide which account is the "
        "referral's (usually the earliest, whose `registered` MMOLove received first), "
        f"delete the other rows of {prefix}bindings and {prefix}credits by identity, "
        "then run `flask mmolove db upgrade` again:\n  " + "\n  ".join(lines)
    )


def _short(token: str) -> str:
    # Tokens are not secrets, but some are long: enough to find the rows by.
    return repr(token) if len(token) <= 24 else repr(token[:24] + "...")
