"""One request's referral work, and the hooks that carry it from capture to commit.

Per request, one :class:`RequestWork` holds what the extension must remember between
the hooks and the view: the cookie to set or clear, the referee named by
``set_referee()``, and the outbox writes waiting for the response. It lives in the
request's WSGI environ, not in ``g``: an app context pushed around several requests
(pytest-flask does that) shares one ``g`` between them. The pending token itself is the
public ``g.mmref``.

A request's writes happen when Flask has its final response (``request_finished``,
after every ``after_request`` hook and the session save), and only if that response is
a 2xx or 3xx: an event caused by a request that failed is never sent. Anywhere a
response will not come (a CLI command, a job, a bare ``test_request_context``, or a
context the test client keeps after its response), a write happens at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Final

from flask import (
    Flask,
    Response,
    after_this_request,
    g,
    has_request_context,
    request,
    request_finished,
)
from sqlalchemy.engine import Connection

from . import capture
from ._portal_db import PortalDB
from .outbox.engine import bounded_waits, request_waits
from .state import MMOLoveState, get_state

logger = logging.getLogger("flask_mmolove")

#: An outbox write, on the connection given (the portal's transaction) or in a
#: transaction of its own (None): returns the id of the event it stored, or None.
Write = Callable[[Connection | None], "int | None"]

_ENVIRON_KEY: Final = "flask_mmolove.request"


class RequestWork:
    """What the extension has to do for one request."""

    __slots__ = (
        "bound",
        "committed",
        "cookie",
        "forgotten",
        "in_portal_transaction",
        "milestones",
        "referee",
        "registering",
        "responding",
        "writes",
    )

    def __init__(self, *, responding: bool) -> None:
        #: A response will come: writes wait for it (False in a bare request context).
        self.responding = responding
        #: ``capture.SET`` or ``capture.CLEAR`` our cookie on the response, or None.
        self.cookie: str | None = None
        #: The identity ``set_referee()`` named, for ``@referral_registered``.
        self.referee: object = None
        #: Writes waiting for the response, each with what to do if it succeeds.
        self.writes: list[tuple[Write, Callable[[], None] | None, str]] = []
        #: The token let go when its account was bound, until the response is final.
        self.forgotten: str | None = None
        #: Referees bound in this request and the token each is bound to, before the
        #: binding is written: a milestone reached in the same request finds it here.
        self.bound: dict[str, str] = {}
        #: This request wrote in the portal's transaction.
        self.in_portal_transaction = False
        #: A ``@referral_registered`` view is running: its referee may be named only
        #: when it returns (``identity=``, Flask-Login).
        self.registering = False
        #: Milestones reached in that view before its referee was named: (identity,
        #: server_event_id), recorded once the registration is.
        self.milestones: list[tuple[str, str | None]] = []
        #: Events of this request the portal has committed: delivery is woken for them
        #: when the response is final.
        self.committed: list[int] = []


def current_work() -> RequestWork | None:
    """The current request's work, or None outside a request."""
    if not has_request_context():
        return None
    work: RequestWork | None = request.environ.get(_ENVIRON_KEY)
    if work is None:
        # A request context no hook ran in (test_request_context): nothing will answer it.
        work = request.environ[_ENVIRON_KEY] = RequestWork(responding=False)
    return work


def write(
    state: MMOLoveState,
    write: Write,
    *,
    then: Callable[[], None] | None = None,
    again: str = "",
) -> None:
    """Run an outbox write: in the portal's transaction at once, or (standalone) with
    the request's successful response, or now when no response will come.

    ``then`` (forgetting the token) runs once the write is known to go ahead: after
    the portal's commit, or with a successful response, early enough to reach the
    session and the cookie. ``again`` is the command that writes it again, for the
    log should a standalone write fail after the response.
    """
    if state.portal_db is not None:
        _write_in_portal_transaction(state, state.portal_db, write, then)
        return
    work = current_work()
    if work is not None and work.responding:
        work.writes.append((write, then, again))
        return
    event_id = write(None)
    if then is not None:
        then()
    state.dispatch([] if event_id is None else [event_id])


def _write_in_portal_transaction(
    state: MMOLoveState, portal_db: PortalDB, write: Write, then: Callable[[], None] | None
) -> None:
    # Outbox trouble is the portal's trouble: a failing write raises into the view,
    # and the portal's transaction does not commit without its event. In a request,
    # a lock held elsewhere fails it after the request's bound, not once the lock is
    # let go; a command or a job waits as the portal's own statements do.
    connection = portal_db.connection()
    work = current_work()
    with (
        nullcontext()
        if work is None
        else bounded_waits(connection, state.settings.request_lock_timeout)
    ):
        event_id = write(connection)
    if work is not None:
        work.in_portal_transaction = True

    def committed() -> None:
        ids = [] if event_id is None else [event_id]
        if work is not None and work.responding:
            if then is not None:
                then()
            # Delivery starts once the response is final, the portal's commit long done.
            work.committed.extend(ids)
        else:
            state.dispatch(ids)

    portal_db.after_commit(committed)


def bounded(state: MMOLoveState, connection: Connection | None) -> AbstractContextManager[None]:
    """A read on the request's path waits at most ``MMOLOVE_REQUEST_LOCK_TIMEOUT`` for a
    lock (on the portal's ``connection``, or the outbox's own transactions); outside a
    request, as the engine's own statements do."""
    if current_work() is None:
        return nullcontext()
    seconds = state.settings.request_lock_timeout
    return request_waits(seconds) if connection is None else bounded_waits(connection, seconds)


def forget_token(state: MMOLoveState, *, committed: bool = False) -> None:
    """The pending token is bound to an account now: drop it, and our cookie.

    ``committed``: its event is committed already, so a request that fails from here
    on does not bring the token back.
    """
    work = current_work()
    if work is not None:
        if not committed:
            work.forgotten = g.get("mmref")
        work.cookie = capture.CLEAR
    capture.forget(state.settings.capture)


def install(app: Flask, state: MMOLoveState) -> None:
    """Connect the request hooks of ``app``: once, in ``init_app``.

    ``before_request`` starts each request's work and joins our ``after_request`` to
    it; ``request_finished`` writes what succeeded.
    """
    settings = state.settings.capture
    background = state.background
    portal_db = state.portal_db

    def before_request() -> None:
        work = request.environ[_ENVIRON_KEY] = RequestWork(responding=True)
        g.mmref = None
        # With neither a query string nor cookies there is no token anywhere, not even
        # in the session (which lives in a cookie too).
        environ = request.environ
        if environ.get("QUERY_STRING") or environ.get("HTTP_COOKIE"):
            found = capture.capture(settings, request)
            if found is not None:
                g.mmref, set_cookie = found
                if set_cookie:
                    work.cookie = capture.SET
        if background is not None:
            background.ensure_running()
        # Per request, so that it runs before every hook of the portal's, blueprint or
        # app: those see the response as we leave it (our cookie set, the token let
        # go), a cache header decided on it included.
        after_this_request(after_request)

    def after_request(response: Response) -> Response:
        work: RequestWork | None = request.environ.get(_ENVIRON_KEY)
        if work is None:
            return response
        failed = response.status_code >= 400
        if (
            not failed
            and work.in_portal_transaction
            and portal_db is not None
            and portal_db.waiting()
        ):
            # The view let the response go with our writes still uncommitted (it
            # committed before set_referee, or the milestone came after its commit):
            # they commit now, or the request fails with them.
            portal_db.commit()
        if work.writes and failed:
            _discard(work, response.status_code)
        elif work.writes:
            for _, then, _ in work.writes:
                if then is not None:
                    then()
        if failed and work.forgotten is not None:
            # Flask runs these hooks again, on its error response, when a later hook
            # raises: the token is forgotten only with a success, so the player who
            # saw an error tries again with it still pending.
            capture.keep(settings, work.forgotten)
            work.forgotten = work.cookie = None
        if work.cookie is not None:
            capture.write_cookie(settings, response, work.cookie, g.get("mmref"))
        return response

    app.before_request(before_request)
    request_finished.connect(_finished, app)


def _finished(sender: Flask, response: Response, **extra: object) -> None:
    """Write a request's events, now that its response is final."""
    work: RequestWork | None = request.environ.get(_ENVIRON_KEY)
    if work is None:
        return
    # Over: a write made from now on, in a context the test client or the debugger
    # keeps, happens at once instead of waiting for a response that has gone.
    work.responding = False
    if work.committed:
        committed, work.committed = work.committed, []
        get_state(sender).dispatch(committed)
    if not work.writes:
        return
    if response.status_code >= 400:
        # The view succeeded, then a later after_request hook or the session save
        # failed and Flask answered with an error instead.
        _discard(work, response.status_code)
        return
    writes, work.writes = work.writes, []
    state = get_state(sender)
    ids = []
    for write_event, _, again in writes:
        try:
            # A request waits for a lock (a migration, VACUUM FULL, another SQLite
            # writer) only so long: past it, the write is lost and logged below.
            with request_waits(state.settings.request_lock_timeout):
                event_id = write_event(None)
        except Exception as exc:
            # The portal's own work is done and answered; failing the request now
            # would tell the player it was not. Say loudly what was lost, and how to
            # write it again. (With db=, the event commits with the portal's work.)
            logger.error(
                "could not write a referral event to the outbox at %s (%s: %s): the "
                "portal's work is committed without it. Once the outbox works, write it "
                "again with: %s",
                state.outbox,
                type(exc).__name__,
                exc,
                again,
                exc_info=True,
            )
            continue
        if event_id is not None:
            ids.append(event_id)
    state.dispatch(ids)


def _discard(work: RequestWork, status: int) -> None:
    logger.info(
        "discarded %d referral event(s): the request failed with %d", len(work.writes), status
    )
    work.writes = []
