"""Fork safety of the outbox's connections: no SQLite transaction open across a
``fork()``, and no pooled connection used by a process other than the one that made it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection


class SQLiteForkGuard:
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


fork_guard = SQLiteForkGuard()
os.register_at_fork(
    before=fork_guard._before_fork,
    after_in_parent=fork_guard._after_fork_in_parent,
    after_in_child=fork_guard._after_fork_in_child,
)


def remember_pid(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info["pid"] = os.getpid()


def refuse_foreign_connection(
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
