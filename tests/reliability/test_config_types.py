"""Item 15: every bad setting fails at ``init_app`` with a message naming its key.

tests/extension/test_config.py covers a hand-picked set; here every key of
``flask_mmolove.settings.DEFAULTS`` gets values of the wrong type, and the numeric
ones values that are numbers but not usable (NaN, infinity, negative).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from reliability_support import outbox_of, record_figures, register

from flask_mmolove import ConfigurationError, MMOLove
from flask_mmolove.settings import DEFAULTS

CANARY = "cfg-canary-secret-value"

BOOLEANS = {
    "MMOLOVE_ENABLED",
    "MMOLOVE_TEST_MODE",
    "MMOLOVE_FIRST_TOUCH",
    "MMOLOVE_CALLBACK_LEGACY_GET",
}
STRINGS = {
    "MMOLOVE_SERVER_ID",
    "MMOLOVE_REFERRAL_SECRET",
    "MMOLOVE_KEY_ID",
    "MMOLOVE_ENDPOINT",
    "MMOLOVE_DATABASE_URI",
    "MMOLOVE_TABLE_PREFIX",
    "MMOLOVE_DELIVERY",
    "MMOLOVE_COOKIE_NAME",
    "MMOLOVE_COOKIE_DOMAIN",
    "MMOLOVE_SESSION_KEY",
    "MMOLOVE_CALLBACK_URL",
}


def wrong_values(key: str) -> list[Any]:
    default = DEFAULTS[key]
    if key in BOOLEANS:
        return ["false", "0", 1, None, []]
    if key == "MMOLOVE_CALLBACK_SECRET":
        # One secret or a list of them: anything else, or an empty one, is refused.
        return [42, b"bytes", True, "", [], [""], [CANARY, 7], {"k": CANARY}]
    if key == "MMOLOVE_COOKIE_SECURE":
        return ["yes", 1, 0.0, []]
    if key in STRINGS:
        return [42, b"bytes", ["x"], True]
    if isinstance(default, float):
        return ["5", None, True, [], b"1"]
    if isinstance(default, int):
        return ["50", 5.0, True, None, []]
    raise AssertionError(f"no wrong values for {key}: add it to this test")


def cases() -> list[Any]:
    out = []
    for key in DEFAULTS:
        for value in wrong_values(key):
            out.append(pytest.param(key, value, id=f"{key}={value!r}"))
        if isinstance(DEFAULTS[key], float):
            for bad in (math.nan, math.inf):
                out.append(pytest.param(key, bad, id=f"{key}={bad!r}"))
    return out


def init(tmp_path: Path, **config: Any) -> Flask:
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(
        MMOLOVE_SERVER_ID="srv-1",
        MMOLOVE_REFERRAL_SECRET=CANARY,
        MMOLOVE_DELIVERY="worker",
        MMOLOVE_DATABASE_URI=f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
    )
    app.config.update(config)
    MMOLove().init_app(app)
    return app


def assert_names_key(tmp_path: Path, key: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        init(tmp_path, **{key: value})
    assert key in str(info.value)
    assert CANARY not in str(info.value)


def test_every_key_has_a_test() -> None:
    assert all(wrong_values(key) for key in DEFAULTS)
    record_figures(
        "15 configuration",
        keys=len(DEFAULTS),
        wrong_type_cases=sum(len(wrong_values(k)) for k in DEFAULTS),
    )


@pytest.mark.parametrize(("key", "value"), cases())
def test_wrong_type_fails_at_init_app_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: Any
) -> None:
    monkeypatch.delenv("MMOLOVE_SERVER_ID", raising=False)
    monkeypatch.delenv("MMOLOVE_REFERRAL_SECRET", raising=False)
    assert_names_key(tmp_path, key, value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("MMOLOVE_TABLE_PREFIX", "9starts_with_a_digit"),
        ("MMOLOVE_TABLE_PREFIX", "p" * 41),
        ("MMOLOVE_DATABASE_URI", "not a url"),
        ("MMOLOVE_DATABASE_URI", "nosuchdb://host/db"),
        ("MMOLOVE_DATABASE_URI", "postgresql+nosuchdriver://host/db"),
        ("MMOLOVE_DRAIN_TIMEOUT", -0.5),
    ],
)
def test_unusable_value_fails_at_init_app_naming_the_key(
    tmp_path: Path, key: str, value: Any
) -> None:
    assert_names_key(tmp_path, key, value)


@pytest.mark.parametrize("uri", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_outbox_keeps_its_tables(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any, uri: str
) -> None:
    """An in-memory SQLite outbox (for tests) must survive init_app."""
    app = make_portal(MMOLOVE_DATABASE_URI=uri, MMOLOVE_DELIVERY="inline")
    register(app, mmolove_sandbox.mint_token(), "m1")
    assert [e.state for e in outbox_of(app).list_events()] == ["delivered"]
    assert mmolove_sandbox.accepted_count("registered") == 1
