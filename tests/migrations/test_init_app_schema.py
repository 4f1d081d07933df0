"""``init_app`` and the outbox's schema version: a fresh outbox is created, an outdated
one refused naming ``flask mmolove db upgrade`` (TESTING or not), except while the
``flask`` command builds the app for a command that serves no request, where the first
use refuses instead, so that ``flask mmolove db upgrade`` itself can run."""

from __future__ import annotations

from typing import Any

import click
import pytest
import sqlalchemy as sa
from flask import Flask
from flask.cli import ScriptInfo, run_command
from legacy_outbox import create_010, rows

from flask_mmolove import MMOLove
from flask_mmolove.outbox import Outbox, OutboxOutdated, make_engine

_built: list[Flask] = []


@pytest.fixture(autouse=True)
def _shut_down() -> Any:
    """Each app's connections closed at the end of its test."""
    yield
    while _built:
        MMOLove().shutdown(_built.pop())


def make_app(database_url: str, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(
        MMOLOVE_DATABASE_URI=database_url,
        MMOLOVE_DELIVERY="worker",
        MMOLOVE_SERVER_ID="srv-1",
        MMOLOVE_REFERRAL_SECRET="s" * 32,
        **config,
    )
    MMOLove(app)
    _built.append(app)
    return app


def legacy(database_url: str, pending: int = 3) -> dict[str, list[tuple[object, ...]]]:
    """A 0.1.0 outbox with ``pending`` events; its rows."""
    engine = make_engine(database_url)
    create_010(engine)
    box = Outbox(engine)
    for i in range(pending):
        box.enqueue(
            event="registered",
            token=f"t{i}",
            identity=f"p{i}",
            server_event_id=f"reg-{i}",
            body=b"{}",
        )
    found = rows(engine)
    engine.dispose()
    return found


def test_init_app_creates_a_fresh_outbox_at_the_head(database_url: str) -> None:
    app = make_app(database_url)
    version = app.extensions["mmolove"].outbox.schema_version()
    assert version.current


@pytest.mark.parametrize("testing", [False, True])
def test_init_app_refuses_an_outdated_outbox_naming_the_command(
    database_url: str, testing: bool
) -> None:
    before = legacy(database_url)
    with pytest.raises(OutboxOutdated, match="run `flask mmolove db upgrade`"):
        make_app(database_url, TESTING=testing)
    engine = make_engine(database_url)
    assert rows(engine) == before
    engine.dispose()


def test_flask_run_gets_the_refusal_at_init_app(database_url: str) -> None:
    legacy(database_url)
    with (
        click.Context(run_command, obj=ScriptInfo()),
        pytest.raises(OutboxOutdated, match="flask mmolove db upgrade"),
    ):
        make_app(database_url)


def test_built_by_the_flask_command_the_outbox_refuses_at_first_use_and_db_upgrade_runs(
    database_url: str,
) -> None:
    before = legacy(database_url)
    with click.Context(click.Command("routes"), obj=ScriptInfo()):
        app = make_app(database_url)  # no refusal here: `flask routes` must run
    cli = app.test_cli_runner()

    current = cli.invoke(args=["mmolove", "db", "current"])
    assert current.exit_code == 0, current.output
    assert "schema: 0.1.0 (tables without a schema version)" in current.output
    assert "run `flask mmolove db upgrade`" in current.output

    status = cli.invoke(args=["mmolove", "status"])
    assert status.exit_code != 0
    assert "flask mmolove db upgrade" in str(status.exception)

    upgrade = cli.invoke(args=["mmolove", "db", "upgrade"])
    assert upgrade.exit_code == 0, upgrade.output
    assert (
        "schema upgraded from 0.1.0 (tables without a schema version) to "
        "0003 (hearts)" in upgrade.output
    )
    assert "pending:    3" in cli.invoke(args=["mmolove", "status"]).output
    again = cli.invoke(args=["mmolove", "db", "upgrade"])
    assert "schema already at 0003 (hearts): nothing to do" in again.output
    assert "up to date" in cli.invoke(args=["mmolove", "db", "current"]).output
    engine = make_engine(database_url)
    assert rows(engine) == before
    engine.dispose()
    make_app(database_url)  # an app built now starts


@pytest.mark.postgres
def test_the_refusal_never_shows_the_database_password(pg_uri: str) -> None:
    # The test server trusts local connections: the password is carried, not checked.
    url = sa.make_url(pg_uri).set(password="s3cret-pw").render_as_string(hide_password=False)
    engine = make_engine(url)
    create_010(engine, "pwtest_")
    try:
        with pytest.raises(OutboxOutdated) as refused:
            make_app(url, MMOLOVE_TABLE_PREFIX="pwtest_")
        assert "s3cret-pw" not in str(refused.value)
        assert "***" in str(refused.value)
        with click.Context(click.Command("routes"), obj=ScriptInfo()):
            app = make_app(url, MMOLOVE_TABLE_PREFIX="pwtest_")
        result = app.test_cli_runner().invoke(args=["mmolove", "db", "upgrade"])
        assert result.exit_code == 0, result.output
        assert "s3cret-pw" not in result.output
    finally:
        Outbox(engine, table_prefix="pwtest_").drop_all()
        engine.dispose()


def test_db_upgrade_with_db_mode_points_to_the_portals_migrations(tmp_path: Any) -> None:
    from flask_sqlalchemy import SQLAlchemy

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'portal.db'}"
    db = SQLAlchemy()
    db.init_app(app)
    MMOLove(app, db=db)
    result = app.test_cli_runner().invoke(args=["mmolove", "db", "upgrade"])
    assert result.exit_code == 1
    assert "the outbox tables are the portal's" in result.output
    assert "`flask db upgrade`" in result.output


def test_db_upgrade_when_disabled_says_so(database_url: str) -> None:
    app = make_app(database_url, MMOLOVE_ENABLED=False)
    result = app.test_cli_runner().invoke(args=["mmolove", "db", "upgrade"])
    assert result.exit_code == 1
    assert "MMOLOVE_ENABLED is false" in result.output
