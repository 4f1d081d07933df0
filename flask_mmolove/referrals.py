"""What the portal's own code calls: the registration decorator, ``set_referee`` and the
milestone, and the outbox writes they make (``registered`` and ``qualified``)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar, overload

from flask import Flask, Response, current_app, g, has_app_context, make_response, request
from flask.typing import ResponseReturnValue
from sqlalchemy.engine import Connection

from . import _request
from .outbox import SERVER_EVENT_ID_MAX
from .protocol import build_body
from .signals import player_qualified
from .state import EXTENSION_KEY, get_state

logger = logging.getLogger("flask_mmolove")

F = TypeVar("F", bound=Callable[..., Any])
IdentityGetter = Callable[[], object]

#: The longest referee identity: its event ids ("reg-<identity>", "qual-<identity>")
#: must fit the outbox's server_event_id column, or the event could not be stored.
MAX_IDENTITY_LENGTH = SERVER_EVENT_ID_MAX - len("qual-")


def normalize_identity(identity: object) -> str | None:
    """The referee identity as MMOLove receives it, or None when it cannot be one."""
    if identity is None or isinstance(identity, bool):
        return None
    text = str(identity).strip()
    if not text or len(text) > MAX_IDENTITY_LENGTH or not text.isprintable():
        return None
    return text


def _short(token: str) -> str:
    """Enough of a token to tell it apart in a log line (tokens are not secrets, but
    some are long)."""
    return token if len(token) <= 12 else token[:12] + "..."


# --- registered -------------------------------------------------------------------


def set_referee(identity: object) -> None:
    """Name the account the current request created; call it in the registration view.

    ``identity`` must be stable for the account's life (its id, not a renamable
    name). With the outbox in the portal's transaction (``db=``), the binding and
    ``registered`` are written at once, in that transaction: add and flush the
    account, call this, then commit. Standalone, the decorated view's successful
    response binds it to the pending token and enqueues ``registered``.
    """
    if normalize_identity(identity) is None:
        raise ValueError(
            "set_referee() needs the new account's stable id: a non-empty printable "
            f"value of at most {MAX_IDENTITY_LENGTH} characters, got {type(identity).__name__}"
        )
    work = _request.current_work()
    if work is None:
        # Account code shared with a CLI command or a job: no request, so no token.
        logger.debug("set_referee() outside a request: no mmref token to bind")
        return
    work.referee = identity
    state = get_state()
    if state.portal_db is not None and g.get("mmref") is not None:
        work.referee = None
        record_registration(identity)


def record_registration(
    identity: object, *, token: str | None = None, app: Flask | None = None
) -> bool:
    """Bind the pending token (or ``token``) to ``identity`` and enqueue ``registered``.

    Returns False (and keeps the token pending) when there is nothing to do yet.
    ``token`` is for an operator sending again what a failed write lost
    (``flask mmolove enqueue``); a request's own token is let go once its event is
    written.
    """
    state = get_state(app)
    delivery = state.active()
    pending = token is None
    if token is None:
        token = g.get("mmref")
    if delivery is None or token is None:
        return False
    referee = normalize_identity(identity)
    if referee is None:
        logger.warning(
            "a referee identity must be 1-%d printable characters; got %r. The mmref "
            "token stays pending.",
            MAX_IDENTITY_LENGTH,
            type(identity).__name__,
        )
        return False
    outbox = delivery.outbox
    body = build_body(
        "registered",
        token=token,
        server_id=state.settings.server_id,
        server_event_id=f"reg-{referee}",
        referee_identity=referee,
    )

    def write(connection: Connection | None) -> int | None:
        bound, event_id = outbox.bind_and_enqueue(
            identity=referee,
            token=token,
            event="registered",
            server_event_id=f"reg-{referee}",
            body=body,
            connection=connection,
        )
        if bound is None:
            # One share-link token is one MMOLove referral: a replayed link (alts
            # farming rewards, or a link passed on) refers its first account only.
            logger.warning(
                "referee %r was not bound: its mmref token (%s) is bound to another "
                "account already, and one token is one referral; no registered event, "
                "and its milestones are not referred",
                referee,
                _short(token),
            )
        elif bound != token:
            logger.info(
                "referee %r was already bound to an earlier mmref; first touch keeps it",
                referee,
            )
        return event_id

    committed = state.portal_db is not None
    work = _request.current_work()
    if work is not None:
        work.bound.setdefault(referee, token)
    _request.write(
        state,
        write,
        then=(lambda: _request.forget_token(state, committed=committed)) if pending else None,
        again=f"flask mmolove enqueue registered --identity {referee} --token {token}",
    )
    return True


def _flask_login_identity() -> object:
    try:
        from flask_login import current_user
    except ImportError:
        return None
    # Installed is not in use: only an app with a LoginManager has a current_user.
    if getattr(current_app, "login_manager", None) is None:
        return None
    if current_user and getattr(current_user, "is_authenticated", False):
        return current_user.get_id()
    return None


def _resolve_identity(
    work: _request.RequestWork, getter: IdentityGetter | None, signed_in_before: object
) -> object:
    identity, work.referee = work.referee, None
    if identity is None and getter is not None:
        identity = getter()
    if identity is None:
        # Only a login that happened in this very request names a new account: a player
        # who was already signed in and opens a referral link is not a referee.
        identity = _flask_login_identity()
        if identity is not None and identity == signed_in_before:
            identity = None
    return identity


@overload
def referral_registered(view: F) -> F: ...
@overload
def referral_registered(*, identity: IdentityGetter | None = None) -> Callable[[F], F]: ...


def referral_registered(
    view: F | None = None, *, identity: IdentityGetter | None = None
) -> F | Callable[[F], F]:
    """Decorate the registration view: report ``registered`` when it creates an account.

    After the view returns a 2xx or 3xx response, if an ``mmref`` token is pending and
    an identity is known (``set_referee()`` in the view, else ``identity()``, else
    Flask-Login's ``current_user`` if the view signed them in), the identity is bound
    to the token and ``registered`` is written to the outbox. Works bare or as
    ``@referral_registered(identity=lambda: ...)``, on sync and async views.
    """

    def decorator(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> ResponseReturnValue:
            get_state()  # fail early and clearly when init_app was not called
            work = _request.current_work()
            if work is None:
                # Called as a function outside a request: no token, nothing to report.
                return current_app.ensure_sync(func)(*args, **kwargs)  # type: ignore[no-any-return]
            work.referee = None
            signed_in_before = _flask_login_identity() if g.get("mmref") is not None else None
            work.registering = True
            try:
                response = make_response(current_app.ensure_sync(func)(*args, **kwargs))
            finally:
                work.registering = False
            try:
                _register(work, func, response, identity, signed_in_before)
            finally:
                # Reached in the view before its referee was named: recorded now, or
                # dropped as not referred.
                milestones, work.milestones = work.milestones, []
                for referee, server_event_id in milestones:
                    record_qualification(referee, server_event_id=server_event_id)
            return response

        return wrapper  # type: ignore[return-value]

    if view is not None:
        return decorator(view)
    return decorator


def _register(
    work: _request.RequestWork,
    func: Callable[..., Any],
    response: Response,
    identity: IdentityGetter | None,
    signed_in_before: object,
) -> None:
    """After a registration view: bind its referee and enqueue ``registered``."""
    if work.bound:
        # set_referee() wrote it already, in the portal's transaction.
        return
    if not 200 <= response.status_code < 400 or g.get("mmref") is None:
        return
    referee = _resolve_identity(work, identity, signed_in_before)
    if referee is None and request.method in ("GET", "HEAD", "OPTIONS"):
        # Showing the form: no account exists yet, so no identity either.
        logger.debug("%s: mmref pending, no account yet", func.__qualname__)
    elif referee is None:
        logger.warning(
            "%s returned %d with an mmref pending but no referee identity: call "
            "set_referee(user.id) in the view once the account exists, or use "
            "@referral_registered(identity=lambda: ...). The token stays pending.",
            func.__qualname__,
            response.status_code,
        )
    else:
        record_registration(referee)


# --- qualified --------------------------------------------------------------------


def record_qualification(
    identity: object,
    *,
    token: str | None = None,
    server_event_id: str | None = None,
    app: Flask | None = None,
) -> bool:
    """Enqueue ``qualified`` for a referred player; False if the player was not referred."""
    state = get_state(app)
    delivery = state.active()
    if delivery is None:
        return False
    referee = normalize_identity(identity)
    if referee is None:
        raise ValueError(
            f"identity must be the referee's stable id (1-{MAX_IDENTITY_LENGTH} printable "
            f"characters), as given to set_referee(); got {type(identity).__name__}"
        )
    outbox = delivery.outbox
    portal_db = state.portal_db
    work = _request.current_work()
    # Standalone in a request, the binding is looked up when the write happens, at the
    # response: an outbox that is down then is logged with its enqueue command, and the
    # player's /play still answers (its level may be committed already).
    later = portal_db is None and work is not None and work.responding
    bound = token
    unwritten = False
    if bound is None and work is not None:
        # Bound in this very request, its binding not written yet (standalone).
        bound = work.bound.get(referee)
        unwritten = bound is not None
    if bound is None and work is not None and work.registering and g.get("mmref") is not None:
        # In a registration view whose referee is named when it returns: kept for then.
        work.milestones.append((referee, server_event_id))
        return True
    if bound is None and not later:
        connection = None if portal_db is None else portal_db.connection()
        with _request.bounded(state, connection):
            bound = outbox.token_for(referee, connection=connection)
        if bound is None:
            logger.debug("player %r reached the milestone but was not referred", referee)
            return False
    event_id = server_event_id or f"qual-{referee}"
    given = bound

    def write(connection: Connection | None) -> int | None:
        token = given
        if token is None or unwritten:
            bound_now = outbox.token_for(referee, connection=connection)
            if token is None:
                token = bound_now
            elif bound_now != token:
                # Its registration's binding was refused (the token is another account's).
                token = None
        if token is None:
            logger.debug("player %r reached the milestone but was not referred", referee)
            return None
        body = build_body(
            "qualified",
            token=token,
            server_id=state.settings.server_id,
            server_event_id=event_id,
        )
        return outbox.enqueue(
            event="qualified",
            token=token,
            identity=referee,
            server_event_id=event_id,
            body=body,
            connection=connection,
        )

    again = f"flask mmolove enqueue qualified --identity {referee}"
    if bound is not None:
        again += f" --token {bound}"
    if server_event_id is not None:
        again += f" --server-event-id {event_id}"
    _request.write(state, write, again=again)
    return True


def _on_player_qualified(sender: Any, **kwargs: Any) -> None:
    app = getattr(sender, "_get_current_object", lambda: sender)()
    if EXTENSION_KEY not in getattr(app, "extensions", {}):
        logger.debug("player_qualified from %r, which has no MMOLove; ignored", sender)
        return
    identity = kwargs.get("identity")
    if identity is None:
        raise TypeError("player_qualified.send(app, identity=...) needs the player's identity")

    def qualify() -> None:
        record_qualification(
            identity,
            token=kwargs.get("token"),
            server_event_id=kwargs.get("server_event_id"),
            app=app,
        )

    # Inside this app's own context (a request, usually) the write must join that
    # request, so that it commits with the request's response.
    if has_app_context() and current_app._get_current_object() is app:  # type: ignore[attr-defined]
        qualify()
    else:
        with app.app_context():
            qualify()


player_qualified.connect(_on_player_qualified)
