"""Fixtures of the extension tests: the shared portal in inline mode, signal recorders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from portal import Recorder


@pytest.fixture
def portal_config(portal_config: dict[str, Any]) -> dict[str, Any]:
    """tests/conftest.py's portal, in inline mode.

    Inline: every event is delivered before the request returns, so a test asserts
    what MMOLove received right after the request, with no thread to wait for. Tests
    of the other modes ask for them through ``make_portal(MMOLOVE_DELIVERY=...)``.
    """
    return {**portal_config, "MMOLOVE_DELIVERY": "inline"}


@pytest.fixture
def app(make_portal: Callable[..., Flask]) -> Flask:
    """The portal in inline mode (pytest-flask's ``client`` uses this)."""
    return make_portal()


@pytest.fixture
def recorder(app: Flask) -> Iterator[Recorder]:
    rec = Recorder(app)
    yield rec
    rec.disconnect()
