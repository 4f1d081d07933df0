"""Every ``MMOLOVE_*`` configuration key: its default, and its validation.

Read once, in ``init_app``, into a frozen :class:`Settings`. A bad value fails there,
with a message that names the key and says what to put in it. Missing credentials do
not: the portal starts (image builds, CI, ``flask db upgrade``), events are kept, and
delivery waits for them (:attr:`Settings.paused`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from flask import Flask

from .capture import CaptureSettings
from .outbox.schema import check_table_prefix
from .protocol import DEFAULT_ENDPOINT, check_endpoint, check_key_id
from .redaction import Secret

DELIVERY_MODES: Final = ("thread", "worker", "inline")
#: The keys delivery needs, and nothing else does.
CREDENTIALS: Final = ("MMOLOVE_SERVER_ID", "MMOLOVE_REFERRAL_SECRET")
#: What events written while ``MMOLOVE_SERVER_ID`` is unset carry in its place; the
#: deliverer sends each body with the server id in force then, so this never leaves.
UNSET_SERVER_ID: Final = "(MMOLOVE_SERVER_ID not set)"
_NINETY_DAYS: Final = 90 * 24 * 3600

#: key -> default. ``None`` for the server id and secret means "from the environment".
DEFAULTS: Final[dict[str, Any]] = {
    "MMOLOVE_ENABLED": True,
    "MMOLOVE_SERVER_ID": None,
    "MMOLOVE_REFERRAL_SECRET": None,
    "MMOLOVE_KEY_ID": None,
    "MMOLOVE_ENDPOINT": None,
    "MMOLOVE_DATABASE_URI": None,
    "MMOLOVE_TABLE_PREFIX": "mmolove_",
    "MMOLOVE_DELIVERY": "thread",
    "MMOLOVE_TEST_MODE": False,
    "MMOLOVE_CONNECT_TIMEOUT": 5.0,
    "MMOLOVE_READ_TIMEOUT": 10.0,
    "MMOLOVE_RETRY_BASE": 1.0,
    "MMOLOVE_RETRY_CAP": 300.0,
    "MMOLOVE_SLOW_RETRY": 900.0,
    "MMOLOVE_MAX_AGE": 7 * 24 * 3600.0,
    "MMOLOVE_LEASE": 60.0,
    "MMOLOVE_BATCH_SIZE": 50,
    "MMOLOVE_CONCURRENCY": 4,
    "MMOLOVE_POLL_INTERVAL": 5.0,
    "MMOLOVE_DRAIN_TIMEOUT": 5.0,
    "MMOLOVE_REQUEST_LOCK_TIMEOUT": 5.0,
    "MMOLOVE_FIRST_TOUCH": True,
    "MMOLOVE_COOKIE_NAME": "mmref",
    "MMOLOVE_COOKIE_MAX_AGE": _NINETY_DAYS,
    "MMOLOVE_COOKIE_SECURE": None,
    "MMOLOVE_COOKIE_DOMAIN": None,
    "MMOLOVE_SESSION_KEY": "mmolove_mmref",
    "MMOLOVE_CALLBACK_SECRET": None,
    "MMOLOVE_CALLBACK_URL": "/mmolove/callback",
    "MMOLOVE_CALLBACK_LEGACY_GET": False,
}


class ConfigurationError(ValueError):
    """A ``MMOLOVE_*`` setting is missing or wrong; the message names the key."""


@dataclass(frozen=True)
class Settings:
    enabled: bool
    server_id: str
    #: Wrapped, so that no repr or traceback shows it; ``.reveal()`` to sign.
    secret: Secret = field(repr=False)
    key_id: str | None
    endpoint: str
    database_uri: str = field(repr=False)
    table_prefix: str
    delivery: str
    test_mode: bool
    timeout: tuple[float, float]
    retry_base: float
    retry_cap: float
    slow_retry: float
    max_age: float
    lease: float
    batch_size: int
    concurrency: int
    poll_interval: float
    drain_timeout: float
    #: How long each of the extension's statements on a request's path may wait for a
    #: database lock, in seconds (PostgreSQL's lock and statement timeouts, SQLite's
    #: busy timeout); delivery keeps the engine's own waits.
    request_lock_timeout: float
    capture: CaptureSettings
    #: MMOLove's reward-callback secrets (several during a rotation); none: the
    #: callback endpoint is not served.
    callback_secrets: tuple[Secret, ...] = field(default=(), repr=False)
    callback_url: str = "/mmolove/callback"
    callback_legacy_get: bool = False
    #: The keys of :data:`CREDENTIALS` not set while enabled: nothing is sent until
    #: a restart with them. (``server_id`` is then :data:`UNSET_SERVER_ID`.)
    missing: tuple[str, ...] = ()

    @property
    def paused(self) -> str | None:
        """Why delivery is paused ("delivery is paused: ... not set"), or None."""
        if not self.missing:
            return None
        verb = "is" if len(self.missing) == 1 else "are"
        return f"delivery is paused: {' and '.join(self.missing)} {verb} not set"


class _Config(Mapping[str, Any]):
    """``app.config`` as the checks below read it, under a repr that shows no value.

    ``app.config`` holds the secret as the portal set it: a frame local holding it
    would show it to any traceback tool that prints locals (``pytest -l``, Sentry).
    """

    __slots__ = ("_config",)

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._config = config

    def __getitem__(self, key: str) -> Any:
        return self._config[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._config)

    def __len__(self) -> int:
        return len(self._config)

    def __repr__(self) -> str:
        return "<app.config>"


def _secret(config: Mapping[str, Any]) -> Secret | None:
    """``MMOLOVE_REFERRAL_SECRET`` (or its environment variable), wrapped; never stripped:
    it is the exact HMAC key. No frame of a failure here holds its value."""
    key = "MMOLOVE_REFERRAL_SECRET"
    if config[key] is None and not os.environ.get(key):
        return None
    if config[key] is None:
        return Secret(os.environ[key])
    if not isinstance(config[key], str):
        raise ConfigurationError(f"{key} must be a string, got {type(config[key]).__name__}")
    return Secret(config[key]) if config[key] else None


def _callback_secrets(config: Mapping[str, Any]) -> tuple[Secret, ...]:
    """``MMOLOVE_CALLBACK_SECRET`` (or its environment variable): one secret, or a list
    of them while a rotation is deployed; each wrapped, never stripped. As for the
    referral secret, no frame of a failure here holds a value."""
    key = "MMOLOVE_CALLBACK_SECRET"
    if config[key] is None:
        return (Secret(os.environ[key]),) if os.environ.get(key) else ()
    if isinstance(config[key], str) and config[key]:
        return (Secret(config[key]),)
    if (
        isinstance(config[key], list | tuple)
        and config[key]
        and all(isinstance(v, str) and v for v in config[key])
    ):
        return tuple(Secret(v) for v in config[key])
    raise ConfigurationError(
        f"{key} must be the callback secret from MMOLove's Integration tab (a non-empty "
        "string), or a list of them while a rotation is deployed"
    )


def _number(config: Mapping[str, Any], key: str, *, minimum: float = 0.0) -> float:
    value = config[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= minimum
    ):
        raise ConfigurationError(
            f"{key} must be a finite number greater than {minimum:g}, got {value!r}"
        )
    return float(value)


def _seconds_or_zero(config: Mapping[str, Any], key: str) -> float:
    value = config[key]
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return 0.0
    return _number(config, key)


def _flag(config: Mapping[str, Any], key: str) -> bool:
    # bool("false") is True: a flag from an environment variable must fail, not flip.
    value = config[key]
    if not isinstance(value, bool):
        raise ConfigurationError(f"{key} must be True or False, got {value!r}")
    return value


def _whole(config: Mapping[str, Any], key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{key} must be a whole number of at least 1, got {value!r}")
    return value


def _text(config: Mapping[str, Any], key: str, env: str | None = None) -> str | None:
    value = config[key]
    if value is None and env is not None:
        value = os.environ.get(env)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigurationError(f"{key} must be a string, got {type(value).__name__}")
    return value.strip() or None


def _checked(key: str, check: Callable[[Any], str], value: object) -> str:
    """``check(value)``, its ValueError told as a ConfigurationError naming ``key``."""
    try:
        return check(value)
    except ValueError as exc:
        raise ConfigurationError(f"{key}: {exc}") from None


def load_settings(app: Flask) -> Settings:
    """Set every default on ``app.config``, then read and check the whole set."""
    for key, default in DEFAULTS.items():
        app.config.setdefault(key, default)
    config = _Config(app.config)

    enabled = _flag(config, "MMOLOVE_ENABLED")
    server_id = _text(config, "MMOLOVE_SERVER_ID", "MMOLOVE_SERVER_ID")
    secret = _secret(config)
    # Missing credentials are not an error here: the portal must start without them
    # (image builds, CI, migrations); delivery waits for them (state.build_state).
    given = {"MMOLOVE_SERVER_ID": server_id, "MMOLOVE_REFERRAL_SECRET": secret}
    missing = tuple(key for key in CREDENTIALS if not given[key]) if enabled else ()
    if enabled and not server_id:
        server_id = UNSET_SERVER_ID

    endpoint = _checked(
        "MMOLOVE_ENDPOINT",
        check_endpoint,
        _text(config, "MMOLOVE_ENDPOINT", "MMOLOVE_ENDPOINT") or DEFAULT_ENDPOINT,
    )

    delivery = config["MMOLOVE_DELIVERY"]
    if delivery not in DELIVERY_MODES:
        raise ConfigurationError(
            f"MMOLOVE_DELIVERY must be one of {', '.join(DELIVERY_MODES)}, got {delivery!r}"
        )

    database_uri = _text(config, "MMOLOVE_DATABASE_URI") or (
        "sqlite:///" + os.path.join(app.instance_path, "mmolove.sqlite3")
    )
    table_prefix = _checked(
        "MMOLOVE_TABLE_PREFIX", check_table_prefix, config["MMOLOVE_TABLE_PREFIX"]
    )
    if not table_prefix.strip("_"):
        # Bare "events", "bindings" and "credits" would be taken for the portal's own.
        raise ConfigurationError(
            "MMOLOVE_TABLE_PREFIX must contain a letter or digit, such as 'mmolove_'"
        )

    key_id = _text(config, "MMOLOVE_KEY_ID")
    if key_id is not None:
        key_id = _checked("MMOLOVE_KEY_ID", check_key_id, key_id)
    cookie_max_age = _whole(config, "MMOLOVE_COOKIE_MAX_AGE")
    if cookie_max_age > _NINETY_DAYS:
        raise ConfigurationError(
            f"MMOLOVE_COOKIE_MAX_AGE must not outlive the token's 90 days "
            f"({_NINETY_DAYS} s), got {cookie_max_age}"
        )
    cookie_secure = config["MMOLOVE_COOKIE_SECURE"]
    if cookie_secure is not None and not isinstance(cookie_secure, bool):
        raise ConfigurationError(
            "MMOLOVE_COOKIE_SECURE must be True, False or None (None: Secure on https)"
        )
    cookie_name = _text(config, "MMOLOVE_COOKIE_NAME")
    session_key = _text(config, "MMOLOVE_SESSION_KEY")
    if not cookie_name or not session_key:
        raise ConfigurationError("MMOLOVE_COOKIE_NAME and MMOLOVE_SESSION_KEY must be non-empty")

    timeout = (
        _number(config, "MMOLOVE_CONNECT_TIMEOUT"),
        _number(config, "MMOLOVE_READ_TIMEOUT"),
    )
    lease = _number(config, "MMOLOVE_LEASE")
    if lease <= sum(timeout):
        # A claim that can expire while its attempt still runs lets a second
        # deliverer send the same event at the same time.
        raise ConfigurationError(
            f"MMOLOVE_LEASE ({lease:g} s) must be longer than an attempt's deadline, "
            f"MMOLOVE_CONNECT_TIMEOUT + MMOLOVE_READ_TIMEOUT ({sum(timeout):g} s)"
        )

    return Settings(
        enabled=enabled,
        server_id=server_id or "",
        secret=secret or Secret(""),
        key_id=key_id,
        endpoint=endpoint,
        database_uri=database_uri,
        table_prefix=table_prefix,
        delivery=delivery,
        test_mode=_flag(config, "MMOLOVE_TEST_MODE"),
        timeout=timeout,
        retry_base=_number(config, "MMOLOVE_RETRY_BASE"),
        retry_cap=_number(config, "MMOLOVE_RETRY_CAP"),
        slow_retry=_number(config, "MMOLOVE_SLOW_RETRY"),
        max_age=_number(config, "MMOLOVE_MAX_AGE"),
        lease=lease,
        batch_size=_whole(config, "MMOLOVE_BATCH_SIZE"),
        concurrency=_whole(config, "MMOLOVE_CONCURRENCY"),
        poll_interval=_number(config, "MMOLOVE_POLL_INTERVAL"),
        drain_timeout=_seconds_or_zero(config, "MMOLOVE_DRAIN_TIMEOUT"),
        request_lock_timeout=_number(config, "MMOLOVE_REQUEST_LOCK_TIMEOUT"),
        capture=CaptureSettings(
            cookie_name=cookie_name,
            cookie_max_age=cookie_max_age,
            cookie_secure=cookie_secure,
            cookie_domain=_text(config, "MMOLOVE_COOKIE_DOMAIN"),
            session_key=session_key,
            first_touch=_flag(config, "MMOLOVE_FIRST_TOUCH"),
        ),
        callback_secrets=_callback_secrets(config),
        callback_url=_callback_url(config),
        callback_legacy_get=_flag(config, "MMOLOVE_CALLBACK_LEGACY_GET"),
        missing=missing,
    )


def _callback_url(config: Mapping[str, Any]) -> str:
    url = config["MMOLOVE_CALLBACK_URL"]
    if not isinstance(url, str) or not url.startswith("/") or url.startswith("//"):
        raise ConfigurationError(
            f"MMOLOVE_CALLBACK_URL must be a path on this site, such as "
            f"'/mmolove/callback', got {url!r}"
        )
    return url
