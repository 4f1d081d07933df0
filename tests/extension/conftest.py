"""Fixtures: a portal on a live sandbox, signal recorders, PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from portal import Recorder, portals, postgres_url


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
    with portals(portal_config) as factory:
        yield factory


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
    return postgres_url()
