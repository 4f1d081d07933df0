"""Bounded waits on the request path (issue 15): a lock held elsewhere on the outbox's
tables holds ``/register`` for ``MMOLOVE_REQUEST_LOCK_TIMEOUT`` at most.

Standalone, the write is then lost and logged at ERROR with the command that writes it
again (the response stands); with ``db=``, the portal's transaction fails whole. Only
the extension's own statements are bounded: the portal's own, later in the same
transaction, keep the portal's timeouts, and delivery keeps the engine's long SQLite
busy timeout. SQLite here; PostgreSQL where marked (tests/reliability/
test_request_locks.py runs the same as processes).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_mmolove import ConfigurationError, MMOLove, set_referee
from flask_mmolove.outbox import SQLITE_BUSY_TIMEOUT

#: The bound the tests run under, and what a request may take on top of it here.
BOUND = 0.5
MARGIN = 1.5


def _outbox(app: Flask) -> Any:
    return app.extensions["mmolove"].outbox


def _count(engine: sa.Engine, table: str) -> int:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(sa.func.count()).select_from(sa.table(table)))
        return int(rows.scalar_one())


def _register_timed(client: Any, token: str, name: str) -> tuple[int, float]:
    assert client.get(f"/register?mmref={token}").status_code == 200
    started = time.monotonic()
    response = client.post("/register", data={"name": name})
    return response.status_code, time.monotonic() - started


def _busy_timeouts_at_checkin(engine: sa.Engine) -> list[int]:
    """The busy timeout of every connection the engine's pool takes back, from now on."""
    seen: list[int] = []

    def checkin(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:
            seen.append(dbapi_connection.execute("PRAGMA busy_timeout").fetchone()[0])

    sa.event.listen(engine, "checkin", checkin)
    return seen


# --- standalone, SQLite ----------------------------------------------------------------


def test_a_sqlite_writer_holding_the_outbox_does_not_hold_register(
    make_portal: Callable[..., Flask],
    mmolove_sandbox: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_portal(MMOLOVE_REQUEST_LOCK_TIMEOUT=BOUND)
    outbox = _outbox(app)
    checked_in = _busy_timeouts_at_checkin(outbox.engine)
    token = mmolove_sandbox.mint_token("friend")
    holder = sqlite3.connect(outbox.engine.url.database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with caplog.at_level(logging.ERROR, logger="flask_mmolove"):
            status, took = _register_timed(app.test_client(), token, "ann")
    finally:
        holder.rollback()
        holder.close()
    # The response stands: the portal's work is done; the write is logged as lost.
    assert status == 302
    assert took < BOUND + MARGIN, took
    command = f"flask mmolove enqueue registered --identity 1000 --token {token}"
    assert command in caplog.text
    assert "MMOLOVE_REQUEST_LOCK_TIMEOUT" in caplog.text
    assert _count(outbox.engine, "mmolove_events") == 0
    # The pooled connection went back with the engine's own busy timeout: delivery,
    # on the same pool, still waits its long one.
    assert checked_in
    assert set(checked_in) == {int(SQLITE_BUSY_TIMEOUT * 1000)}
    # Once the lock is gone, the logged command writes it.
    result = app.test_cli_runner().invoke(args=command.split()[1:])
    assert result.exit_code == 0, result.output
    assert _count(outbox.engine, "mmolove_events") == 1


def test_without_a_lock_register_writes_and_delivery_keeps_its_long_wait(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    app = make_portal(MMOLOVE_REQUEST_LOCK_TIMEOUT=BOUND, MMOLOVE_DELIVERY="worker")
    outbox = _outbox(app)
    checked_in = _busy_timeouts_at_checkin(outbox.engine)
    status, _ = _register_timed(app.test_client(), mmolove_sandbox.mint_token("f"), "bo")
    assert status == 302
    assert _count(outbox.engine, "mmolove_events") == 1
    assert set(checked_in) == {int(SQLITE_BUSY_TIMEOUT * 1000)}
    # A claim (delivery's side) waits the long busy timeout, not the request's.
    with outbox.engine.connect() as conn:
        timeout = conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()
    assert timeout == int(SQLITE_BUSY_TIMEOUT * 1000)


# --- db=: the portal's transaction ----------------------------------------------------


def _db_portal(config: dict[str, Any], database_uri: str) -> tuple[Flask, SQLAlchemy, MMOLove]:
    """A db= portal whose /register reports the timeouts its own connection has after
    ``set_referee``, having set its own first if the form asks."""

    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)

    class User(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)

    app = Flask(__name__)
    config = {k: v for k, v in config.items() if k != "MMOLOVE_DATABASE_URI"}
    app.config.update(SECRET_KEY="locks", SQLALCHEMY_DATABASE_URI=database_uri, **config)
    db.init_app(app)
    ext = MMOLove(app, db=db)
    with app.app_context():
        db.drop_all()
        db.create_all()

    def settings() -> dict[str, Any]:
        if db.engine.dialect.name == "sqlite":
            return {"busy_timeout": db.session.execute(sa.text("PRAGMA busy_timeout")).scalar()}
        row = db.session.execute(sa.text("SHOW lock_timeout")).scalar()
        statement = db.session.execute(sa.text("SHOW statement_timeout")).scalar()
        return {"lock_timeout": row, "statement_timeout": statement}

    @app.route("/register", methods=["GET", "POST"])
    def register() -> Any:
        if request.method == "GET":
            return "the form"
        for name, value in request.form.items():
            if name not in ("busy_timeout", "lock_timeout", "statement_timeout"):
                continue
            if db.engine.dialect.name == "sqlite":
                db.session.execute(sa.text(f"PRAGMA {name} = {int(value)}"))
            else:
                db.session.execute(
                    sa.text("SELECT set_config(:name, :value, true)"),
                    {"name": name, "value": value},
                )
        before = settings()
        user = User()
        db.session.add(user)
        db.session.flush()
        set_referee(user.id)
        after = settings()
        db.session.commit()
        return {"before": before, "after": after}, 201

    return app, db, ext


@pytest.fixture
def db_portal() -> Iterator[Callable[[dict[str, Any], str], tuple[Flask, SQLAlchemy]]]:
    """``_db_portal``, its engine closed at the end."""
    made: list[tuple[Flask, SQLAlchemy, MMOLove]] = []

    def factory(config: dict[str, Any], database_uri: str) -> tuple[Flask, SQLAlchemy]:
        made.append(_db_portal(config, database_uri))
        return made[-1][:2]

    yield factory
    for app, db, ext in made:
        ext.shutdown(app)
        with app.app_context():
            db.session.remove()
            db.engine.dispose()


def test_db_mode_sqlite_the_portal_keeps_its_busy_timeout(
    db_portal: Any, portal_config: dict[str, Any], mmolove_sandbox: Any, tmp_path: Any
) -> None:
    app, db = db_portal(
        {**portal_config, "MMOLOVE_REQUEST_LOCK_TIMEOUT": BOUND},
        f"sqlite:///{tmp_path / 'portal.sqlite3'}",
    )
    client = app.test_client()
    for own in ({}, {"busy_timeout": "4321"}):
        client.get(f"/register?mmref={mmolove_sandbox.mint_token('f' + str(len(own)))}")
        response = client.post("/register", data=own)
        assert response.status_code == 201
        assert response.json is not None
        assert response.json["after"] == response.json["before"]
    with app.app_context():
        assert _count(db.engine, "mmolove_events") == 2


@pytest.fixture
def lock_table(pg_schema_uri: str) -> Iterator[Callable[[str], sa.Connection]]:
    """``lock_table(name)``: another connection holds it in ACCESS EXCLUSIVE mode until
    the test ends, or its ``rollback()``."""
    engine = sa.create_engine(pg_schema_uri)
    held: list[sa.Connection] = []

    def lock(table: str) -> sa.Connection:
        conn = engine.connect()
        conn.execute(sa.text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        held.append(conn)
        return conn

    yield lock
    for conn in held:
        conn.rollback()
        conn.close()
    engine.dispose()


@pytest.mark.postgres
def test_db_mode_postgres_the_portal_keeps_its_own_timeouts(
    db_portal: Any, portal_config: dict[str, Any], mmolove_sandbox: Any, pg_schema_uri: str
) -> None:
    app, db = db_portal({**portal_config, "MMOLOVE_REQUEST_LOCK_TIMEOUT": BOUND}, pg_schema_uri)
    client = app.test_client()
    own = {"lock_timeout": "1234ms", "statement_timeout": "4321ms"}
    for n, form in enumerate(({}, own)):
        client.get(f"/register?mmref={mmolove_sandbox.mint_token(f'f{n}')}")
        response = client.post("/register", data=form)
        assert response.status_code == 201, response.data
        assert response.json is not None
        assert response.json["after"] == response.json["before"]
    assert response.json["after"] == {"lock_timeout": "1234ms", "statement_timeout": "4321ms"}
    with app.app_context():
        assert _count(db.engine, "mmolove_events") == 2


@pytest.mark.postgres
def test_db_mode_postgres_a_locked_outbox_fails_the_registration_whole_and_quickly(
    db_portal: Any,
    portal_config: dict[str, Any],
    mmolove_sandbox: Any,
    pg_schema_uri: str,
    lock_table: Callable[[str], sa.Connection],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, db = db_portal({**portal_config, "MMOLOVE_REQUEST_LOCK_TIMEOUT": BOUND}, pg_schema_uri)
    lock_table("mmolove_events")
    with caplog.at_level(logging.ERROR):
        status, took = _register_timed(app.test_client(), mmolove_sandbox.mint_token("f"), "x")
    # The view saw the database's error: its transaction never commits.
    assert status == 500
    assert took < BOUND + MARGIN, took
    assert "canceling statement due to" in caplog.text
    with app.app_context():
        assert _count(db.engine, "users") == 0
        assert _count(db.engine, "mmolove_bindings") == 0


@pytest.mark.postgres
def test_standalone_postgres_a_locked_outbox_does_not_hold_register(
    make_portal: Callable[..., Flask],
    mmolove_sandbox: Any,
    pg_schema_uri: str,
    lock_table: Callable[[str], sa.Connection],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_portal(MMOLOVE_REQUEST_LOCK_TIMEOUT=BOUND, MMOLOVE_DATABASE_URI=pg_schema_uri)
    outbox = _outbox(app)
    token = mmolove_sandbox.mint_token("friend")
    holder = lock_table("mmolove_events")
    with caplog.at_level(logging.ERROR, logger="flask_mmolove"):
        status, took = _register_timed(app.test_client(), token, "ann")
    assert status == 302
    assert took < BOUND + MARGIN, took
    command = f"flask mmolove enqueue registered --identity 1000 --token {token}"
    assert command in caplog.text
    assert "MMOLOVE_REQUEST_LOCK_TIMEOUT" in caplog.text
    holder.rollback()
    assert _count(outbox.engine, "mmolove_events") == 0
    result = app.test_cli_runner().invoke(args=command.split()[1:])
    assert result.exit_code == 0, result.output
    assert _count(outbox.engine, "mmolove_events") == 1


@pytest.mark.parametrize("value", [0, -1, "5", True, float("inf")])
def test_a_request_lock_timeout_that_cannot_bound_is_refused(
    make_portal: Callable[..., Flask], value: object
) -> None:
    with pytest.raises(ConfigurationError, match="MMOLOVE_REQUEST_LOCK_TIMEOUT"):
        make_portal(MMOLOVE_REQUEST_LOCK_TIMEOUT=value)
