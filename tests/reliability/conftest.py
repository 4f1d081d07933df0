"""Fixtures for the reliability proofs: portals on a live sandbox, databases, figures.

Self-contained on purpose (tests/extension/conftest.py is not imported); only the
helper functions of tests/extension/portal.py are reused, through ``sys.path``.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

HERE = Path(__file__).resolve().parent
for extra in (HERE, HERE.parent / "extension"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from portal import portals, postgres_url  # noqa: E402
from reliability_support import FIGURES  # noqa: E402


@pytest.fixture
def portal_config(mmolove_sandbox: Any, tmp_path: Path) -> dict[str, Any]:
    """A portal on the sandbox, SQLite outbox, short backoff: time is kept short."""
    return {
        "MMOLOVE_SERVER_ID": mmolove_sandbox.server_id,
        "MMOLOVE_REFERRAL_SECRET": mmolove_sandbox.secret,
        "MMOLOVE_ENDPOINT": mmolove_sandbox.endpoint,
        "MMOLOVE_DATABASE_URI": f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        "MMOLOVE_DELIVERY": "worker",
        "MMOLOVE_RETRY_BASE": 0.05,
        "MMOLOVE_RETRY_CAP": 0.4,
        "MMOLOVE_POLL_INTERVAL": 0.2,
        "MMOLOVE_DRAIN_TIMEOUT": 1.0,
        "MMOLOVE_CONNECT_TIMEOUT": 2.0,
        "MMOLOVE_READ_TIMEOUT": 5.0,
    }


@pytest.fixture
def make_portal(portal_config: dict[str, Any]) -> Iterator[Callable[..., Flask]]:
    """Builds README-style portals on the sandbox; stops their delivery afterwards."""
    with portals(portal_config) as factory:
        yield factory


@pytest.fixture
def pg_uri() -> str:
    return postgres_url()


@pytest.fixture
def table_prefix() -> str:
    """A fresh table prefix, so tests sharing one PostgreSQL database never meet."""
    return "r" + uuid.uuid4().hex[:10] + "_"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the figures the reliability tests measured (docs/reliability.md)."""
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for name, figures in FIGURES:
        shown = ", ".join(f"{key}={value}" for key, value in figures.items())
        terminalreporter.write_line(f"{name}: {shown}")
    target = os.environ.get("MMOLOVE_RELIABILITY_FIGURES")
    if target:
        Path(target).write_text(json.dumps(dict(FIGURES), indent=2, sort_keys=True) + "\n")
