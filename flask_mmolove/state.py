"""The extension's state for one app: what it holds, how it is built, how it is found.

It lives in ``app.extensions["mmolove"]``. Everything that works on an app's behalf (the
request hooks, the referral writes, the CLI, the operator view) reaches it through
:func:`get_state`, never through the :class:`~flask_mmolove.MMOLove` object, so none of
them imports the extension.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import click
from flask import Flask, current_app
from flask.cli import ScriptInfo, run_command
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from . import _portal_db
from ._portal_db import PortalDB
from .client import ReferralClient
from .delivery import BackgroundDelivery, Deliverer
from .outbox import Outbox, make_engine
from .outbox.engine import in_memory
from .settings import ConfigurationError, Settings

logger = logging.getLogger("flask_mmolove")

#: The key of the state in ``app.extensions``.
EXTENSION_KEY = "mmolove"


@dataclass(frozen=True)
class Delivery:
    """The outbox and the means to empty it, present while ``MMOLOVE_ENABLED`` is true."""

    outbox: Outbox
    deliverer: Deliverer
    #: The per-process thread, in ``thread`` delivery mode only.
    background: BackgroundDelivery | None


@dataclass(frozen=True)
class MMOLoveState:
    """Everything the extension keeps for one app."""

    settings: Settings
    #: None when ``MMOLOVE_ENABLED`` is false: capture still runs, nothing is recorded.
    delivery: Delivery | None
    #: The portal's session and metadata when the outbox lives in its transaction
    #: (``db=``); None for a standalone outbox.
    portal_db: PortalDB | None = None

    def __repr__(self) -> str:
        return f"<flask_mmolove state delivery={self.settings.delivery!r}>"

    @property
    def outbox(self) -> Outbox | None:
        return None if self.delivery is None else self.delivery.outbox

    @property
    def deliverer(self) -> Deliverer | None:
        return None if self.delivery is None else self.delivery.deliverer

    @property
    def background(self) -> BackgroundDelivery | None:
        return None if self.delivery is None else self.delivery.background

    def active(self) -> Delivery | None:
        """The delivery side, or None (logged at DEBUG) when the extension is disabled."""
        if self.delivery is None:
            logger.debug("MMOLOVE_ENABLED is false: no referral event is recorded")
        return self.delivery

    def dispatch(self, event_ids: Sequence[int] | None) -> None:
        """Get freshly written (or requeued) events moving, as the delivery mode says.

        The one place that knows what each mode does after a write: the request side,
        the CLI's ``retry`` and the operator view's retry all come here. ``None``:
        whatever is due now.
        """
        if self.delivery is None or (event_ids is not None and not event_ids):
            return
        if self.settings.delivery == "thread" and self.delivery.background is not None:
            self.delivery.background.wake()
        elif self.settings.delivery == "inline":
            ids = None if event_ids is None else list(event_ids)
            try:
                # A token's events go in order: a later one is claimed in the pass after
                # its elder is settled (a registration and its milestone in one request).
                for _ in range(len(ids) if ids else 1):
                    if not self.delivery.deliverer.run_once(ids=ids).claimed:
                        break
            except Exception:
                # The events are safe in the outbox, where `flask mmolove worker` (or
                # `worker --burst` from cron) retries them.
                logger.exception("inline delivery failed; the events stay in the outbox")


def get_state(app: Flask | None = None) -> MMOLoveState:
    """The state of ``app`` (default: the current app), or an error that says what to do."""
    if app is None:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        state: MMOLoveState = app.extensions[EXTENSION_KEY]
    except KeyError:
        raise RuntimeError(
            "flask_mmolove is not set up on this app: create `mmolove = MMOLove()` and call "
            "`mmolove.init_app(app)` in your app factory before handling requests."
        ) from None
    return state


def build_state(
    app: Flask,
    settings: Settings,
    *,
    portal_db: PortalDB | None = None,
    clock: Callable[[], float] | None = None,
    jitter: Callable[[], float] = random.random,
) -> MMOLoveState:
    """The state for ``settings``: the outbox, client and deliverer (with no client,
    and no thread, while delivery is paused for missing credentials).

    A standalone outbox creates its tables; one in the portal's database (``portal_db``)
    leaves them to the portal's migrations, and reaches the database for delivery
    through an engine of its own, tuned for claiming (an in-memory SQLite database
    lives in its one connection: that one is shared).
    """
    if not settings.enabled:
        return MMOLoveState(settings, None, portal_db)
    if portal_db is None:
        engine = _engine(settings.database_uri)
        outbox = Outbox(engine, table_prefix=settings.table_prefix, clock=clock)
        try:
            outbox.create_all(defer_refusal=_building_for_a_command())
        except Exception:
            # Refused (or unreachable): no pooled connection outlives the failed init_app.
            engine.dispose()
            raise
    else:
        url = portal_db.engine.url
        engine = portal_db.engine if in_memory(url) else make_engine(url)
        if engine.dialect.name == "sqlite" and not in_memory(url):
            # The first connection switches the file to WAL: now, before the portal
            # serves anyone, as the switch needs the file to itself.
            with engine.connect():
                pass
        outbox = Outbox(
            engine,
            table_prefix=settings.table_prefix,
            clock=clock,
            metadata=portal_db.metadata,
            create_hint=_portal_db.CREATE_HINT,
        )
    # A --preload master must hand its workers no open connection. (An in-memory SQLite
    # database lives in its one connection: keep that.)
    if not in_memory(engine.url):
        engine.dispose()
    client = None
    if settings.paused:
        # The portal starts and events are kept; only sending waits for the credentials.
        logger.error(
            "%s: referral events are captured and kept in the outbox, and none is sent. "
            "Copy the missing value(s) from MMOLove's Referrals tab into the environment "
            "and restart to send them (or set MMOLOVE_ENABLED = False).",
            settings.paused,
        )
    else:
        client = ReferralClient(
            settings.server_id,
            settings.secret,
            settings.endpoint,
            timeout=settings.timeout,
            key_id=settings.key_id,
        )
    deliverer = Deliverer(
        app,
        outbox,
        client,
        settings,
        clock=clock or time.time,
        jitter=jitter,
        portal_session=None if portal_db is None else portal_db.session,
    )
    # Paused: no thread at all, rather than one that wakes to send nothing.
    thread = settings.delivery == "thread" and client is not None
    background = BackgroundDelivery(deliverer) if thread else None
    return MMOLoveState(settings, Delivery(outbox, deliverer, background), portal_db)


def _engine(uri: str) -> Engine:
    """The outbox engine for ``MMOLOVE_DATABASE_URI``, or an error naming the key."""
    try:
        return make_engine(uri)
    except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ValueError) as exc:
        # Not the URI itself in the message: it may hold a database password.
        raise ConfigurationError(
            "MMOLOVE_DATABASE_URI is not a usable SQLAlchemy URL "
            f"(dialect+driver://user:password@host/database): {exc}"
        ) from None


def _building_for_a_command() -> bool:
    """Whether the ``flask`` command is building the app to run a command that serves
    no request (any but ``flask run``).

    There an outdated outbox refuses its first use rather than ``init_app``: the command
    may be ``flask mmolove db upgrade`` itself, which the ``flask`` command can only find
    once the app is built, or ``flask routes`` and the portal's ``flask db upgrade`` in
    the same deploy step. A WSGI server, ``flask run`` and a test client get the
    refusal from ``init_app``, before any request.
    """
    ctx = click.get_current_context(silent=True)
    return (
        ctx is not None
        and ctx.find_object(ScriptInfo) is not None
        and ctx.command is not run_command
    )
