"""Issue 15, proof 5: a lock held on the outbox does not hold ``/register``.

A real portal process (tests/dbportal.py) starts, then another connection locks the
outbox's events table (PostgreSQL: ``LOCK TABLE ... IN ACCESS EXCLUSIVE MODE``, as a
migration or ``VACUUM FULL`` does; SQLite: a writer in ``BEGIN IMMEDIATE``) and holds
it far longer than ``MMOLOVE_REQUEST_LOCK_TIMEOUT``. The registration answers within
that timeout (plus a margin), while the lock is still held:

- standalone, the response stands and the write is logged as lost with its
  ``flask mmolove enqueue`` command, which writes it once the lock is gone;
- with ``db=``, the registration fails whole: no account, no binding, no event.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from reliability_support import HERE, record_figures

#: The bound the portal runs under, the longest the lock is held, and the margin a
#: request may take on top of the bound here (a loaded CI machine).
BOUND = 1.0
HELD = 10.0
MARGIN = 2.0

#: The portal started, then waiting for a line on stdin before its registration.
_DRIVER = """
import sys, time
import dbportal
print("ready", flush=True)
sys.stdin.readline()
started = time.monotonic()
dbportal.main(sys.argv[1:])
print("took", time.monotonic() - started, flush=True)
"""


def _env(sandbox: Any, database_uri: str, **portal: Any) -> dict[str, str]:
    env = {
        **os.environ,
        "FLASK_APP": str(HERE / "dbportal.py"),
        "PYTHONPATH": str(HERE),
        "MMOLOVE_ENDPOINT": sandbox.endpoint,
        "MMOLOVE_SERVER_ID": sandbox.server_id,
        "MMOLOVE_REFERRAL_SECRET": sandbox.secret,
        "PYTHONUNBUFFERED": "1",
        "PORTAL_SQLALCHEMY_DATABASE_URI": json.dumps(database_uri),
        "PORTAL_MMOLOVE_DELIVERY": json.dumps("worker"),
        "PORTAL_MMOLOVE_REQUEST_LOCK_TIMEOUT": json.dumps(BOUND),
    }
    for key, value in portal.items():
        env[f"PORTAL_{key}"] = json.dumps(value)
    return env


def _create(env: dict[str, str], cwd: Path) -> None:
    created = subprocess.run(
        [sys.executable, str(HERE / "dbportal.py"), "create"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr


def _register_while_locked(
    env: dict[str, str], cwd: Path, lock: Callable[[], Callable[[], None]], token: str
) -> tuple[int, float, float, str]:
    """Start the portal, take the lock, register; (status, seconds the request took,
    seconds the lock was held when it answered, the portal's stderr)."""
    portal = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, "register", token, "7"],
        env=env,
        cwd=cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert portal.stdout is not None
        assert portal.stdin is not None
        assert portal.stdout.readline().strip() == "ready"
        release = lock()
        locked_at = time.monotonic()
        try:
            portal.stdin.write("go\n")
            portal.stdin.flush()
            status = int(portal.stdout.readline())
            answered = time.monotonic() - locked_at
            took = float(portal.stdout.readline().split()[1])
            # Held on past the answer: the request did not wait for it.
            time.sleep(max(0.0, HELD - answered))
        finally:
            release()
        _, stderr = portal.communicate(timeout=30)
    finally:
        if portal.poll() is None:
            portal.kill()
            portal.communicate()
    return status, took, answered, stderr


def _count(uri: str, table: str) -> int:
    engine = sa.create_engine(uri)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(sa.func.count()).select_from(sa.table(table)))
            return int(rows.scalar_one())
    finally:
        engine.dispose()


def _pg_lock(uri: str, table: str) -> Callable[[], Callable[[], None]]:
    def lock() -> Callable[[], None]:
        engine = sa.create_engine(uri)
        conn = engine.connect()
        conn.execute(sa.text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))

        def release() -> None:
            conn.rollback()
            conn.close()
            engine.dispose()

        return release

    return lock


def _enqueue_command(stderr: str) -> list[str]:
    found = re.search(
        r"write it again with: (flask mmolove enqueue \S+ --identity \S+ --token \S+)", stderr
    )
    assert found is not None, stderr
    return found.group(1).split()


def _run_command(env: dict[str, str], cwd: Path, command: list[str]) -> None:
    assert command[:2] == ["flask", "mmolove"]
    ran = subprocess.run(
        [sys.executable, "-m", "flask", *command[1:]],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_standalone_a_locked_events_table_does_not_hold_register(
    mmolove_sandbox: Any, pg_schema_uri: str, tmp_path: Path
) -> None:
    env = _env(mmolove_sandbox, pg_schema_uri, STANDALONE=True, MMOLOVE_DATABASE_URI=pg_schema_uri)
    _create(env, tmp_path)
    token = mmolove_sandbox.mint_token("friend")
    status, took, answered, stderr = _register_while_locked(
        env, tmp_path, _pg_lock(pg_schema_uri, "mmolove_events"), token
    )
    assert status == 201, stderr
    assert took < BOUND + MARGIN, took
    assert answered < BOUND + MARGIN, answered
    assert "MMOLOVE_REQUEST_LOCK_TIMEOUT" in stderr
    assert _count(pg_schema_uri, "players") == 1
    assert _count(pg_schema_uri, "mmolove_events") == 0
    # After the lock, the logged command writes what was lost.
    _run_command(env, tmp_path, _enqueue_command(stderr))
    assert _count(pg_schema_uri, "mmolove_events") == 1
    assert _count(pg_schema_uri, "mmolove_bindings") == 1
    record_figures(
        "15.5 PostgreSQL table lock, standalone",
        lock_timeout=BOUND,
        request_seconds=took,
        lock_held=HELD,
        status=status,
        lost_then_enqueued=1,
    )


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_db_mode_a_locked_events_table_fails_the_registration_whole(
    mmolove_sandbox: Any, pg_schema_uri: str, tmp_path: Path
) -> None:
    env = _env(mmolove_sandbox, pg_schema_uri)
    _create(env, tmp_path)
    status, took, answered, stderr = _register_while_locked(
        env,
        tmp_path,
        _pg_lock(pg_schema_uri, "mmolove_events"),
        mmolove_sandbox.mint_token("friend"),
    )
    assert status == 500, stderr
    assert took < BOUND + MARGIN, took
    assert answered < BOUND + MARGIN, answered
    assert "canceling statement due to" in stderr
    assert _count(pg_schema_uri, "players") == 0
    assert _count(pg_schema_uri, "mmolove_bindings") == 0
    assert _count(pg_schema_uri, "mmolove_events") == 0
    record_figures(
        "15.5 PostgreSQL table lock, db=",
        lock_timeout=BOUND,
        request_seconds=took,
        lock_held=HELD,
        status=status,
        accounts=0,
    )


@pytest.mark.slow
def test_sqlite_standalone_a_writer_holding_the_outbox_does_not_hold_register(
    mmolove_sandbox: Any, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.sqlite3"
    env = _env(
        mmolove_sandbox,
        f"sqlite:///{tmp_path / 'portal.sqlite3'}",
        STANDALONE=True,
        MMOLOVE_DATABASE_URI=f"sqlite:///{outbox}",
    )
    _create(env, tmp_path)

    def lock() -> Callable[[], None]:
        import sqlite3

        holder = sqlite3.connect(outbox, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")

        def release() -> None:
            holder.rollback()
            holder.close()

        return release

    token = mmolove_sandbox.mint_token("friend")
    status, took, answered, stderr = _register_while_locked(env, tmp_path, lock, token)
    assert status == 201, stderr
    assert took < BOUND + MARGIN, took
    assert answered < BOUND + MARGIN, answered
    assert "MMOLOVE_REQUEST_LOCK_TIMEOUT" in stderr
    assert _count(f"sqlite:///{outbox}", "mmolove_events") == 0
    _run_command(env, tmp_path, _enqueue_command(stderr))
    assert _count(f"sqlite:///{outbox}", "mmolove_events") == 1
    record_figures(
        "15.5 SQLite writer holding the outbox, standalone",
        busy_timeout=BOUND,
        request_seconds=took,
        lock_held=HELD,
        status=status,
        lost_then_enqueued=1,
    )
