"""The durable outbox: every referral event is written here before anything is sent.

SQLAlchemy Core only, no Flask: the web process enqueues, and any number of delivery
threads and processes (on one host with SQLite, on many with PostgreSQL) claim due
events under a time-limited lease, send them, and record the answer. A claimer that
dies simply lets its lease run out; the event becomes claimable again.

Guarantees, and their limits:

- An event is stored once per (token, event, server_event_id), the key MMOLove dedups
  on, however often it is enqueued.
- While a lease is live, no second claimer gets the row. Only the lease owner can
  settle it (complete, reschedule, dead-letter); a claimer whose lease expired and was
  taken over finds its late answer refused (the method returns False).
- Delivery is at least once: a claimer that sent but died before recording is
  retried with the same ``server_event_id``, which MMOLove answers as a duplicate.
- A referee is credited at most once, ever (one ``credits`` row per identity). The
  announcement of a credit uses the same lease idea, so it survives a crash between
  announcing and recording; like delivery it is at least once if a receiver outlives
  its lease, so choose a lease longer than any receiver runs.

The modules, each importing only those above it: ``values`` (what is stored and handed
out, limits, checks), ``engine`` (connections, fork safety, transactions, errors),
``schema`` (the tables), ``queries`` (the SQL), ``migrate`` (the schema's version: the
Alembic migrations in ``migrations/``), ``_base`` (what the :class:`Outbox`'s topics
share: tables, statements, transactions, the lease), its topics ``enqueueing``,
``settling``, ``reading`` and ``credits``, and ``store`` (the :class:`Outbox` made of
them, and its schema's life cycle).
"""

from .engine import PG_CONNECT_TIMEOUT, SQLITE_BUSY_TIMEOUT, make_engine
from .migrate import OutboxOutdated
from .schema import check_table_prefix
from .store import Outbox
from .values import (
    DEAD,
    DELIVERED,
    EVENT_MAX,
    IDENTITY_MAX,
    OUTCOME_MAX,
    OWNER_MAX,
    PENDING,
    REASON_MAX,
    SERVER_EVENT_ID_MAX,
    STATES,
    TEXT_MAX,
    TOKEN_MAX,
    Credit,
    Ending,
    Heart,
    HeartStats,
    OutboxError,
    OutboxEvent,
    OutboxUnreachable,
    Stats,
)

__all__ = [
    "DEAD",
    "DELIVERED",
    "EVENT_MAX",
    "IDENTITY_MAX",
    "OUTCOME_MAX",
    "OWNER_MAX",
    "PENDING",
    "PG_CONNECT_TIMEOUT",
    "REASON_MAX",
    "SERVER_EVENT_ID_MAX",
    "SQLITE_BUSY_TIMEOUT",
    "STATES",
    "TEXT_MAX",
    "TOKEN_MAX",
    "Credit",
    "Ending",
    "Heart",
    "HeartStats",
    "Outbox",
    "OutboxError",
    "OutboxEvent",
    "OutboxOutdated",
    "OutboxUnreachable",
    "Stats",
    "check_table_prefix",
    "make_engine",
]
