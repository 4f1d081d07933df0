"""Connections to the outbox database: engines per dialect (fork safety from
:mod:`.forks`), transactions, bounded waits on a request's path, and database errors
turned into messages that say what to fix."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool

from .forks import fork_guard, refuse_foreign_connection, remember_pid
from .values import OutboxError, OutboxUnreachable

logger = logging.getLogger("flask_mmolove")

#: How long a SQLite writer waits for another process's write transaction.
SQLITE_BUSY_TIMEOUT: Final = 30.0
#: How long a PostgreSQL connection attempt may take before it counts as unreachable.
PG_CONNECT_TIMEOUT: Final = 10
#: How long PostgreSQL lets a session of the outbox's sit idle inside a transaction
#: before it ends the session, releasing its row locks.
PG_IDLE_IN_TRANSACTION_TIMEOUT: Final = 10

#: A transaction begun by :func:`transaction` inside :func:`request_waits`: how long each
#: of its statements may wait for a lock, in seconds (None: the engine's own waits).
_REQUEST_WAIT: ContextVar[float | None] = ContextVar("mmolove_request_wait", default=None)

# Execution option a read-only transaction sets so SQLite does not take the write
# lock for it (see make_engine).
_DEFERRED: Final = "mmolove_deferred_begin"
_BEGIN_IMMEDIATE: Final = "BEGIN IMMEDIATE"
_BEGIN_DEFERRED: Final = "BEGIN"


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
    proxy is replaced instead of failing the next claim. With the psycopg drivers, a
    connect timeout, and sessions ended by PostgreSQL once idle inside a transaction
    for ``PG_IDLE_IN_TRANSACTION_TIMEOUT`` seconds: the outbox's transactions never
    wait on anything but their own statements, so such a session belongs to a host cut
    off mid-transaction, whose row locks would otherwise hide its claim's rows from
    every other deliverer (claims skip locked rows) until TCP gives up, hours later.

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
        if url.get_backend_name() == "postgresql" and url.get_driver_name() in (
            "psycopg",
            "psycopg2",
        ):
            sa.event.listen(engine, "begin", _end_idle_transactions)
    sa.event.listen(engine, "connect", remember_pid)
    sa.event.listen(engine, "checkout", refuse_foreign_connection)
    return engine


def _end_idle_transactions(conn: Connection) -> None:
    """See ``make_engine``. Local to each transaction, never the session's: behind a
    pooler that shares server sessions (PgBouncer's transaction mode), a session
    setting would reach other clients' transactions."""
    conn.exec_driver_sql(
        "SELECT set_config('idle_in_transaction_session_timeout', %(timeout)s, true)",
        {"timeout": f"{PG_IDLE_IN_TRANSACTION_TIMEOUT}s"},
    )


def in_memory(url: URL) -> bool:
    """Whether ``url`` is an in-memory SQLite database, which lives in its one connection."""
    return url.get_backend_name() == "sqlite" and (
        (url.database or "") in ("", ":memory:") or url.query.get("mode") == "memory"
    )


def _wal(cursor: Any) -> None:
    """Switch the database to WAL, so readers never block the writer.

    The switch needs the file to itself: with the portal's own connections busy on it
    (``db=``), SQLite refuses at once, whatever the busy timeout. Then the database
    stays in its journal mode (correct, if slower) and a later connection tries again;
    ``state.build_state`` switches it before the portal serves anyone.
    """
    try:
        cursor.execute("PRAGMA journal_mode = WAL")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            raise
        logger.debug("the SQLite database is busy: not switched to WAL yet")


def _sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    memory = in_memory(url)
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
                _wal(cursor)
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    def on_begin(conn: Connection) -> None:
        deferred = conn.get_execution_options().get(_DEFERRED, False)
        conn.exec_driver_sql(_BEGIN_DEFERRED if deferred else _BEGIN_IMMEDIATE)

    sa.event.listen(engine, "connect", on_connect)
    sa.event.listen(engine, "begin", on_begin)
    return engine


# --- transactions -------------------------------------------------------------------


#: How to create missing tables, for a standalone outbox.
CREATE_HINT: Final = "create them with Outbox.create_all()"


@contextmanager
def transaction(
    engine: Engine,
    *,
    read_only: bool = False,
    tables: Sequence[str] = (),
    create_hint: str = CREATE_HINT,
) -> Iterator[Connection]:
    """A connection of ``engine`` in a transaction, committed when the block ends.

    On SQLite a write transaction holds the write lock from its BEGIN, and a read-only
    one (``read_only``) takes none; no ``fork()`` happens while either is open. A
    database error that needs the operator is raised as an :class:`OutboxError` saying
    what to fix; ``tables`` are named when they are missing, with ``create_hint``.
    """
    if engine.dialect.name == "sqlite":
        with (
            fork_guard.transaction(),
            _connection(engine, read_only, tables, create_hint) as conn,
        ):
            yield conn
    else:
        with _connection(engine, read_only, tables, create_hint) as conn:
            yield conn


@contextmanager
def _connection(
    engine: Engine, read_only: bool, tables: Sequence[str], create_hint: str
) -> Iterator[Connection]:
    try:
        conn = engine.connect()
    except sa_exc.DBAPIError as exc:
        raise OutboxError(
            f"cannot connect to the outbox database {_url(engine)}: {_reason(exc)}"
        ) from exc
    wait = _REQUEST_WAIT.get()
    with conn:
        if read_only:
            # Only SQLite's begin hook reads this; elsewhere it is inert.
            conn.execution_options(**{_DEFERRED: True})
        with (
            explained(engine, tables, create_hint, wait=wait),
            _sqlite_busy_timeout(conn, wait),
            conn.begin(),
        ):
            if wait is not None and conn.dialect.name == "postgresql":
                # Our own connection, our own transaction: the local settings end
                # with it, so there is nothing to restore.
                _set_pg_timeouts(conn, _milliseconds(wait))
            yield conn


# --- bounded waits on a request's path ----------------------------------------------


@contextmanager
def request_waits(seconds: float) -> Iterator[None]:
    """Within the block, each statement of a transaction :func:`transaction` begins
    waits at most ``seconds`` for a lock another connection holds, then fails.

    For the writes a request makes on the outbox's own engine: a table locked by a
    migration or ``VACUUM FULL``, or a SQLite writer holding the file, fails the write
    (which the caller logs, recoverably) instead of holding the request. PostgreSQL:
    ``lock_timeout`` and ``statement_timeout`` local to the transaction. SQLite: the
    connection's busy timeout, for the transaction, then back to the engine's (so
    delivery, on the same pooled connections, keeps its long one). Per thread and
    task: a context variable.
    """
    token = _REQUEST_WAIT.set(seconds)
    try:
        yield
    finally:
        _REQUEST_WAIT.reset(token)


@contextmanager
def bounded_waits(conn: Connection, seconds: float) -> Iterator[None]:
    """Within the block, each statement on ``conn`` waits at most ``seconds`` for a lock,
    in the transaction the caller has ``conn`` in (the portal's, with ``db=``); after it,
    the caller's own settings are back, for the rest of its transaction. A caller's
    shorter wait is kept: the bound never makes a statement wait longer than the
    caller asked. A timeout is the caller's database error, as it is.

    PostgreSQL: ``lock_timeout`` and ``statement_timeout``, read first, set with
    ``set_config(..., true)``, and set back to what they were when the block succeeds.
    Not ``SET LOCAL`` inside a SAVEPOINT: a released savepoint keeps its local settings
    to the end of the transaction, and a savepoint of ours would let a failed write be
    rolled back alone, leaving the portal free to commit an account without its event
    (and would be a savepoint behind its Session's back). When a statement of the block
    fails, PostgreSQL has aborted the transaction: nothing runs in it again, and its
    rollback discards these settings with it; the setting back is tried all the same
    (another failure could leave the transaction usable) and its own failure ignored,
    so the portal sees the first error. SQLite: the connection's busy timeout, set
    back after the block whatever happens. Other databases: unbounded, as before.
    """
    milliseconds = _milliseconds(seconds)
    if conn.dialect.name == "sqlite":
        with _busy_timeout(conn, milliseconds):
            yield
    elif conn.dialect.name == "postgresql":
        with _pg_timeouts(conn, milliseconds):
            yield
    else:
        yield


@contextmanager
def _pg_timeouts(conn: Connection, milliseconds: int) -> Iterator[None]:
    before = conn.execute(
        sa.text("SELECT current_setting('lock_timeout'), current_setting('statement_timeout')")
    ).one()
    _set_pg_timeouts(conn, milliseconds)
    try:
        yield
    except BaseException:
        # The transaction is aborted, most likely: its rollback discards ours.
        with suppress(sa_exc.SQLAlchemyError):
            _set_pg_settings(conn, before[0], before[1])
        raise
    _set_pg_settings(conn, before[0], before[1])


def _milliseconds(seconds: float) -> int:
    # Zero turns both PostgreSQL's timeouts and SQLite's off: a bound is at least 1 ms.
    return max(1, round(seconds * 1000))


def _set_pg_timeouts(conn: Connection, milliseconds: int) -> None:
    # Each at most ``milliseconds``: a shorter one in force (the URL's options, the
    # role's, the portal's) is kept; 0 means none, so ours applies. pg_settings gives
    # the value in force in milliseconds, whatever unit it was set in.
    conn.execute(
        sa.text(
            "SELECT set_config(name, CASE WHEN setting::bigint = 0 "
            "OR setting::bigint > :ms THEN :bound ELSE current_setting(name) END, true) "
            "FROM pg_settings WHERE name IN ('lock_timeout', 'statement_timeout')"
        ),
        {"ms": milliseconds, "bound": f"{milliseconds}ms"},
    )


def _set_pg_settings(conn: Connection, lock_timeout: str, statement_timeout: str) -> None:
    # set_config(..., true) is SET LOCAL with bound values: to the end of the
    # transaction at most.
    conn.execute(
        sa.text(
            "SELECT set_config('lock_timeout', :lock, true), "
            "set_config('statement_timeout', :statement, true)"
        ),
        {"lock": lock_timeout, "statement": statement_timeout},
    )


@contextmanager
def _sqlite_busy_timeout(conn: Connection, seconds: float | None) -> Iterator[None]:
    if seconds is None or conn.dialect.name != "sqlite":
        yield
        return
    with _busy_timeout(conn, _milliseconds(seconds)):
        yield


@contextmanager
def _busy_timeout(conn: Connection, milliseconds: int) -> Iterator[None]:
    # On the driver's connection: a statement through ``conn`` would begin its
    # transaction, and BEGIN IMMEDIATE is the very statement that must wait less.
    dbapi_connection = conn.connection.dbapi_connection
    assert dbapi_connection is not None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout")
        (before,) = cursor.fetchone() or (SQLITE_BUSY_TIMEOUT * 1000,)
        # A shorter wait already set is kept (0 waits not at all).
        cursor.execute(f"PRAGMA busy_timeout = {min(int(before), milliseconds)}")
    finally:
        cursor.close()
    try:
        yield
    finally:
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout = {int(before)}")
            finally:
                cursor.close()
        except Exception:
            # A connection that cannot say PRAGMA is broken: never pooled again with
            # a short timeout, nor does this hide the block's own error.
            conn.invalidate()


@contextmanager
def explained(
    engine: Engine,
    tables: Sequence[str],
    create_hint: str = CREATE_HINT,
    *,
    wait: float | None = None,
) -> Iterator[None]:
    """Raise a database error of the block that needs the operator as an
    :class:`OutboxError` saying what to fix; any other goes on as it is. ``wait``: the
    request's bound the block ran under (:func:`request_waits`), for the message."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        explanation = _explain(exc, _url(engine), tables, create_hint, wait)
        if explanation is None:
            raise
        raise explanation from exc


#: PostgreSQL's lock_not_available and query_canceled: a lock or statement timeout.
_PG_TIMED_OUT: Final = ("55P03", "57014")


def _explain(
    exc: sa_exc.DBAPIError,
    url: str,
    tables: Sequence[str],
    create_hint: str,
    wait: float | None = None,
) -> OutboxError | None:
    reason = _reason(exc)
    if getattr(exc.orig, "sqlstate", None) == "42P01" or "no such table" in reason:
        return OutboxError(
            f"the outbox tables ({', '.join(tables)}) do not exist in {url}: {create_hint}"
        )
    if "database is locked" in reason:
        timeout = (
            f"{SQLITE_BUSY_TIMEOUT:g} s by default"
            if wait is None
            else f"{wait:g} s on a request's path, MMOLOVE_REQUEST_LOCK_TIMEOUT"
        )
        return OutboxUnreachable(
            f"the SQLite outbox {url} stayed locked past its busy timeout "
            f"({timeout}): another connection holds a long "
            "write transaction on it, or the file is on a network filesystem, where "
            "SQLite locking does not work"
        )
    if wait is not None and getattr(exc.orig, "sqlstate", None) in _PG_TIMED_OUT:
        return OutboxUnreachable(
            f"a statement on the outbox {url} waited longer than a request may "
            f"({wait:g} s, MMOLOVE_REQUEST_LOCK_TIMEOUT): another connection holds a "
            f"lock on its tables (a migration, VACUUM FULL, a long transaction): {reason}"
        )
    if exc.connection_invalidated:
        return OutboxUnreachable(f"lost the connection to the outbox database {url}: {reason}")
    return None


def _url(engine: Engine) -> str:
    # Never the password: these messages end up in logs.
    return engine.url.render_as_string(hide_password=True)


def _reason(exc: sa_exc.DBAPIError) -> str:
    return str(exc.orig).strip() or type(exc.orig).__name__
