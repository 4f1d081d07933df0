"""The outbox's engines and schema: SQLite files and PostgreSQL as the outbox needs them.

SQLite gets its directory, WAL and a busy timeout; write transactions take the lock up
front and readers never wait for a writer; in-memory SQLite is one database for every
thread; a forked child gets its own connection. Failures explain themselves: an
unreachable database is named without its password, missing tables say how to create
them. create_all is safe to race, and a table prefix is checked before it names a table.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import warnings
from pathlib import Path

import pytest
import sqlalchemy as sa
from outbox_support import T0, _enqueue, _prefix
from support import FakeClock

from flask_mmolove.outbox import Outbox, OutboxError, make_engine


def test_sqlite_engine_creates_directory_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "outbox.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            pragma = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "foreign_keys")
            }
        assert pragma == {"journal_mode": "wal", "busy_timeout": 30000, "foreign_keys": 1}
        assert path.exists()
    finally:
        engine.dispose()


def test_sqlite_write_transactions_take_the_lock_up_front(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lock.sqlite3'}"
    engine, impatient = make_engine(url), make_engine(f"{url}?timeout=0.2")
    box = Outbox(engine)
    try:
        box.create_all()
        with engine.connect() as conn, conn.begin():
            # No statement has run yet, but BEGIN IMMEDIATE already holds the write
            # lock: a second writer waits its busy timeout, then gets a clear error.
            started = time.monotonic()
            with pytest.raises(OutboxError, match="stayed locked past its busy timeout"):
                _enqueue(Outbox(impatient))
            assert 0.15 < time.monotonic() - started < 5
        assert _enqueue(Outbox(impatient)) == 1
    finally:
        engine.dispose()
        impatient.dispose()


def test_sqlite_reads_do_not_wait_for_a_writer(tmp_path: Path, clock: FakeClock) -> None:
    url = f"sqlite:///{tmp_path / 'busy.sqlite3'}"
    engine, writer = make_engine(url), make_engine(url)
    box = Outbox(engine, clock=clock)
    try:
        box.create_all()
        event_id = _enqueue(box)
        with writer.connect() as conn, conn.begin():
            conn.execute(box.events.update().values(attempts=7))
            started = time.monotonic()
            # WAL readers see the last commit while another connection holds the lock.
            event = box.get(event_id)
            assert event is not None
            assert event.attempts == 0
            assert box.stats().pending == 1
            assert box.next_due_at() == T0
            assert time.monotonic() - started < 5
    finally:
        box.dispose()
        writer.dispose()


def test_in_memory_sqlite_is_shared_by_threads(clock: FakeClock) -> None:
    engine = make_engine("sqlite://")
    box = Outbox(engine, clock=clock)
    try:
        box.create_all()
        ids: list[int] = []
        thread = threading.Thread(target=lambda: ids.append(_enqueue(box)))
        thread.start()
        thread.join()
        assert [e.id for e in box.claim("me", limit=5, lease=30)] == ids
    finally:
        box.dispose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_does_not_reuse_the_parents_connection(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'fork.sqlite3'}")
    box = Outbox(engine)
    try:
        box.create_all()
        event_id = _enqueue(box)
        assert box.get(event_id) is not None  # leaves a pooled connection made here
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() in a process that has threads.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            code = 1
            try:
                code = 0 if [e.id for e in box.claim("child", limit=1, lease=60)] else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        event = box.get(event_id)
        assert event is not None
        assert event.lease_owner == "child"
    finally:
        box.dispose()


def test_unreachable_database_is_named_without_its_password() -> None:
    engine = make_engine("postgresql+psycopg://mmolove:s3cret-pw@127.0.0.1:1/nowhere")
    box = Outbox(engine)
    try:
        with pytest.raises(OutboxError) as caught:
            box.create_all()
        message = str(caught.value)
        assert "s3cret-pw" not in message
        assert "postgresql+psycopg://mmolove:***@127.0.0.1:1/nowhere" in message
        assert "cannot connect" in message
        assert "s3cret-pw" not in repr(box)
    finally:
        box.dispose()


def test_missing_tables_say_how_to_create_them(engine: sa.Engine) -> None:
    box = Outbox(engine, table_prefix=_prefix())
    with pytest.raises(OutboxError, match=r"do not exist .*create_all"):
        _enqueue(box)
    with pytest.raises(OutboxError, match="create_all"):
        box.stats()


def test_create_all_is_idempotent_and_safe_concurrently(engine: sa.Engine) -> None:
    prefix = _prefix()
    boxes = [Outbox(engine, table_prefix=prefix) for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(boxes))

    def create(box: Outbox) -> None:
        try:
            start.wait()
            box.create_all()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(box,)) for box in boxes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        boxes[0].create_all()
        assert _enqueue(boxes[1]) == 1
    finally:
        boxes[0].drop_all()


def test_table_prefix_is_checked(engine: sa.Engine) -> None:
    with pytest.raises(ValueError, match="table_prefix"):
        Outbox(engine, table_prefix="bad-prefix; drop")
    assert Outbox(engine, table_prefix="app_mmolove_").events.name == "app_mmolove_events"


def test_a_database_busy_at_connect_is_used_without_wal_until_later(tmp_path: Path) -> None:
    # The portal's own connection reads its file (db=): the switch to WAL needs the
    # file to itself, so a connection made now works in the file's journal mode, and
    # a later one switches it.
    path = tmp_path / "portal.sqlite3"
    portal = sqlite3.connect(path, isolation_level=None)
    portal.execute("CREATE TABLE players (id INTEGER PRIMARY KEY)")
    portal.execute("BEGIN")
    portal.execute("SELECT * FROM players").fetchall()
    engine = make_engine(f"sqlite:///{path}?timeout=0.2")
    try:
        with engine.connect() as conn:
            mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            assert mode == "delete"
        portal.execute("COMMIT")
        engine.dispose()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        portal.close()
        engine.dispose()
