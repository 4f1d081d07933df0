"""pytest fixtures for testing a portal against a live MMOLove sandbox.

Installed with flask-mmolove as the ``mmolove`` plugin (a ``pytest11`` entry point),
so the fixtures are available in every test suite without a conftest import. None is
autouse: a test gets a sandbox only by asking for one. Disable the plugin with
``-p no:mmolove``.

Each sandbox is a real HTTP server on a free 127.0.0.1 port with a fresh random
secret and server id, stopped when the test ends::

    def test_registration_reaches_mmolove(app, mmolove_sandbox):
        app.config.update(
            MMOLOVE_ENDPOINT=mmolove_sandbox.endpoint,
            MMOLOVE_SERVER_ID=mmolove_sandbox.server_id,
            MMOLOVE_REFERRAL_SECRET=mmolove_sandbox.secret,
        )
        token = mmolove_sandbox.mint_token("friend")
        ...  # register a player who arrived with ?mmref=<token>
        assert mmolove_sandbox.accepted_count("registered") == 1

The sandbox also plays MMOLove's side of reward callbacks (votes):
``send_heart(username)`` POSTs a signed ``heart.counted`` to the portal's callback URL
and retries it on MMOLove's schedule, compressed by ``retry_scale``; every attempt is in
``callback_log``. Point it at a portal served on a real socket::

    def test_vote_is_received(mmolove_sandbox):
        mmolove_sandbox.configure_callbacks(
            "http://127.0.0.1:5000/mmolove/callback", secret=PORTAL_CALLBACK_SECRET,
            retry_scale=0.001,
        )
        delivery = mmolove_sandbox.send_heart("alice", streak_day=3)
        assert delivery.wait(10) and delivery.delivered

or, with pytest-flask's ``live_server``, ask for ``mmolove_live_callbacks``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .client import ReferralClient
    from .sandbox import SandboxServer

# The sandbox (Flask, werkzeug) is imported inside the fixtures: this module is loaded
# into every pytest run of every project that installs flask-mmolove, and should cost
# nothing to runs that never ask for a sandbox.


@pytest.fixture
def mmolove_sandbox_factory() -> Iterator[Callable[..., SandboxServer]]:
    """Start sandboxes with custom settings; all are stopped when the test ends.

    Call it with the keyword arguments of :class:`flask_mmolove.sandbox.SandboxServer`
    (``secret``, ``server_id``, ``registration_url``, ``token_key``, ``tolerance``,
    ``clock``, ``quiet``; for reward callbacks ``callback_url``, ``callback_secret``,
    ``callback_legacy_get``, ``retry_scale``, ``callback_timeout``); it returns a
    running server. A ``clock`` makes MMOLove's
    time controllable, for replay-window and token-expiry tests::

        def test_stale(mmolove_sandbox_factory):
            now = [1_700_000_000.0]
            sandbox = mmolove_sandbox_factory(clock=lambda: now[0])
    """
    from .sandbox import SandboxServer

    started: list[SandboxServer] = []

    def start(**kwargs: Any) -> SandboxServer:
        server = SandboxServer(**kwargs)
        started.append(server.start())
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture
def mmolove_sandbox(
    mmolove_sandbox_factory: Callable[..., SandboxServer],
) -> SandboxServer:
    """A running MMOLove sandbox with a random secret and server id, for one test.

    Point the portal at ``.endpoint`` with ``.server_id`` and ``.secret``; mint
    tokens with ``.mint_token(code)`` or follow ``.share_link(code)``; inspect
    ``.events`` (every request, with verdict and raw body), ``.referrals``,
    ``.accepted_count(event)`` and ``.accepted_posts(token, event)``; script failures
    with ``.fail_next()``, ``.delay_next()`` and ``.drop_next(after_commit=...)``.
    Reward callbacks: ``.configure_callbacks(url, secret=..., retry_scale=...)``,
    ``.send_heart(username)``, ``.send_test_callback()``, ``.callback_log``.
    """
    return mmolove_sandbox_factory()


@pytest.fixture
def mmolove_client(mmolove_sandbox: SandboxServer) -> Iterator[ReferralClient]:
    """A :class:`~flask_mmolove.ReferralClient` signed for ``mmolove_sandbox``, closed after."""
    with mmolove_sandbox.client() as client:
        yield client


#: Where the portal serves MMOLove's callbacks unless MMOLOVE_CALLBACK_URL says otherwise.
_CALLBACK_PATH = "/mmolove/callback"
#: MMOLove's retry delays for tests: a minute becomes 60 ms, six hours 21.6 s.
_TEST_RETRY_SCALE = 0.001


@pytest.fixture
def mmolove_live_callbacks(
    request: pytest.FixtureRequest, mmolove_sandbox_factory: Callable[..., SandboxServer]
) -> SandboxServer:
    """A running sandbox whose reward callbacks go to pytest-flask's ``live_server``.

    They go to the ``app`` fixture's ``MMOLOVE_CALLBACK_URL`` (default
    ``/mmolove/callback``) on the live server, signed with its
    ``MMOLOVE_CALLBACK_SECRET`` (the first of a list; else the environment's), with
    MMOLove's retry delays a thousand times shorter (``retry_scale=0.001``)::

        def test_a_vote_is_granted(mmolove_live_callbacks):
            delivery = mmolove_live_callbacks.send_heart("alice")
            assert delivery.wait(10) and delivery.delivered

    Change any of it with ``.configure_callbacks(...)``.
    """
    try:
        # First, so the live server's process is forked before the sandbox's threads.
        live_server = request.getfixturevalue("live_server")
        app = request.getfixturevalue("app")
    except pytest.FixtureLookupError:
        pytest.fail(
            "mmolove_live_callbacks needs pytest-flask's live_server and an app fixture; "
            "else use mmolove_sandbox.configure_callbacks(url, secret=...)"
        )
    configured = app.config.get("MMOLOVE_CALLBACK_SECRET") or os.environ.get(
        "MMOLOVE_CALLBACK_SECRET"
    )
    secret = configured if isinstance(configured, str) else next(iter(configured or ()), None)
    if not isinstance(secret, str) or not secret:
        pytest.fail("set the app's MMOLOVE_CALLBACK_SECRET: the live server verifies with it")
    target = app.config.get("MMOLOVE_CALLBACK_URL") or _CALLBACK_PATH
    url = target if "://" in target else live_server.url(target)
    return mmolove_sandbox_factory(
        callback_url=url, callback_secret=secret, retry_scale=_TEST_RETRY_SCALE
    )
