"""Fixtures every test directory shares: a README-style portal on a live sandbox, PostgreSQL.

The helpers these fixtures and the tests import (support.py, portal.py,
reliability_support.py, procapp.py) live beside this file, in tests/, which pytest puts
on ``sys.path`` (``pythonpath`` in pyproject.toml): ``from portal import Recorder``
works from any directory, with no path edits. A directory's own conftest.py overrides
a fixture here only where its tests truly need something else, and says why.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from portal import portals
from support import postgres_url

pytest_plugins = ["pytester"]


@pytest.fixture
def portal_config(mmolove_sandbox: Any, tmp_path: Path) -> dict[str, Any]:
    """A portal on the sandbox with an SQLite outbox and short backoff: time is kept short.

    No ``MMOLOVE_DELIVERY``: each directory that builds portals chooses its mode.
    """
    return {
        "MMOLOVE_SERVER_ID": mmolove_sandbox.server_id,
        "MMOLOVE_REFERRAL_SECRET": mmolove_sandbox.secret,
        "MMOLOVE_ENDPOINT": mmolove_sandbox.endpoint,
        "MMOLOVE_DATABASE_URI": f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        "MMOLOVE_RETRY_BASE": 0.05,
        "MMOLOVE_RETRY_CAP": 0.2,
        "MMOLOVE_POLL_INTERVAL": 0.2,
        "MMOLOVE_DRAIN_TIMEOUT": 1.0,
    }


@pytest.fixture
def make_portal(portal_config: dict[str, Any]) -> Iterator[Callable[..., Flask]]:
    """Builds README-style portals on the sandbox; stops their delivery afterwards."""
    with portals(portal_config) as factory:
        yield factory


@pytest.fixture
def pg_uri() -> str:
    """The test PostgreSQL URL: skips without MMOLOVE_TEST_POSTGRES_URL, fails in CI."""
    return postgres_url()


@pytest.fixture
def pg_schema_uri(pg_uri: str) -> Iterator[str]:
    """``pg_uri`` in a schema of the test's own (search_path), dropped afterwards."""
    schema = "t_" + uuid.uuid4().hex[:10]
    admin = sa.create_engine(pg_uri)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = sa.make_url(pg_uri).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
