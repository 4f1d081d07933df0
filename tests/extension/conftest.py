"""Fixtures: a portal on a live sandbox, signal recorders, PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from portal import Recorder, build_portal

from flask_mmolove import MMOLove

PG_URL = os.environ.get("MMOLOVE_TEST_POSTGRES_URL")


@pytest.fixture
def portal_config(mmolove_sandbox: Any, tmp_path: Any) -> dict[str, Any]:
    return {
        "MMOLOVE_SERVER_ID": mmolove_sandbox.server_id,
        "MMOLOVE_REFERRAL_SECRET": mmolove_sandbox.secret,
        "MMOLOVE_ENDPOINT": mmolove_sandbox.endpoint,
        "MMOLOVE_DATABASE_URI": f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        "MMOLOVE_DELIVERY": "inline",
        "MMOLOVE_RETRY_BASE": 0.05,
        "MMOLOVE_RETRY_CAP": 0.2,
        "MMOLOVE_POLL_INTERVAL": 0.2,
        "MMOLOVE_DRAIN_TIMEOUT": 1.0,
    }


@pytest.fixture
def make_portal(portal_config: dict[str, Any]) -> Iterator[Callable[..., Flask]]:
    """Builds portals on the sandbox; stops their delivery threads afterwards."""
    made: list[tuple[MMOLove, Flask]] = []

    def factory(ext: MMOLove | None = None, **overrides: Any) -> Flask:
        ext = ext or MMOLove()
        app = build_portal({**portal_config, **overrides}, ext)
        made.append((ext, app))
        return app

    yield factory
    for ext, app in made:
        ext.shutdown(app)


@pytest.fixture
def app(make_portal: Callable[..., Flask]) -> Flask:
    """The portal in inline mode (pytest-flask's ``client`` uses this)."""
    return make_portal()


@pytest.fixture
def recorder(app: Flask) -> Iterator[Recorder]:
    rec = Recorder(app)
    yield rec
    rec.disconnect()


@pytest.fixture
def pg_uri() -> str:
    if not PG_URL:
        if os.environ.get("MMOLOVE_REQUIRE_ALL_TESTS"):
            pytest.fail("MMOLOVE_TEST_POSTGRES_URL must be set in CI")
        pytest.skip("set MMOLOVE_TEST_POSTGRES_URL to run PostgreSQL tests")
    return PG_URL
