"""The ``MMOLove`` extension: configuration, per-app state and the request hooks."""

from __future__ import annotations

import atexit
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from flask import (
    Flask,
    Request,
    Response,
    after_this_request,
    current_app,
    g,
    has_request_context,
    request,
    request_finished,
)
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from . import capture
from .client import ReferralClient
from .delivery import BackgroundDelivery, Deliverer
from .outbox import SERVER_EVENT_ID_MAX, Outbox, make_engine
from .protocol import build_body
from .settings import ConfigurationError, Settings, load_settings

logger = logging.getLogger("flask_mmolove")

EXTENSION_KEY = "mmolove"
#: The longest referee identity: its event ids ("reg-<identity>", "qual-<identity>")
#: must fit the outbox's server_event_id column, or the event could not be stored.
MAX_IDENTITY_LENGTH = SERVER_EVENT_ID_MAX - len("qual-")


class _CommitPoint:
    """Writes a request's events once its response is final, listening only then.

    Flask's ``request_finished`` comes after every ``after_request`` hook and the
    session save: the first moment a response is known to be the one the player gets.
    A receiver connected for good would cost every request of the portal blinker's
    dispatch (about a microsecond, as much as the rest of the extension together), so
    the first request with events to write connects it and the last one disconnects
    it. Requests are held weakly: one that never reaches ``request_finished`` (Flask
    failed even to answer its error, and its events are rightly dropped) leaves the
    set when it is collected, and the receiver still goes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: weakref.WeakSet[Request] = weakref.WeakSet()

    def expect(self, app: Flask, req: Request) -> None:
        """``req`` has events to write when it finishes."""
        with self._lock:
            if not self._waiting:
                request_finished.connect(self._finished, app, weak=False)
            self._waiting.add(req)

    def _finished(self, sender: Flask, response: Response, **extra: object) -> None:
        req: Request = request._get_current_object()  # type: ignore[attr-defined]
        # Over: a write made from now on, in a context the test client or the debugger
        # keeps, happens at once instead of waiting for a response that has gone.
        req.environ.pop(_DISPATCHING, None)
        writes: list[Callable[[], int | None]] | None = g.pop("_mmolove_commit", None)
        with self._lock:
            self._waiting.discard(req)
            if not self._waiting:
                # From every sender, which is to say from this app: the receiver is
                # this object's own, so blinker forgets it entirely.
                request_finished.disconnect(self._finished)
        if writes:
            _commit(sender, response, writes)


@dataclass
class _State:
    """Everything the extension keeps for one app, in ``app.extensions["mmolove"]``."""

    settings: Settings
    #: None when ``MMOLOVE_ENABLED`` is false: capture still runs, nothing is sent.
    outbox: Outbox | None
    deliverer: Deliverer | None
    #: The per-process thread, in ``thread`` delivery mode only.
    background: BackgroundDelivery | None
    commit_point: _CommitPoint = field(default_factory=_CommitPoint)

    def __repr__(self) -> str:
        return f"<flask_mmolove state delivery={self.settings.delivery!r}>"


def _get_state(app: Flask | None = None) -> _State:
    """The state of ``app`` (default: the current app), or an error that says what to do."""
    if app is None:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        state: _State = app.extensions[EXTENSION_KEY]
    except KeyError:
        raise RuntimeError(
            "flask_mmolove is not set up on this app: create `mmolove = MMOLove()` and call "
            "`mmolove.init_app(app)` in your app factory before handling requests."
        ) from None
    return state


def _active_state(app: Flask | None = None) -> tuple[_State, Outbox, Deliverer] | None:
    state = _get_state(app)
    if state.outbox is None or state.deliverer is None:
        logger.debug("MMOLOVE_ENABLED is false: no referral event is recorded")
        return None
    return state, state.outbox, state.deliverer


def normalize_identity(identity: object) -> str | None:
    """The referee identity as MMOLove receives it, or None when it cannot be one."""
    if identity is None or isinstance(identity, bool):
        return None
    text = str(identity).strip()
    if not text or len(text) > MAX_IDENTITY_LENGTH or not text.isprintable():
        return None
    return text


def dispatch_events(state: _State, event_ids: list[int] | None) -> None:
    """Get freshly written (or requeued) events moving, as the delivery mode says.

    The one place that knows what each mode does after a write: the request hooks, the
    CLI's ``retry`` and the dashboard's retry all go through it. ``None``: whatever is
    due now.
    """
    if event_ids == [] or state.deliverer is None:
        return
    if state.settings.delivery == "thread" and state.background is not None:
        state.background.wake()
    elif state.settings.delivery == "inline":
        try:
            state.deliverer.run_once(ids=event_ids)
        except Exception:
            # The events are safe in the outbox, where `flask mmolove worker` (or
            # `worker --burst` from cron) retries them.
            logger.exception("inline delivery failed; the events stay in the outbox")


def _write(
    state: _State,
    write: Callable[[], int | None],
    *,
    then: Callable[[], None] | None = None,
) -> None:
    """Run an outbox write now, or with the request's response if there is one.

    Inside a request being dispatched the write waits for the response and happens
    only if the request succeeded: its response is a 2xx or 3xx and went through every
    ``after_request`` hook and the session save (Flask's ``request_finished``). An
    event caused by a request that failed is never sent. Anywhere else (a CLI command,
    a job, a bare ``test_request_context`` that no response will ever close) it
    happens at once. ``then`` (forgetting the token) runs when the response is known
    to be a success, early enough to reach the session and the cookie.
    """
    if has_request_context() and _DISPATCHING in request.environ:
        g.setdefault("_mmolove_writes", []).append((write, then))
        _after_this_response()
        return
    event_id = write()
    if then is not None:
        then()
    dispatch_events(state, [event_id] if event_id is not None else [])


# Marks in the request's environ, not in ``g``: an app context pushed around several
# requests (pytest-flask does) shares one ``g`` between them.
#: The request is being dispatched: a response will come (not a bare
#: ``test_request_context``).
_DISPATCHING = "flask_mmolove.dispatching"
#: ``_after_request`` has joined the request.
_AFTER = "flask_mmolove.after_request"
#: Werkzeug's key for "this request's contexts are kept after the response".
_PRESERVE = "werkzeug.debug.preserve_context"


def _before_request_hook(state: _State) -> Callable[[], None]:
    """The per-request hook of one app, bound to its state.

    It runs on every request of the portal, so it does as little as it can: no state
    lookup, and ``_after_request`` joins the request only when there is something to
    do (a cookie to set or clear, events to write).
    """
    settings = state.settings.capture
    background = state.background

    def before_request() -> None:
        # The proxies' attribute lookups cost more than the rest of the hook: each
        # object is resolved once.
        ctx_g = g._get_current_object()
        ctx_g.mmref = None
        req = request._get_current_object()  # type: ignore[attr-defined]
        environ = req.environ
        environ[_DISPATCHING] = True
        if _PRESERVE in environ:
            # Only in tests (`with client:`) and the debugger: the mark must go when
            # the request finishes, which needs the commit point's receiver.
            state.commit_point.expect(current_app._get_current_object(), req)  # type: ignore[attr-defined]
        if (environ.get("QUERY_STRING") or environ.get("HTTP_COOKIE")) and capture.capture(
            settings, ctx_g, req
        ):
            _after_this_response()
        if background is not None and not background.started:
            background.ensure_running()

    return before_request


def _after_this_response() -> None:
    """Run ``_after_request`` for the current request, once."""
    environ = request.environ
    if _AFTER not in environ:
        environ[_AFTER] = True
        after_this_request(_after_request)


def _after_request(response: Response) -> Response:
    state = _get_state()
    writes: list[tuple[Callable[[], int | None], Callable[[], None] | None]] | None = g.pop(
        "_mmolove_writes", None
    )
    if writes:
        if response.status_code < 400:
            for _, then in writes:
                if then is not None:
                    then()
            # Written when the request finishes: a later hook or the session save
            # can still fail it.
            g._mmolove_commit = [write for write, _ in writes]
            state.commit_point.expect(
                current_app._get_current_object(),  # type: ignore[attr-defined]
                request._get_current_object(),  # type: ignore[attr-defined]
            )
        else:
            _discarded(len(writes), response.status_code)
    capture.write_cookie(state.settings.capture, response)
    return response


def _discarded(count: int, status: int) -> None:
    logger.info("discarded %d referral event(s): the request failed with %d", count, status)


def _commit(app: Flask, response: Response, writes: list[Callable[[], int | None]]) -> None:
    """Write a successful request's events, now that its response is final."""
    if response.status_code >= 400:
        # The view succeeded, then a later after_request hook or the session save
        # failed and Flask answered with an error instead.
        _discarded(len(writes), response.status_code)
        return
    state = _get_state(app)
    ids = []
    for write in writes:
        try:
            event_id = write()
        except Exception:
            # The portal's own work is done and answered; failing the request
            # now would tell the player it was not. Say loudly what was lost.
            logger.exception(
                "could not write a referral event to the outbox at %s; the "
                "event is lost unless the request's work is repeated",
                state.outbox,
            )
            continue
        if event_id is not None:
            ids.append(event_id)
    dispatch_events(state, ids)


def record_registration(identity: object, *, app: Flask | None = None) -> bool:
    """Bind the pending token to ``identity`` and enqueue ``registered``.

    Returns False (and keeps the token pending) when there is nothing to do yet.
    """
    active = _active_state(app)
    token = g.get("mmref")
    if active is None or token is None:
        return False
    state, outbox, _ = active
    referee = normalize_identity(identity)
    if referee is None:
        logger.warning(
            "a referee identity must be 1-%d printable characters; got %r. The mmref "
            "token stays pending.",
            MAX_IDENTITY_LENGTH,
            type(identity).__name__,
        )
        return False
    body = build_body(
        "registered",
        token=token,
        server_id=state.settings.server_id,
        server_event_id=f"reg-{referee}",
        referee_identity=referee,
        test=state.settings.test_mode,
    )

    def write() -> int | None:
        bound, event_id = outbox.bind_and_enqueue(
            identity=referee,
            token=token,
            event="registered",
            server_event_id=f"reg-{referee}",
            body=body,
        )
        if bound != token:
            logger.info(
                "referee %r was already bound to an earlier mmref; first touch keeps it",
                referee,
            )
        return event_id

    _write(state, write, then=lambda: capture.forget(state.settings.capture))
    return True


def record_qualification(
    identity: object,
    *,
    token: str | None = None,
    server_event_id: str | None = None,
    app: Flask | None = None,
) -> bool:
    """Enqueue ``qualified`` for a referred player; False if the player was not referred."""
    active = _active_state(app)
    if active is None:
        return False
    state, outbox, _ = active
    referee = normalize_identity(identity)
    if referee is None:
        raise ValueError(
            f"identity must be the referee's stable id (1-{MAX_IDENTITY_LENGTH} printable "
            f"characters), as given to set_referee(); got {type(identity).__name__}"
        )
    bound = token if token is not None else outbox.token_for(referee)
    if bound is None:
        logger.debug("player %r reached the milestone but was not referred", referee)
        return False
    event_id = server_event_id or f"qual-{referee}"
    body = build_body(
        "qualified",
        token=bound,
        server_id=state.settings.server_id,
        server_event_id=event_id,
        test=state.settings.test_mode,
    )

    def write() -> int | None:
        return outbox.enqueue(
            event="qualified",
            token=bound,
            identity=referee,
            server_event_id=event_id,
            body=body,
        )

    _write(state, write)
    return True


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


def _in_memory(engine: Engine) -> bool:
    url = engine.url
    return url.get_backend_name() == "sqlite" and (
        url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    )


_processes_to_drain: weakref.WeakSet[BackgroundDelivery] = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    for background in list(_processes_to_drain):
        background.stop(drain=background.deliverer.settings.drain_timeout)


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
        outbox = deliverer = background = None
        if settings.enabled:
            engine = _engine(settings.database_uri)
            try:
                outbox = Outbox(engine, table_prefix=settings.table_prefix, clock=self._clock)
            except ValueError as exc:
                engine.dispose()
                raise ConfigurationError(f"MMOLOVE_TABLE_PREFIX: {exc}") from None
            outbox.create_all()
            # A --preload master must hand its workers no open connection. (An
            # in-memory SQLite database lives in its one connection: keep that.)
            if not _in_memory(engine):
                engine.dispose()
            client = ReferralClient(
                settings.server_id,
                settings.secret,
                settings.endpoint,
                timeout=settings.timeout,
                key_id=settings.key_id,
            )
            deliverer = Deliverer(
                app, outbox, client, settings, clock=self._clock, jitter=self._jitter
            )
            if settings.delivery == "thread":
                background = BackgroundDelivery(deliverer)
                _processes_to_drain.add(background)
        app.extensions[EXTENSION_KEY] = _State(settings, outbox, deliverer, background)
        app.before_request(_before_request_hook(app.extensions[EXTENSION_KEY]))
        # cli.py is built on this module, so it is imported here, not at the top.
        from .cli import mmolove_group

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
        active = _active_state(app)
        return 0 if active is None else active[2].run_once().claimed

    def shutdown(self, app: Flask | None = None, *, drain: float = 0.0) -> None:
        """Stop this app's delivery thread and close its connections (tests, reloads)."""
        state = _get_state(app)
        if state.background is not None:
            state.background.stop(drain=drain)
            _processes_to_drain.discard(state.background)
        if state.deliverer is not None:
            state.deliverer.close()
            state.deliverer.client.close()
        if state.outbox is not None:
            state.outbox.dispose()
