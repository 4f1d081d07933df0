"""``flask_mmolove.migrate``: which objects autogenerate is kept away from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_mmolove import MMOLove
from flask_mmolove.migrate import excluding_outbox, include_object
from flask_mmolove.outbox.schema import make_tables


def verdicts(hook: Callable[..., bool], prefix: str) -> dict[str, bool]:
    tables = make_tables(prefix)
    events = tables.events
    index = next(iter(events.indexes))
    portal = sa.Table("players", sa.MetaData(), sa.Column("id", sa.Integer))
    # Alembic's signature: (object, name, type_, reflected, compare_to).
    call = hook
    return {
        "events": call(events, events.name, "table", True, None),
        "version": call(None, f"{prefix}alembic_version", "table", True, None),
        "index": call(index, index.name, "index", True, None),
        "column": call(events.c.token, "token", "column", True, None),
        "players": call(portal, "players", "table", False, None),
        "players.id": call(portal.c.id, "id", "column", False, None),
    }


LEFT_OUT = {
    "events": False,
    "version": False,
    "index": False,
    "column": False,
    "players": True,
    "players.id": True,
}


def test_the_current_apps_prefix_is_left_out(tmp_path: Path) -> None:
    app = Flask(__name__)
    app.config.update(
        MMOLOVE_DATABASE_URI=f"sqlite:///{tmp_path / 'o.db'}", MMOLOVE_TABLE_PREFIX="ref_"
    )
    ext = MMOLove(app)
    with app.app_context():
        assert verdicts(include_object, "ref_") == LEFT_OUT
        # Another prefix's tables are not this outbox's: kept.
        assert verdicts(include_object, "mmolove_")["events"] is True
    ext.shutdown(app)


def test_without_the_extension_the_configured_prefix_counts() -> None:
    app = Flask(__name__)
    with app.app_context():
        assert verdicts(include_object, "mmolove_") == LEFT_OUT


def test_with_db_nothing_is_left_out(tmp_path: Path) -> None:
    """The outbox's tables are the portal's then: its migrations must create them."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'p.db'}"
    db = SQLAlchemy()
    db.init_app(app)
    MMOLove(app, db=db)
    with app.app_context():
        assert all(verdicts(include_object, "mmolove_").values())


def test_outside_an_app_a_prefix_is_given() -> None:
    assert verdicts(excluding_outbox("ref_"), "ref_") == LEFT_OUT
    with pytest.raises(RuntimeError, match=r"excluding_outbox\(prefix\)"):
        include_object(None, "mmolove_events", "table", True, None)
