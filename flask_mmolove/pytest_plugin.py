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
"""

from __future__ import annotations

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
    ``clock``, ``quiet``); it returns a running server. A ``clock`` makes MMOLove's
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
    """
    return mmolove_sandbox_factory()


@pytest.fixture
def mmolove_client(mmolove_sandbox: SandboxServer) -> Iterator[ReferralClient]:
    """A :class:`~flask_mmolove.ReferralClient` signed for ``mmolove_sandbox``, closed after."""
    with mmolove_sandbox.client() as client:
        yield client
