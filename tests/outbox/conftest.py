"""Fixtures of the outbox tests: each runs against a real SQLite file and a real
PostgreSQL database, with its own table prefix and a hand-moved clock.

PostgreSQL runs when MMOLOVE_TEST_POSTGRES_URL is set; with MMOLOVE_REQUIRE_ALL_TESTS=1
a missing URL fails instead of skipping. Every test gets its own random table prefix
and drops its tables, so parallel runs against one database do not collide.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from outbox_support import T0, _prefix
from support import FakeClock, postgres_url

from flask_mmolove.outbox import Outbox, make_engine


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database URL, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        # A directory that does not exist yet: make_engine must create it.
        return f"sqlite:///{tmp_path / 'instance' / 'outbox.sqlite3'}"
    return postgres_url()


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """The outbox's engine on ``db_url``, disposed afterwards."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    """A clock at T0 that moves only when a test advances it."""
    return FakeClock(T0)


@pytest.fixture
def outbox(engine: sa.Engine, clock: FakeClock) -> Iterator[Outbox]:
    """An outbox with fresh tables under a random prefix, dropped afterwards."""
    box = Outbox(engine, table_prefix=_prefix(), clock=clock)
    box.create_all()
    yield box
    box.drop_all()
