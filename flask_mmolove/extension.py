"""The ``MMOLove`` extension: ``init_app`` and the calls a portal makes on it."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from flask import Flask

from . import _request
from .cli import mmolove_group
from .delivery import process
from .referrals import record_qualification
from .settings import load_settings
from .state import EXTENSION_KEY, build_state, get_state


class MMOLove:
    """The MMOLove Referral Kit for a Flask app.

    Create it once, then call :meth:`init_app` from the app factory. Construction
    options apply to every app it is registered on; per-app state lives in
    ``app.extensions["mmolove"]``.

    :param clock: the time source for delivery (tests of backoff inject one).
    :param jitter: returns a float in [0, 1) that spreads retry delays.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._clock = clock
        self._jitter = jitter
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the ``MMOLOVE_*`` settings, prepare the outbox and install the hooks."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "A 'MMOLove' instance has already been registered on this Flask app. "
                "Import and use that instance instead."
            )
        settings = load_settings(app)
        state = build_state(app, settings, clock=self._clock, jitter=self._jitter)
        if state.background is not None:
            process.drain_at_exit(state.background)
        app.extensions[EXTENSION_KEY] = state
        _request.install(app, state)
        app.cli.add_command(mmolove_group)

    def qualify(
        self,
        identity: object,
        *,
        token: str | None = None,
        server_event_id: str | None = None,
    ) -> bool:
        """What ``player_qualified.send(app, identity=...)`` does, as a call."""
        return record_qualification(identity, token=token, server_event_id=server_event_id)

    def deliver_now(self, app: Flask | None = None) -> int:
        """Run one delivery pass in this thread; returns how many events it claimed."""
        delivery = get_state(app).active()
        return 0 if delivery is None else delivery.deliverer.run_once().claimed

    def shutdown(self, app: Flask | None = None, *, drain: float = 0.0) -> None:
        """Stop this app's delivery thread and close its connections (tests, reloads)."""
        delivery = get_state(app).delivery
        if delivery is None:
            return
        if delivery.background is not None:
            delivery.background.stop(drain=drain)
            process.forget(delivery.background)
        delivery.deliverer.client.close()
        delivery.outbox.dispose()
