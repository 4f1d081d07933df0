"""Issue 15: no traceback shows the secret in a frame local.

``pytest -l``, Sentry and the Werkzeug debugger show every frame's locals, by their
reprs. Every configuration error and every error of the client is raised here with a
canary secret configured, and every local of every frame of its traceback (and of the
exceptions it chains to) is looked at: none holds the secret, whatever it is wrapped in.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import requests
from flask import Flask

from flask_mmolove import ConfigurationError, MMOLove, ReferralClient
from flask_mmolove.redaction import REDACTED, Redactor, Secret
from flask_mmolove.settings import DEFAULTS

BODY = b'{"event":"registered"}'


@pytest.fixture
def canary() -> str:
    return "canary-" + uuid.uuid4().hex


def _frames(exc: BaseException) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every frame of ``exc``'s traceback and of the exceptions it chains to, but this
    test's own (which holds the canary to hand it over)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        pending += [current.__cause__, current.__context__]
        tb: TracebackType | None = current.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_filename != __file__:
                yield f"{frame.f_code.co_filename}:{frame.f_code.co_name}", frame.f_locals
            tb = tb.tb_next


def assert_no_local_holds(canary: str, exc: BaseException) -> int:
    """How many frames were searched; fails naming the frame and local that holds it."""
    searched = 0
    for where, local_vars in _frames(exc):
        searched += 1
        for name, value in local_vars.items():
            shown = repr(value)
            assert canary not in shown, f"the secret is in local {name!r} of {where}"
    return searched


def raised(attempt: Callable[[], object]) -> BaseException:
    try:
        attempt()
    except Exception as exc:
        return exc
    raise AssertionError("expected an error")


BAD_VALUES: list[tuple[str, object]] = [
    *[(key, object()) for key in DEFAULTS if key != "MMOLOVE_ENABLED"],
    ("MMOLOVE_ENABLED", "yes"),
    ("MMOLOVE_DELIVERY", "nope"),
    ("MMOLOVE_ENDPOINT", "ftp://nowhere"),
    ("MMOLOVE_TABLE_PREFIX", "__"),
    ("MMOLOVE_TABLE_PREFIX", "bad prefix"),
    ("MMOLOVE_KEY_ID", "no spaces allowed"),
    ("MMOLOVE_COOKIE_MAX_AGE", 10**9),
    ("MMOLOVE_COOKIE_SECURE", "yes"),
    ("MMOLOVE_COOKIE_NAME", ""),
    ("MMOLOVE_LEASE", -1),
    ("MMOLOVE_BATCH_SIZE", 0),
    ("MMOLOVE_DATABASE_URI", "not a url"),
]


def _id(key: str, value: object) -> str:
    # Stable across processes (pytest-xdist compares ids): an object() by its type only.
    shown = "object()" if type(value) is object else repr(value)
    return f"{key}={shown}"


@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=[_id(k, v) for k, v in BAD_VALUES])
def test_a_configuration_error_shows_no_secret_in_any_frame(
    canary: str, tmp_path: Path, key: str, value: object
) -> None:
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(MMOLOVE_SERVER_ID="srv", MMOLOVE_REFERRAL_SECRET=canary)
    app.config[key] = value
    exc = raised(lambda: MMOLove(app))
    assert isinstance(exc, ConfigurationError | ValueError | TypeError)
    assert assert_no_local_holds(canary, exc) >= 2


def test_a_secret_of_the_wrong_type_is_in_no_frame_either(canary: str, tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(MMOLOVE_SERVER_ID="srv", MMOLOVE_REFERRAL_SECRET=canary.encode())
    exc = raised(lambda: MMOLove(app))
    assert isinstance(exc, ConfigurationError)
    assert "MMOLOVE_REFERRAL_SECRET must be a string" in str(exc)
    assert_no_local_holds(canary, exc)


def test_db_and_a_database_uri_show_no_secret(canary: str, tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(
        MMOLOVE_SERVER_ID="srv",
        MMOLOVE_REFERRAL_SECRET=canary,
        MMOLOVE_DATABASE_URI="sqlite://",
    )
    exc = raised(lambda: MMOLove(app, db=object()))
    assert isinstance(exc, ConfigurationError)
    assert_no_local_holds(canary, exc)


def test_the_clients_errors_show_no_secret_in_any_frame(canary: str) -> None:
    bad_session = requests.Session()
    bad_session.headers["X-Bad"] = "line\nbreak"
    attempts: list[Callable[[], object]] = [
        lambda: ReferralClient("", canary),
        lambda: ReferralClient("srv", canary.encode()),  # type: ignore[arg-type]
        lambda: ReferralClient("srv", canary, "ftp://nowhere"),
        lambda: ReferralClient("srv", canary, key_id="bad kid"),
        lambda: ReferralClient("srv", canary).sign(BODY, -5),
        lambda: ReferralClient("srv", canary).sign("text"),  # type: ignore[arg-type]
        lambda: ReferralClient("srv", canary, "http://127.0.0.1:9/api").send_body(BODY),
        lambda: ReferralClient("srv", canary, session=bad_session).send_body(BODY),
    ]
    for attempt in attempts:
        assert_no_local_holds(canary, raised(attempt))


def test_the_secret_is_held_wrapped(canary: str, tmp_path: Path) -> None:
    """The settings and the client hold a Secret; it signs as the plain value did."""
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(
        MMOLOVE_SERVER_ID="srv", MMOLOVE_REFERRAL_SECRET=canary, MMOLOVE_DELIVERY="worker"
    )
    MMOLove(app)
    settings = app.extensions["mmolove"].settings
    assert isinstance(settings.secret, Secret)
    assert settings.secret.reveal() == canary
    assert settings.secret == canary
    assert repr(settings.secret) == str(settings.secret) == f"{settings.secret}" == REDACTED
    client = app.extensions["mmolove"].deliverer.client
    assert client.sign(BODY, 1000) == ReferralClient("srv", canary).sign(BODY, 1000)
    assert canary not in repr(vars(client))
    assert Redactor(settings.secret)(f"said {canary}") == f"said {REDACTED}"
    assert not Secret("")
    assert Secret.of("") is None
    assert Secret.of(b"x") is None
