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
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool

from .protocol import EVENTS

__all__ = [
    "DEAD",
    "DELIVERED",
    "PENDING",
    "STATES",
    "Credit",
    "Ending",
    "Outbox",
    "OutboxError",
    "OutboxEvent",
    "Stats",
    "make_engine",
]

PENDING: Final = "pending"
DELIVERED: Final = "delivered"
DEAD: Final = "dead"
STATES: Final = (PENDING, DELIVERED, DEAD)

#: How long a SQLite writer waits for another process's write transaction.
SQLITE_BUSY_TIMEOUT: Final = 30.0
#: How long a PostgreSQL connection attempt may take before it counts as unreachable.
PG_CONNECT_TIMEOUT: Final = 10

TOKEN_MAX: Final = 512
IDENTITY_MAX: Final = 255
SERVER_EVENT_ID_MAX: Final = 255
EVENT_MAX: Final = 32
OWNER_MAX: Final = 255
REASON_MAX: Final = 64
OUTCOME_MAX: Final = 32
#: Answers and errors are kept for people to read, not replayed: a bounded prefix is enough.
TEXT_MAX: Final = 2000

_PREFIX = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]{0,39})?", re.ASCII)
# Execution option a read-only Outbox method sets so SQLite does not take the write
# lock for it (see make_engine).
_DEFERRED: Final = "mmolove_deferred_begin"
_BEGIN_IMMEDIATE: Final = "BEGIN IMMEDIATE"
_BEGIN_DEFERRED: Final = "BEGIN"


class OutboxError(RuntimeError):
    """The outbox database cannot do what was asked; the message says what to fix."""


# --- engine -----------------------------------------------------------------------


def make_engine(uri: str | URL) -> Engine:
    """Create an engine suited to the outbox for ``uri``.

    SQLite (one host): WAL journal so readers never block the writer, a
    ``SQLITE_BUSY_TIMEOUT`` busy timeout, foreign keys on, and every transaction begins
    with ``BEGIN IMMEDIATE`` (SQLAlchemy's documented pysqlite recipe: the driver's own
    BEGIN handling is switched off and the engine's ``begin`` event emits ours). Taking
    the write lock up front makes concurrent claimers in several processes queue on
    the busy timeout; a deferred BEGIN would let two of them read, then fail to upgrade
    with "database is locked" without ever waiting. The Outbox's read-only methods opt
    back into a deferred BEGIN. The parent directory of a file path is created. An
    in-memory database (``sqlite://``) gets one connection shared by all threads: it is
    for tests, not for several processes.

    PostgreSQL and others: ``pool_pre_ping`` so a connection dropped by a restart or a
    proxy is replaced instead of failing the next claim, and a connect timeout for the
    psycopg drivers.

    Fork: a child process must not use its parent's connections. After ``fork()`` call
    ``engine.dispose(close=False)`` in the child (closing would shut the parent's
    connections too). As a safety net, a connection made in another process is refused
    at checkout and replaced by a fresh one.
    """
    url = make_url(uri)
    if url.get_backend_name() == "sqlite":
        engine = _sqlite_engine(url)
    else:
        connect_args: dict[str, Any] = {}
        if (
            url.get_backend_name() == "postgresql"
            and url.get_driver_name() in ("psycopg", "psycopg2")
            and "connect_timeout" not in url.query
        ):
            connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT
        engine = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    sa.event.listen(engine, "connect", _remember_pid)
    sa.event.listen(engine, "checkout", _refuse_foreign_connection)
    return engine


def _sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    memory = database in ("", ":memory:") or url.query.get("mode") == "memory"
    uri_mode = database.startswith("file:") or url.query.get("uri") == "true"
    if not memory and not uri_mode:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    # A ?timeout= in the URL is the driver's own knob; honour it rather than override it.
    timeout = float(str(url.query["timeout"])) if "timeout" in url.query else SQLITE_BUSY_TIMEOUT
    kwargs: dict[str, Any] = {"connect_args": {"timeout": timeout}}
    if memory:
        # Every new connection to ":memory:" is a new, empty database, so all threads
        # must share one: a pool of exactly one, handed to one thread at a time.
        kwargs = {
            "connect_args": {"timeout": timeout, "check_same_thread": False},
            "poolclass": QueuePool,
            "pool_size": 1,
            "max_overflow": 0,
        }
    engine = sa.create_engine(url, **kwargs)

    def on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # Stop the driver from issuing its own (deferred) BEGIN; on_begin issues ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # busy_timeout first: switching to WAL needs a lock another process may hold.
            cursor.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            if not memory:
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    def on_begin(conn: Connection) -> None:
        deferred = conn.get_execution_options().get(_DEFERRED, False)
        conn.exec_driver_sql(_BEGIN_DEFERRED if deferred else _BEGIN_IMMEDIATE)

    sa.event.listen(engine, "connect", on_connect)
    sa.event.listen(engine, "begin", on_begin)
    return engine


class _SQLiteForkGuard:
    """Holds ``fork()`` back while an outbox transaction on SQLite is open.

    SQLite keeps the locks of a database file in one table per process, shared by
    all its connections. A child forked while a thread of the parent is in a
    transaction (or its COMMIT) inherits that table but not the locks, and its own
    connections wait for locks nobody will release, or read a half-written index:
    "database is locked" after the busy timeout, or "disk I/O error". A fork therefore
    waits until no transaction but the forking thread's own is open, and no new one
    begins until it is done.
    """

    def __init__(self) -> None:
        self._idle = threading.Condition(threading.Lock())
        self._forking = False
        # Open transactions, by the thread that opened them.
        self._open: dict[int, int] = {}

    @contextmanager
    def transaction(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._idle:
            # A thread already in a transaction goes on: the fork is waiting for it.
            self._idle.wait_for(lambda: not self._forking or me in self._open)
            self._open[me] = self._open.get(me, 0) + 1
        try:
            yield
        finally:
            with self._idle:
                left = self._open.pop(me) - 1
                if left:
                    self._open[me] = left
                self._idle.notify_all()

    def _before_fork(self) -> None:
        me = threading.get_ident()
        self._idle.acquire()
        self._forking = True
        self._idle.wait_for(lambda: set(self._open) <= {me})

    def _after_fork_in_parent(self) -> None:
        self._forking = False
        self._idle.notify_all()
        self._idle.release()

    def _after_fork_in_child(self) -> None:
        # Only the forking thread lives on here, with its own transactions if any.
        me = threading.get_ident()
        self._idle = threading.Condition(threading.Lock())
        self._forking = False
        self._open = {me: self._open[me]} if me in self._open else {}


_fork_guard = _SQLiteForkGuard()
os.register_at_fork(
    before=_fork_guard._before_fork,
    after_in_parent=_fork_guard._after_fork_in_parent,
    after_in_child=_fork_guard._after_fork_in_child,
)


def _remember_pid(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info["pid"] = os.getpid()


def _refuse_foreign_connection(
    dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
) -> None:
    # SQLAlchemy's documented fork guard: a connection inherited over fork() shares its
    # socket or file locks with the parent; drop it without closing and make a new one.
    pid = os.getpid()
    if record.info.get("pid", pid) != pid:
        record.dbapi_connection = None  # type: ignore[misc]
        proxy.dbapi_connection = None  # type: ignore[misc]
        raise sa_exc.DisconnectionError(
            f"connection made in process {record.info['pid']} refused in process {pid}"
        )


# --- values -----------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxEvent:
    """One stored referral event, as it was when it was read.

    While an event is leased, ``next_attempt_at`` equals ``lease_until``: the time it
    becomes claimable again should its owner die.
    """

    id: int
    event: str
    token: str
    identity: str
    server_event_id: str
    #: The exact bytes that are signed and sent, never re-serialised.
    body: bytes = field(repr=False)
    state: str
    attempts: int
    created_at: float
    next_attempt_at: float
    last_status: int | None
    last_reason: str | None
    last_error: str | None
    outcome: str | None
    delivered_at: float | None
    #: MMOLove's answer to the accepted attempt (a prefix of ``TEXT_MAX`` characters).
    response: str | None = None
    last_attempt_at: float | None = None
    lease_owner: str | None = None
    lease_until: float | None = None


@dataclass(frozen=True)
class Ending:
    """How one attempt at a leased event ended, for :meth:`Outbox.settle`.

    Made with :meth:`delivered`, :meth:`retry` or :meth:`dead`, which check and clip
    what is stored.
    """

    event_id: int
    #: The event's columns to set (``delivered_at`` is added when it is recorded).
    values: Mapping[str, Any]
    #: Delivered, and owes the referee's referrer a credit.
    credit: bool = False

    @classmethod
    def delivered(
        cls, event_id: int, *, status: int, response: str, outcome: str, credit: bool
    ) -> Ending:
        """MMOLove accepted it; with ``credit``, its referee's referrer earned a reward."""
        return cls(
            int(event_id),
            {
                "state": DELIVERED,
                "last_status": status,
                "last_reason": None,
                "last_error": None,
                "response": _clip(response, TEXT_MAX),
                "outcome": _clip(outcome, OUTCOME_MAX),
            },
            credit=bool(credit),
        )

    @classmethod
    def retry(
        cls, event_id: int, *, at: float, status: int | None, reason: str, error: str
    ) -> Ending:
        """Not delivered: due again at ``at``."""
        return cls(
            int(event_id),
            {
                "next_attempt_at": _time("at", at),
                "last_status": status,
                "last_reason": _clip(reason, REASON_MAX),
                "last_error": _clip(error, TEXT_MAX),
            },
        )

    @classmethod
    def dead(cls, event_id: int, *, status: int | None, reason: str, error: str) -> Ending:
        """Not delivered, and never retried unless requeued."""
        return cls(
            int(event_id),
            {
                "state": DEAD,
                "last_status": status,
                "last_reason": _clip(reason, REASON_MAX),
                "last_error": _clip(error, TEXT_MAX),
            },
        )


@dataclass(frozen=True)
class Credit:
    """A referee whose referrer earned a reward, waiting to be announced."""

    identity: str
    token: str
    event_id: int
    outcome: str
    created_at: float
    #: Claims so far, including this one: for the announcer's backoff.
    attempts: int = 0


@dataclass(frozen=True)
class Stats:
    """Counts for a dashboard. ``pending`` excludes ``in_flight`` (leased) events."""

    pending: int
    in_flight: int
    delivered: int
    dead: int
    #: Seconds since the oldest undelivered, not dead event was created.
    oldest_pending_age: float | None
    credits_unnotified: int


def _text(name: str, value: object, limit: int) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    # MMOLove trims string fields before it dedups: keep our key the same as theirs.
    trimmed = value.strip()
    if not trimmed:
        raise ValueError(f"{name} must not be empty or blank")
    if len(trimmed) > limit:
        raise ValueError(f"{name} must be at most {limit} characters, got {len(trimmed)}")
    return trimmed


def _body(value: object) -> bytes:
    if isinstance(value, str) or not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(
            "body must be the exact bytes to send (protocol.build_body), "
            f"not {type(value).__name__}"
        )
    return bytes(value)


def _clip(value: str | None, limit: int) -> str | None:
    if value is None:
        return None
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _time(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValueError(f"{name} must be unix seconds, got {value!r}")
    return float(value)


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _owner(value: object) -> str:
    # Not trimmed, unlike the event's fields: an owner is compared verbatim later.
    if not isinstance(value, str) or not value.strip() or len(value) > OWNER_MAX:
        raise ValueError(f"owner must be a non-blank string of at most {OWNER_MAX} characters")
    return value


def _limit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"limit must be a whole number of at least 1, got {value!r}")
    return value


# --- the outbox -------------------------------------------------------------------


class Outbox:
    """The events, first-touch bindings and credits of one portal, in three tables.

    ``table_prefix`` namespaces the tables (``<prefix>events``, ``<prefix>bindings``,
    ``<prefix>credits``) so they can live in the portal's own database. ``clock``
    returns unix seconds; every stored time comes from it, never from the database.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        table_prefix: str = "mmolove_",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(table_prefix, str) or not _PREFIX.fullmatch(table_prefix):
            raise ValueError(
                "table_prefix must be at most 40 letters, digits or underscores, not "
                f"starting with a digit; got {table_prefix!r}"
            )
        self.engine = engine
        self.table_prefix = table_prefix
        self.clock = clock
        # _lease_end's statements, by the columns they set; _lease's, by name.
        self._claims: dict[
            tuple[str, bool], tuple[sa.Select[Any], sa.Update, sa.Select[Any] | None]
        ] = {}
        self._lease_ends: dict[tuple[str, ...], sa.Update] = {}
        self.metadata = sa.MetaData()
        p = table_prefix
        # BIGINT on PostgreSQL; SQLite only auto-increments "INTEGER PRIMARY KEY".
        big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
        self.events = sa.Table(
            f"{p}events",
            self.metadata,
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
            sa.CheckConstraint(
                "state IN ('pending', 'delivered', 'dead')", name=f"{p}events_state"
            ),
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
        self.bindings = sa.Table(
            f"{p}bindings",
            self.metadata,
            sa.Column("identity", sa.String(IDENTITY_MAX), primary_key=True),
            sa.Column("token", sa.String(TOKEN_MAX), nullable=False),
            sa.Column("bound_at", sa.Double, nullable=False),
        )
        self.credits = sa.Table(
            f"{p}credits",
            self.metadata,
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
        )

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"<Outbox {self.table_prefix!r} at {url}>"

    # --- schema -------------------------------------------------------------------

    def create_all(self) -> None:
        """Create the tables and indexes that do not exist yet.

        Safe when several processes start at once: SQLite's ``BEGIN IMMEDIATE`` and a
        PostgreSQL advisory lock make the check-then-create a critical section.
        """
        try:
            with self._transaction() as conn:
                self._lock_schema(conn)
                self.metadata.create_all(conn, checkfirst=True)
        except (sa_exc.DBAPIError, OutboxError):
            # Elsewhere, a concurrent creator can win the race between check and
            # create; that is success as long as the tables are there now.
            if self.engine.dialect.name in ("sqlite", "postgresql") or not self._tables_exist():
                raise

    def drop_all(self) -> None:
        """Drop the outbox tables and everything in them (for tests)."""
        with self._transaction() as conn:
            self._lock_schema(conn)
            self.metadata.drop_all(conn, checkfirst=True)

    def _lock_schema(self, conn: Connection) -> None:
        if conn.dialect.name == "postgresql":
            digest = hashlib.sha256(f"flask_mmolove:{self.table_prefix}".encode()).digest()
            key = int.from_bytes(digest[:8], "big", signed=True)
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))

    def _tables_exist(self) -> bool:
        with self.engine.connect() as conn:
            inspector = sa.inspect(conn)
            return all(inspector.has_table(table.name) for table in self.metadata.sorted_tables)

    # --- enqueue ------------------------------------------------------------------

    def bind_and_enqueue(
        self,
        *,
        identity: str,
        token: str,
        event: str,
        server_event_id: str,
        body: bytes,
    ) -> tuple[str, int | None]:
        """Bind ``identity`` to ``token`` if it is unbound, then enqueue if they match.

        First touch wins: an identity already bound keeps its first token. Returns the
        bound token and the event's id, or None when the identity belongs to another
        token (nothing is enqueued then). One transaction; idempotent like
        :meth:`enqueue`.
        """
        values = self._event_values(
            event=event,
            token=token,
            identity=identity,
            server_event_id=server_event_id,
            body=body,
        )
        b = self.bindings
        with self._transaction() as conn:
            self._insert_if_absent(
                conn,
                b,
                {
                    "identity": values["identity"],
                    "token": values["token"],
                    "bound_at": self.clock(),
                },
                ("identity",),
            )
            bound = conn.execute(
                sa.select(b.c.token).where(b.c.identity == values["identity"])
            ).scalar_one()
            if bound != values["token"]:
                return str(bound), None
            return str(bound), self._enqueue(conn, values)

    def enqueue(
        self,
        *,
        event: str,
        token: str,
        identity: str,
        server_event_id: str,
        body: bytes,
    ) -> int:
        """Store one event to be delivered now; return its id.

        Idempotent: enqueueing the same (token, event, server_event_id) again returns
        the existing id and leaves the stored body as it was.
        """
        values = self._event_values(
            event=event,
            token=token,
            identity=identity,
            server_event_id=server_event_id,
            body=body,
        )
        with self._transaction() as conn:
            return self._enqueue(conn, values)

    def token_for(self, identity: str) -> str | None:
        """The token ``identity`` is bound to (first touch), or None."""
        identity = _text("identity", identity, IDENTITY_MAX)
        b = self.bindings
        with self._transaction(read_only=True) as conn:
            token = conn.execute(
                sa.select(b.c.token).where(b.c.identity == identity)
            ).scalar_one_or_none()
        return None if token is None else str(token)

    def _event_values(
        self, *, event: str, token: str, identity: str, server_event_id: str, body: bytes
    ) -> dict[str, Any]:
        event = _text("event", event, EVENT_MAX)
        if event not in EVENTS:
            raise ValueError(f"event must be one of {', '.join(EVENTS)}, got {event!r}")
        now = self.clock()
        return {
            "event": event,
            "token": _text("token", token, TOKEN_MAX),
            "identity": _text("identity", identity, IDENTITY_MAX),
            "server_event_id": _text("server_event_id", server_event_id, SERVER_EVENT_ID_MAX),
            "body": _body(body),
            "state": PENDING,
            "attempts": 0,
            "created_at": now,
            "next_attempt_at": now,
        }

    def _enqueue(self, conn: Connection, values: Mapping[str, Any]) -> int:
        e = self.events
        self._insert_if_absent(conn, e, values, ("token", "event", "server_event_id"))
        found = conn.execute(
            sa.select(e.c.id).where(
                e.c.token == values["token"],
                e.c.event == values["event"],
                e.c.server_event_id == values["server_event_id"],
            )
        ).scalar_one_or_none()
        if found is None:
            raise OutboxError("the event was neither stored nor found; see the database log")
        return int(found)

    @staticmethod
    def _insert_if_absent(
        conn: Connection, table: sa.Table, values: Mapping[str, Any], key: Sequence[str]
    ) -> None:
        # ON CONFLICT DO NOTHING waits for a concurrent inserter of the same key and then
        # yields to it, so racing enqueuers never see an error; elsewhere a SAVEPOINT
        # keeps a unique violation from aborting the caller's transaction.
        name = conn.dialect.name
        if name == "postgresql":
            conn.execute(
                pg_dialect.insert(table).values(**values).on_conflict_do_nothing(index_elements=key)
            )
        elif name == "sqlite":
            conn.execute(
                sqlite_dialect.insert(table)
                .values(**values)
                .on_conflict_do_nothing(index_elements=key)
            )
        else:
            try:
                with conn.begin_nested():
                    conn.execute(table.insert().values(**values))
            except sa_exc.IntegrityError:
                pass

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
        if ids is not None:
            ids = [int(i) for i in ids]
            if not ids:
                return []
        e = self.events
        now = self.clock()

        def due() -> sa.ColumnElement[bool]:
            due = sa.and_(
                e.c.state == PENDING,
                e.c.next_attempt_at <= sa.bindparam("now"),
                _unleased(e, sa.bindparam("now")),
                ~self._waits_for_older(),
            )
            if ids is None:
                return due
            return sa.and_(due, e.c.id.in_(sa.bindparam("ids", expanding=True)))

        rows = self._lease(
            ("events", ids is not None),
            e.c.id,
            due,
            (e.c.next_attempt_at, e.c.id),
            {"now": now, "limit": limit, **({} if ids is None else {"ids": ids})},
            owner=owner,
            until=now + lease,
            last_attempt_at=now,
        )
        return [self._event(row) for row in rows]

    def _lease(
        self,
        name: tuple[str, bool],
        key: sa.Column[Any],
        due: Callable[[], sa.ColumnElement[bool]],
        order: Sequence[sa.Column[Any]],
        params: dict[str, Any],
        *,
        owner: str,
        until: float,
        **values: Any,
    ) -> list[sa.Row[Any]]:
        """Lease up to ``params["limit"]`` rows that are ``due``, first in ``order``, to
        ``owner``; the rows as they are now, in that order. ``due()`` builds the
        condition, with ``now`` (and any other name in ``params``) as bound parameters.

        The one claiming mechanism of the outbox, for events and credits alike: each
        claim counts as an attempt, and the row is next due when its lease runs out.
        ``due`` and ``order`` must be the same for a ``name``: its statements are built
        once (building them cost as much as running them).
        """
        with self._transaction() as conn:
            pick, lease, read = self._lease_statements(conn, name, key, due, order, values)
            chosen = list(conn.scalars(pick, params))
            if not chosen:
                return []
            leased = conn.execute(
                lease,
                {
                    **params,
                    "chosen": chosen,
                    "owner": owner,
                    "until": until,
                    **{f"v_{column}": value for column, value in values.items()},
                },
            )
            if read is None:
                rows = leased.all()
            else:
                rows = conn.execute(read, {"chosen": chosen, "owner": owner}).all()
        position = {k: n for n, k in enumerate(chosen)}
        return sorted(rows, key=lambda row: position[row._mapping[key.name]])

    def _lease_statements(
        self,
        conn: Connection,
        name: tuple[str, bool],
        key: sa.Column[Any],
        due: Callable[[], sa.ColumnElement[bool]],
        order: Sequence[sa.Column[Any]],
        values: Mapping[str, Any],
    ) -> tuple[sa.Select[Any], sa.Update, sa.Select[Any] | None]:
        """Pick, lease and (without RETURNING) read back: built once per ``name``."""
        built = self._claims.get(name)
        if built is not None:
            return built
        table = key.table
        assert isinstance(table, sa.Table)
        condition = due()
        pick = self._locking(
            conn, sa.select(key).where(condition).order_by(*order).limit(sa.bindparam("limit"))
        )
        chosen = key.in_(sa.bindparam("chosen", expanding=True))
        # On SQLite the chosen rows are still due: BEGIN IMMEDIATE has held the write
        # lock since the SELECT. Matched by key alone, they are found by primary key;
        # with ``due`` SQLite walks the whole due range of the index.
        lease = (
            sa.update(table)
            .where(chosen, condition if conn.dialect.name != "sqlite" else sa.true())
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
        if conn.dialect.update_returning:
            lease = lease.returning(*table.c)
        else:
            read = sa.select(table).where(chosen, table.c.lease_owner == sa.bindparam("owner"))
        self._claims[name] = (pick, lease, read)
        return pick, lease, read

    def _waits_for_older(self) -> sa.Exists:
        """True for an event while an earlier event of its token is still pending.

        One token's events go in the order they were written: a ``qualified`` sent
        while its ``registered`` is undelivered would be refused with a 422.
        """
        e = self.events
        older = e.alias("older")
        return (
            sa.exists()
            .where(older.c.token == e.c.token, older.c.state == PENDING, older.c.id < e.c.id)
            .correlate(e)
        )

    @staticmethod
    def _locking(conn: Connection, query: sa.Select[Any]) -> sa.Select[Any]:
        name = conn.dialect.name
        if name == "postgresql":
            # Concurrent claimers pass over each other's rows instead of queueing.
            return query.with_for_update(skip_locked=True)
        if name == "sqlite":
            # No row locks in SQLite; BEGIN IMMEDIATE already serialises writers.
            return query
        return query.with_for_update()

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
        e = self.events
        now = self.clock()
        with self._transaction() as conn:
            # Found by primary key alone: given "state = 'pending'" too, SQLite reads
            # every pending event through the due index (x3.7 per event at 100k
            # waiting). Held under SQLite's write lock, or row locks elsewhere, until
            # the commit: the leases found held here are still held when the updates
            # run. The row locks wait, as an UPDATE would (skipping a row locked for a
            # moment by a claimer's pick would refuse a live lease's answer), in id
            # order (two settles never deadlock), and NO KEY on PostgreSQL (a portal's
            # foreign key to the events table locks rows KEY SHARE).
            pick = sa.select(e.c.id, e.c.identity, e.c.token, e.c.lease_owner, e.c.state).where(
                e.c.id.in_(ids)
            )
            if conn.dialect.name != "sqlite":
                pick = pick.order_by(e.c.id).with_for_update(
                    key_share=conn.dialect.name == "postgresql"
                )
            found = conn.execute(pick)
            held = {
                int(row.id): row
                for row in found
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
                conn.execute(self._lease_end(columns), rows)
            for ending in endings:
                if ending.credit and ending.event_id in held:
                    row = held[ending.event_id]
                    self._insert_if_absent(
                        conn,
                        self.credits,
                        {
                            "identity": row.identity,
                            "token": row.token,
                            "event_id": ending.event_id,
                            "outcome": ending.values["outcome"],
                            "created_at": now,
                            "attempts": 0,
                            "next_attempt_at": now,
                        },
                        ("identity",),
                    )
        return set(held)

    def _lease_end(self, columns: tuple[str, ...]) -> sa.Update:
        """The statement that sets ``columns`` on a pending event and ends its lease."""
        statement = self._lease_ends.get(columns)
        if statement is None:
            # Built once per set of columns and reused with new parameters: building
            # and caching a statement afresh cost four times what executing it does.
            e = self.events
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

    def requeue(self, ids: Sequence[int] | None = None) -> int:
        """Make events due now; return how many changed.

        Without ``ids``: every dead event. With ``ids``: those that are dead, or pending
        and waiting for a retry ("retry now"); an event in flight keeps its lease and a
        delivered one stays delivered. A dead event starts over at zero attempts.
        """
        e = self.events
        now = self.clock()
        if ids is None:
            which: sa.ColumnElement[bool] = e.c.state == DEAD
        else:
            ids = [int(i) for i in ids]
            if not ids:
                return 0
            which = sa.and_(
                e.c.id.in_(ids),
                sa.or_(
                    e.c.state == DEAD,
                    sa.and_(
                        e.c.state == PENDING,
                        _unleased(e, now),
                    ),
                ),
            )
        with self._transaction() as conn:
            done = conn.execute(
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
            return int(done.rowcount)

    # --- reading ------------------------------------------------------------------

    def next_due_at(self) -> float | None:
        """When something next needs doing: the earliest due time (or lease expiry) of a
        pending event or an unannounced credit; None when there is nothing at all.

        A time in the past means "now". A deliverer may sleep until then. An event
        waiting for an earlier one of its token does not count: it becomes due when that
        one is settled, by the deliverer that settles it.
        """
        e, c = self.events, self.credits
        with self._transaction(read_only=True) as conn:
            event_due = conn.execute(
                sa.select(sa.func.min(e.c.next_attempt_at)).where(
                    e.c.state == PENDING, ~self._waits_for_older()
                )
            ).scalar_one_or_none()
            credit_due = conn.execute(
                sa.select(sa.func.min(c.c.next_attempt_at)).where(c.c.notified_at.is_(None))
            ).scalar_one_or_none()
        times = [float(t) for t in (event_due, credit_due) if t is not None]
        return min(times) if times else None

    def stats(self) -> Stats:
        e, c = self.events, self.credits
        now = self.clock()
        # One statement for the events, so that on PostgreSQL (a snapshot per
        # statement) the counts agree with each other.
        query = sa.select(
            e.c.state,
            sa.func.count(),
            sa.func.sum(sa.case((e.c.lease_until > now, 1), else_=0)),
            sa.func.min(e.c.created_at),
        ).group_by(e.c.state)
        counts: dict[str, int] = {}
        in_flight = 0
        oldest: float | None = None
        with self._transaction(read_only=True) as conn:
            for state, n, leased, first in conn.execute(query):
                counts[str(state)] = int(n)
                if state == PENDING:
                    in_flight, oldest = int(leased or 0), float(first)
            unnotified = conn.execute(
                sa.select(sa.func.count()).select_from(c).where(c.c.notified_at.is_(None))
            ).scalar_one()
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
        e = self.events
        with self._transaction() as conn:
            done = conn.execute(
                sa.delete(e).where(
                    e.c.state == DELIVERED, e.c.delivered_at < _time("before", before)
                )
            )
            return int(done.rowcount)

    def list_events(
        self, *, state: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[OutboxEvent]:
        """Events newest first, optionally only those in ``state``."""
        if state is not None and state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must not be negative")
        e = self.events
        query = sa.select(e).order_by(e.c.id.desc()).limit(limit).offset(offset)
        if state is not None:
            query = query.where(e.c.state == state)
        with self._transaction(read_only=True) as conn:
            return [self._event(row) for row in conn.execute(query)]

    def get(self, event_id: int) -> OutboxEvent | None:
        e = self.events
        with self._transaction(read_only=True) as conn:
            row = conn.execute(sa.select(e).where(e.c.id == event_id)).one_or_none()
        return None if row is None else self._event(row)

    @staticmethod
    def _event(row: sa.Row[Any]) -> OutboxEvent:
        return OutboxEvent(
            id=int(row.id),
            event=row.event,
            token=row.token,
            identity=row.identity,
            server_event_id=row.server_event_id,
            body=bytes(row.body),
            state=row.state,
            attempts=int(row.attempts),
            created_at=float(row.created_at),
            next_attempt_at=float(row.next_attempt_at),
            last_status=row.last_status,
            last_reason=row.last_reason,
            last_error=row.last_error,
            outcome=row.outcome,
            delivered_at=row.delivered_at,
            response=row.response,
            last_attempt_at=row.last_attempt_at,
            lease_owner=row.lease_owner,
            lease_until=row.lease_until,
        )

    # --- credits ------------------------------------------------------------------

    def claim_credits(self, owner: str, *, limit: int, lease: float) -> list[Credit]:
        """Lease up to ``limit`` unannounced credits to ``owner``, oldest due first.

        Announce each, then :meth:`finish_credit`; if announcing failed,
        :meth:`release_credit`. A lease that runs out makes the credit claimable again.
        """
        owner = _owner(owner)
        limit = _limit(limit)
        _positive("lease", lease)
        c = self.credits
        now = self.clock()
        rows = self._lease(
            ("credits", False),
            c.c.identity,
            lambda: sa.and_(
                c.c.notified_at.is_(None),
                c.c.next_attempt_at <= sa.bindparam("now"),
                _unleased(c, sa.bindparam("now")),
            ),
            (c.c.next_attempt_at, c.c.created_at, c.c.identity),
            {"now": now, "limit": limit},
            owner=owner,
            until=now + lease,
        )
        return [
            Credit(
                identity=row.identity,
                token=row.token,
                event_id=int(row.event_id),
                outcome=row.outcome,
                created_at=float(row.created_at),
                attempts=int(row.attempts),
            )
            for row in rows
        ]

    def finish_credit(self, identity: str, owner: str) -> bool:
        """Record that ``owner`` announced the credit; False if the lease is not ours."""
        c = self.credits
        with self._transaction() as conn:
            done = conn.execute(
                sa.update(c)
                .where(
                    c.c.identity == identity, c.c.lease_owner == owner, c.c.notified_at.is_(None)
                )
                .values(notified_at=self.clock(), lease_owner=None, lease_until=None)
            )
            return done.rowcount == 1

    def release_credit(self, identity: str, owner: str, *, retry_at: float) -> bool:
        """Announcing failed: give the lease up and try again at ``retry_at``."""
        c = self.credits
        with self._transaction() as conn:
            done = conn.execute(
                sa.update(c)
                .where(
                    c.c.identity == identity, c.c.lease_owner == owner, c.c.notified_at.is_(None)
                )
                .values(
                    lease_owner=None, lease_until=None, next_attempt_at=_time("retry_at", retry_at)
                )
            )
            return done.rowcount == 1

    def dispose(self) -> None:
        """Close the engine's pooled connections (in a forked child use
        ``engine.dispose(close=False)`` instead)."""
        self.engine.dispose()

    # --- plumbing -----------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, read_only: bool = False) -> Iterator[Connection]:
        if self.engine.dialect.name == "sqlite":
            with _fork_guard.transaction(), self._connection(read_only) as conn:
                yield conn
        else:
            with self._connection(read_only) as conn:
                yield conn

    @contextmanager
    def _connection(self, read_only: bool) -> Iterator[Connection]:
        try:
            conn = self.engine.connect()
        except sa_exc.DBAPIError as exc:
            raise OutboxError(
                f"cannot connect to the outbox database {self._url()}: {_reason(exc)}"
            ) from exc
        with conn:
            if read_only:
                # Only SQLite's begin hook reads this; elsewhere it is inert.
                conn.execution_options(**{_DEFERRED: True})
            try:
                with conn.begin():
                    yield conn
            except sa_exc.DBAPIError as exc:
                explained = self._explain(exc)
                if explained is None:
                    raise
                raise explained from exc

    def _url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def _explain(self, exc: sa_exc.DBAPIError) -> OutboxError | None:
        reason = _reason(exc)
        if getattr(exc.orig, "sqlstate", None) == "42P01" or "no such table" in reason:
            names = ", ".join(table.name for table in self.metadata.sorted_tables)
            return OutboxError(
                f"the outbox tables ({names}) do not exist in {self._url()}: create them "
                "with Outbox.create_all()"
            )
        if "database is locked" in reason:
            return OutboxError(
                f"the SQLite outbox {self._url()} stayed locked past its busy timeout "
                f"(default {SQLITE_BUSY_TIMEOUT:g} s): another connection holds a long "
                "write transaction on it, or the file is on a network filesystem, where "
                "SQLite locking does not work"
            )
        if exc.connection_invalidated:
            return OutboxError(
                f"lost the connection to the outbox database {self._url()}: {reason}"
            )
        return None


def _unleased(table: sa.Table, now: float | sa.BindParameter[Any]) -> sa.ColumnElement[bool]:
    """No lease on the row, or its lease has run out."""
    return sa.or_(table.c.lease_until.is_(None), table.c.lease_until <= now)


def _reason(exc: sa_exc.DBAPIError) -> str:
    return str(exc.orig).strip() or type(exc.orig).__name__
