"""Real Flask-Migrate, in real ``flask`` processes, on a portal whose database also
holds the outbox (SQLite and PostgreSQL).

Standalone outbox in the portal's database: with ``flask_mmolove.migrate.include_object``
autogenerate leaves the outbox alone and ``flask db upgrade`` keeps its pending events;
without it (the control) autogenerate writes ``drop_table`` for every outbox table.
With ``db=`` (proof 6): ``flask db migrate`` creates the outbox tables in the portal's
own migration, and a later migrate and upgrade with pending events loses none.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from legacy_outbox import create_010, rows

from flask_mmolove.outbox import Outbox, make_engine

PORTAL = """
import os

import sqlalchemy as sa
from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_mmolove import MMOLove
from flask_mmolove.migrate import include_object as mmolove_include_object


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Player(db.Model):
    __tablename__ = "players"
    id: Mapped[int] = mapped_column(primary_key=True)
    if os.environ.get("PORTAL_V2"):
        nick = mapped_column(sa.String(40))


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["PORTAL_DB"]
    app.config["MMOLOVE_DELIVERY"] = "worker"
    db.init_app(app)
    mode = os.environ["PORTAL_MODE"]
    if mode == "db":
        MMOLove(app, db=db)
        Migrate(app, db)
    else:
        app.config["MMOLOVE_DATABASE_URI"] = os.environ["PORTAL_DB"]
        MMOLove(app)
        helper = mmolove_include_object if mode == "standalone" else None
        Migrate(app, db, include_object=helper)
    return app
"""

#: The tables of 0.1.0, and all of them now.
BASELINE_TABLES = ("mmolove_events", "mmolove_bindings", "mmolove_credits")
OUTBOX_TABLES = (*BASELINE_TABLES, "mmolove_hearts")


def flask(
    tmp_path: Path, url: str, mode: str, *args: str, v2: bool = False, credentials: bool = True
) -> str:
    env = {
        **os.environ,
        "FLASK_APP": "migportal:create_app",
        "PORTAL_DB": url,
        "PORTAL_MODE": mode,
        "MMOLOVE_SERVER_ID": "srv-1",
        "MMOLOVE_REFERRAL_SECRET": "s" * 32,
    }
    if not credentials:
        # An image build or a CI job: no MMOLove credentials anywhere.
        del env["MMOLOVE_SERVER_ID"], env["MMOLOVE_REFERRAL_SECRET"]
    env.pop("PORTAL_V2", None)
    if v2:
        env["PORTAL_V2"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "flask", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def migration_texts(tmp_path: Path) -> list[str]:
    versions = sorted((tmp_path / "migrations" / "versions").glob("*.py"), key=os.path.getmtime)
    return [path.read_text() for path in versions]


def enqueue(url: str, n: int) -> dict[str, list[tuple[object, ...]]]:
    engine = make_engine(url)
    box = Outbox(engine)
    for i in range(n):
        box.bind_and_enqueue(
            identity=f"p{i}",
            token=f"tok-{i}",
            event="registered",
            server_event_id=f"reg-{i}",
            body=b"{}",
        )
    assert box.stats().pending == n
    found = rows(engine)
    engine.dispose()
    return found


def outbox_rows(url: str) -> dict[str, list[tuple[object, ...]]]:
    engine = make_engine(url)
    try:
        return rows(engine)
    finally:
        engine.dispose()


def columns(url: str, table: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {column["name"] for column in sa.inspect(conn).get_columns(table)}
    finally:
        engine.dispose()


def test_the_helper_keeps_autogenerate_away_from_a_standalone_outbox(
    tmp_path: Path, database_url: str
) -> None:
    (tmp_path / "migportal.py").write_text(PORTAL)
    flask(tmp_path, database_url, "standalone", "db", "init")
    # Loading the app made the standalone outbox in the portal's database.
    before = enqueue(database_url, 3)

    flask(tmp_path, database_url, "standalone", "db", "migrate", "-m", "players")
    [first] = migration_texts(tmp_path)
    assert "op.create_table('players'" in first
    assert "mmolove_" not in first
    flask(tmp_path, database_url, "standalone", "db", "upgrade")
    assert outbox_rows(database_url) == before

    flask(tmp_path, database_url, "standalone", "db", "migrate", "-m", "nick", v2=True)
    second = migration_texts(tmp_path)[1]
    assert "op.add_column('nick'" in second or "batch_op.add_column(sa.Column('nick'" in second
    assert "mmolove_" not in second
    flask(tmp_path, database_url, "standalone", "db", "upgrade", v2=True)
    assert "nick" in columns(database_url, "players")
    assert outbox_rows(database_url) == before


def test_without_the_helper_autogenerate_would_drop_the_outbox(
    tmp_path: Path, database_url: str
) -> None:
    """The control: the same portal with no include_object."""
    (tmp_path / "migportal.py").write_text(PORTAL)
    flask(tmp_path, database_url, "standalone-nohelper", "db", "init")
    enqueue(database_url, 1)
    flask(tmp_path, database_url, "standalone-nohelper", "db", "migrate", "-m", "players")
    [migration] = migration_texts(tmp_path)
    for table in (*OUTBOX_TABLES, "mmolove_alembic_version"):
        assert f"op.drop_table('{table}')" in migration


def test_with_db_the_portals_migrations_create_the_outbox_and_keep_its_events(
    tmp_path: Path, database_url: str
) -> None:
    """Proof 6: ``flask db init / migrate / upgrade`` with ``MMOLove(app, db=db)``."""
    (tmp_path / "migportal.py").write_text(PORTAL)
    flask(tmp_path, database_url, "db", "db", "init")
    flask(tmp_path, database_url, "db", "db", "migrate", "-m", "initial")
    [first] = migration_texts(tmp_path)
    for table in ("players", *OUTBOX_TABLES):
        assert f"op.create_table('{table}'" in first
    assert "alembic_version" not in first
    flask(tmp_path, database_url, "db", "db", "upgrade")
    before = enqueue(database_url, 4)

    flask(tmp_path, database_url, "db", "db", "migrate", "-m", "nick", v2=True)
    second = migration_texts(tmp_path)[1]
    assert "nick" in second
    assert "mmolove_" not in second
    flask(tmp_path, database_url, "db", "db", "upgrade", v2=True)
    assert "nick" in columns(database_url, "players")
    assert outbox_rows(database_url) == before
    # The portal's version table only: the standalone one never appears with db=.
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        assert not sa.inspect(conn).has_table("mmolove_alembic_version")
    engine.dispose()


@pytest.mark.parametrize("mode", ["db", "standalone"])
def test_an_image_build_migrates_without_credentials(
    tmp_path: Path, database_url: str, mode: str
) -> None:
    """Proof 8's deploy step: the portal's own migrations and ``flask routes`` run with
    no ``MMOLOVE_SERVER_ID`` or ``MMOLOVE_REFERRAL_SECRET`` in the environment."""
    (tmp_path / "migportal.py").write_text(PORTAL)
    flask(tmp_path, database_url, mode, "db", "init", credentials=False)
    flask(tmp_path, database_url, mode, "db", "migrate", "-m", "initial", credentials=False)
    flask(tmp_path, database_url, mode, "db", "upgrade", credentials=False)
    assert "/" in flask(tmp_path, database_url, mode, "routes", credentials=False)
    assert "players" in _tables(database_url)


def _tables(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return sa.inspect(conn).get_table_names()
    finally:
        engine.dispose()


def test_with_db_the_next_migrate_adds_one_token_one_referrals_unique_indexes(
    tmp_path: Path, database_url: str
) -> None:
    """A portal whose migrations made the outbox's tables before revision 0002 (as
    0.1.0 declared them): its next ``flask db migrate`` adds both unique indexes, and
    ``flask db upgrade`` creates them, its events kept."""
    (tmp_path / "migportal.py").write_text(PORTAL)
    flask(tmp_path, database_url, "db", "db", "init")
    engine = make_engine(database_url)
    create_010(engine)
    engine.dispose()
    before = enqueue(database_url, 3)

    flask(tmp_path, database_url, "db", "db", "migrate", "-m", "one token")
    [migration] = migration_texts(tmp_path)
    assert "op.create_table('players'" in migration
    for table in BASELINE_TABLES:
        assert f"op.create_table('{table}'" not in migration
    # Made by 0.1.0's declarations: the tables declared since are new to it.
    assert "op.create_table('mmolove_hearts'" in migration
    for table in ("mmolove_bindings", "mmolove_credits"):
        # op.create_index(...) or, Flask-Migrate rendering as batch, batch_op's.
        [line] = [
            line
            for line in migration.splitlines()
            if f"'{table}_token'" in line and "create_index(" in line
        ]
        assert "['token'], unique=True)" in line
    flask(tmp_path, database_url, "db", "db", "upgrade")
    assert outbox_rows(database_url) == before
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        for table in ("mmolove_bindings", "mmolove_credits"):
            assert {(index["name"], index["unique"]) for index in inspector.get_indexes(table)} >= {
                (f"{table}_token", True)
            }
    engine.dispose()
