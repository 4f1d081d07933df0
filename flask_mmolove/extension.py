"""The ``MMOLove`` extension: ``init_app`` and the calls a portal makes on it."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from flask import Flask

from . import _portal_db, _request, callbacks
from ._portal_db import PortalDB, SessionSource
from .cli import mmolove_group
from .delivery import process
from .referrals import record_qualification
from .settings import ConfigurationError, load_settings
from .state import EXTENSION_KEY, build_state, get_state


class MMOLove:
    """The MMOLove Referral Kit for a Flask app.

    Create it once, then call :meth:`init_app` from the app factory. Construction
    options apply to every app it is registered on; per-app state lives in
    ``app.extensions["mmolove"]``.

    :param db: the portal's Flask-SQLAlchemy ``SQLAlchemy``: the outbox's tables are
        declared in ``db.metadata`` (the portal's migrations create them) and every
        referral write joins the transaction of ``db.session``, committing with the
        portal's own writes or not at all. Without it the outbox is standalone, in
        ``MMOLOVE_DATABASE_URI``.
    :param session: with plain SQLAlchemy instead of ``db``: the portal's
        ``scoped_session``; give ``metadata`` (its ``MetaData``) with it.
    :param clock: the time source for delivery (tests of backoff inject one); without
        one, the system's, and leases on PostgreSQL follow the database's clock (hosts'
        clocks may be minutes apart).
    :param jitter: returns a float in [0, 1) that spreads retry delays.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        db: Any = None,
        session: SessionSource | None = None,
        metadata: sa.MetaData | None = None,
        clock: Callable[[], float] | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._db = db
        self._session = session
        self._metadata = metadata
        self._clock = clock
        self._jitter = jitter
        if app is not None:
            self.init_app(app)

    def init_app(
        self,
        app: Flask,
        *,
        db: Any = None,
        session: SessionSource | None = None,
        metadata: sa.MetaData | None = None,
    ) -> None:
        """Read the ``MMOLOVE_*`` settings, prepare the outbox and install the hooks.

        ``db``, ``session`` and ``metadata`` as for the constructor, for this app.
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "A 'MMOLove' instance has already been registered on this Flask app. "
                "Import and use that instance instead."
            )
        settings = load_settings(app)
        portal_db = self._portal_db(
            app,
            db if db is not None else self._db,
            session if session is not None else self._session,
            metadata if metadata is not None else self._metadata,
        )
        state = build_state(
            app, settings, portal_db=portal_db, clock=self._clock, jitter=self._jitter
        )
        if state.background is not None:
            process.drain_at_exit(state.background)
        app.extensions[EXTENSION_KEY] = state
        _request.install(app, state)
        if settings.callback_secrets:
            callbacks.install(app, state)
        app.cli.add_command(mmolove_group)

    @staticmethod
    def _portal_db(
        app: Flask, db: Any, session: SessionSource | None, metadata: sa.MetaData | None
    ) -> PortalDB | None:
        if db is None and session is None and metadata is None:
            return None
        if app.config.get("MMOLOVE_DATABASE_URI"):
            raise ConfigurationError(
                "MMOLOVE_DATABASE_URI is set, and so is db= (or session=): with db= the "
                "outbox lives in the portal's own database; remove MMOLOVE_DATABASE_URI"
            )
        if db is not None:
            if session is not None or metadata is not None:
                raise TypeError("give db= (Flask-SQLAlchemy) or session= and metadata=, not both")
            return _portal_db.from_flask_sqlalchemy(app, db)
        if session is None or metadata is None:
            raise TypeError(
                "with plain SQLAlchemy give both session= (the scoped_session) and "
                "metadata= (the MetaData of the portal's tables)"
            )
        return _portal_db.from_session(session, metadata)

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
        if delivery.deliverer.client is not None:
            delivery.deliverer.client.close()
        delivery.outbox.dispose()
