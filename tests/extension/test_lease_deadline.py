"""A lease not longer than an attempt's deadline (connect + read timeout) is refused at
init_app, naming the three keys; a longer one is accepted (issue 15)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_mmolove import ConfigurationError, MMOLove


def _app(tmp_path: Path, **config: Any) -> Flask:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(
        SECRET_KEY="k",
        MMOLOVE_SERVER_ID="srv",
        MMOLOVE_REFERRAL_SECRET="s3cr3t-canary-value",
        MMOLOVE_DATABASE_URI=f"sqlite:///{tmp_path / 'o.sqlite3'}",
        MMOLOVE_DELIVERY="worker",
        **config,
    )
    MMOLove(app)
    return app


@pytest.mark.parametrize(
    "config",
    [
        {"MMOLOVE_LEASE": 15.0},  # the defaults: 5 + 10, equal is not longer
        {"MMOLOVE_LEASE": 2.0},
        {"MMOLOVE_LEASE": 3.0, "MMOLOVE_CONNECT_TIMEOUT": 1, "MMOLOVE_READ_TIMEOUT": 2},
    ],
)
def test_a_lease_not_longer_than_the_deadline_is_refused(
    tmp_path: Path, config: dict[str, Any]
) -> None:
    with pytest.raises(ConfigurationError) as info:
        _app(tmp_path, **config)
    message = str(info.value)
    for key in ("MMOLOVE_LEASE", "MMOLOVE_CONNECT_TIMEOUT", "MMOLOVE_READ_TIMEOUT"):
        assert key in message
    assert "s3cr3t-canary-value" not in message


@pytest.mark.parametrize(
    "config",
    [
        {},  # the defaults: 60 > 5 + 10
        {"MMOLOVE_LEASE": 15.5},
        {"MMOLOVE_LEASE": 3.1, "MMOLOVE_CONNECT_TIMEOUT": 1, "MMOLOVE_READ_TIMEOUT": 2},
    ],
)
def test_a_longer_lease_is_accepted(tmp_path: Path, config: dict[str, Any]) -> None:
    _app(tmp_path, **config)
