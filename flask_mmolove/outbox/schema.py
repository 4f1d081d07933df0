"""The outbox's tables under a prefix, the one check of that prefix, and the lock
under which they are created, upgraded and dropped (see ``migrate``)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .values import (
    EVENT_MAX,
    HEART_ID_MAX,
    IDENTITY_MAX,
    OUTCOME_MAX,
    OWNER_MAX,
    REASON_MAX,
    SERVER_EVENT_ID_MAX,
    TOKEN_MAX,
    OutboxError,
)

_PREFIX: Final = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]{0,39})?", re.ASCII)


def check_table_prefix(value: object) -> str:
    """``value`` if it can prefix the outbox's table names, else ValueError saying why."""
    if not isinstance(value, str) or not _PREFIX.fullmatch(value):
        raise ValueError(
            "table_prefix must be at most 40 letters, digits or underscores, not "
            f"starting with a digit; got {value!r}"
        )
    return value


#: The tables of flask-mmolove 0.1.0 (revision 0001), which an unversioned outbox has.
BASELINE_TABLES: Final = ("events", "bindings", "credits")
#: Every table, in the order they are declared.
TABLES: Final = (*BASELINE_TABLES, "hearts")


@dataclass(frozen=True)
class Tables:
    """The events, first-touch bindings, credits and hearts (votes received) of one
    portal (see :func:`make_tables`)."""

    prefix: str
    metadata: sa.MetaData
    events: sa.Table
    bindings: sa.Table
    credits: sa.Table
    hearts: sa.Table

    @property
    def all(self) -> list[sa.Table]:
        return [self.events, self.bindings, self.credits, self.hearts]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(table.name for table in self.all)

    @property
    def baseline_names(self) -> tuple[str, ...]:
        """The tables an outbox of flask-mmolove 0.1.0 has."""
        return tuple(f"{self.prefix}{name}" for name in BASELINE_TABLES)


def make_tables(prefix: str, metadata: sa.MetaData | None = None) -> Tables:
    """The tables ``<prefix>events``, ``<prefix>bindings``, ``<prefix>credits`` and
    ``<prefix>hearts``.

    Declared in ``metadata`` when given (the portal's own, so that its migrations and
    ``create_all`` include them); an app factory run again finds them declared there
    already and gets the same tables.

    A standalone outbox is created by the migrations in ``migrations/versions`` instead,
    which must build exactly these: a change here needs a new revision there
    (tests/migrations compares the two).
    """
    p = check_table_prefix(prefix)
    if metadata is None:
        metadata = sa.MetaData()
    elif f"{p}events" in metadata.tables:
        return _declared(p, metadata)
    # BIGINT on PostgreSQL; SQLite only auto-increments "INTEGER PRIMARY KEY".
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    events = sa.Table(
        f"{p}events",
        metadata,
        sa.Column("id", big_id, primary_key=True, autoincrement=True),
        sa.Column("event", sa.String(EVENT_MAX), nullable=False),
        sa.Column("token", sa.String(TOKEN_MAX), nullable=False),
        sa.Column("identity", sa.String(IDENTITY_MAX), nullable=False),
        sa.Column("server_event_id", sa.String(SERVER_EVENT_ID_MAX), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
        sa.Column("last_attempt_at", sa.Double),
        sa.Column("lease_owner", sa.String(OWNER_MAX)),
        sa.Column("lease_until", sa.Double),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_reason", sa.String(REASON_MAX)),
        sa.Column("last_error", sa.Text),
        sa.Column("response", sa.Text),
        sa.Column("outcome", sa.String(OUTCOME_MAX)),
        sa.Column("delivered_at", sa.Double),
        sa.UniqueConstraint("token", "event", "server_event_id", name=f"{p}events_dedup"),
        sa.CheckConstraint("state IN ('pending', 'delivered', 'dead')", name=f"{p}events_state"),
        # Claiming walks this index from its start: with a large backlog it reads
        # only the due rows it returns (leased rows sit at their lease expiry).
        sa.Index(f"{p}events_due", "state", "next_attempt_at", "id"),
        # "Waits for an older pending event of its token" (claim) looks a token's
        # pending events up here; without it, SQLite walks every pending event for
        # each candidate, and a claim grows with the backlog.
        sa.Index(f"{p}events_token", "token", "state", "id"),
        # Ids are shown to operators and kept in credits: never reuse one.
        sqlite_autoincrement=True,
    )
    bindings = sa.Table(
        f"{p}bindings",
        metadata,
        sa.Column("identity", sa.String(IDENTITY_MAX), primary_key=True),
        sa.Column("token", sa.String(TOKEN_MAX), nullable=False),
        sa.Column("bound_at", sa.Double, nullable=False),
        # One share-link token is one MMOLove referral: it binds one account at most,
        # so accounts made on a replayed link are never its referee (revision 0002).
        sa.Index(f"{p}bindings_token", "token", unique=True),
    )
    credits = sa.Table(
        f"{p}credits",
        metadata,
        sa.Column("identity", sa.String(IDENTITY_MAX), primary_key=True),
        sa.Column("token", sa.String(TOKEN_MAX), nullable=False),
        # No foreign key: a credit outlives any clean-up of delivered events.
        sa.Column("event_id", sa.BigInteger, nullable=False),
        sa.Column("outcome", sa.String(OUTCOME_MAX), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("notified_at", sa.Double),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(OWNER_MAX)),
        sa.Column("lease_until", sa.Double),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
        sa.Index(f"{p}credits_due", "notified_at", "next_attempt_at"),
        # A credit is MMOLove's referral's: one per token, whatever identities its
        # events name (an operator's --token, rows bound before revision 0002).
        sa.Index(f"{p}credits_token", "token", unique=True),
    )
    hearts = sa.Table(
        f"{p}hearts",
        metadata,
        # MMOLove's idempotency key: one row per vote, however often it is delivered.
        sa.Column("heart_id", sa.String(HEART_ID_MAX), primary_key=True),
        sa.Column("event", sa.String(EVENT_MAX), nullable=False),
        # What the voter typed, as sent: the portal decides who that is.
        sa.Column("username", sa.Text, nullable=False),
        # The body exactly as received and verified: every field, for the signal.
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("received_at", sa.Double, nullable=False),
        # When ``heart_counted`` was announced; a test callback is never announced.
        sa.Column("granted_at", sa.Double),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(OWNER_MAX)),
        sa.Column("lease_until", sa.Double),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
        sa.Index(f"{p}hearts_due", "granted_at", "next_attempt_at"),
    )
    return Tables(p, metadata, events, bindings, credits, hearts)


def _declared(prefix: str, metadata: sa.MetaData) -> Tables:
    names = [f"{prefix}{name}" for name in TABLES]
    missing = [name for name in names if name not in metadata.tables]
    if missing:
        raise OutboxError(
            f"the portal's metadata declares {prefix}events but not {', '.join(missing)}: "
            f"another table uses the outbox's prefix {prefix!r}; set MMOLOVE_TABLE_PREFIX "
            "to a prefix of the outbox's own"
        )
    events, bindings, credits, hearts = (metadata.tables[name] for name in names)
    return Tables(prefix, metadata, events, bindings, credits, hearts)


def lock_schema(conn: Connection, prefix: str) -> None:
    """Make the rest of ``conn``'s transaction a critical section for ``prefix``'s schema.

    On SQLite the transaction's ``BEGIN IMMEDIATE`` (see ``engine``) already holds the
    database's write lock; on PostgreSQL a transaction-scoped advisory lock per prefix
    serialises processes that check and create or upgrade the tables at once.
    """
    if conn.dialect.name == "postgresql":
        digest = hashlib.sha256(f"flask_mmolove:{prefix}".encode()).digest()
        key = int.from_bytes(digest[:8], "big", signed=True)
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


def present(conn: Connection, names: tuple[str, ...]) -> tuple[str, ...]:
    """Those of the tables ``names`` that exist, as ``conn`` sees them."""
    inspector = sa.inspect(conn)
    return tuple(name for name in names if inspector.has_table(name))
