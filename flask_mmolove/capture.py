"""Finding the referral token on a request and keeping it until an account exists.

The token travels three ways: the ``mmref`` query parameter (MMOLove's redirect), our
own first-party cookie (set when the query parameter is first seen, so it survives
``session.clear()`` at login and OAuth round trips) and the session (what the
registration view reads). Only a valid token is ever stored or used. An app with no
session (no ``SECRET_KEY``) keeps the token in the cookie alone: a visitor is never
answered 500 because of us.
"""

from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass
from typing import Final

from flask import Flask, Request, Response, current_app, g, request, session
from flask.sessions import SecureCookieSessionInterface, SessionMixin
from werkzeug.http import parse_cookie

logger = logging.getLogger("flask_mmolove")

QUERY_PARAM: Final = "mmref"
MAX_TOKEN_LENGTH: Final = 512
# URL-safe printable characters only: what an opaque signed token can be made of, and
# nothing that could break out of a header, a cookie or an HTML attribute.
_TOKEN: Final = re.compile(rf"[A-Za-z0-9._~+/=:-]{{1,{MAX_TOKEN_LENGTH}}}", re.ASCII)

#: What to do with our cookie on the response.
SET: Final = "set"
CLEAR: Final = "clear"

#: The apps told that they have no session, so each is told once.
_WARNED_NO_SESSION: weakref.WeakSet[Flask] = weakref.WeakSet()


def valid_token(value: object) -> str | None:
    """``value`` if it can be an ``mmref`` token, else None."""
    if isinstance(value, str) and _TOKEN.fullmatch(value):
        return value
    return None


@dataclass(frozen=True)
class CaptureSettings:
    cookie_name: str
    cookie_max_age: int
    cookie_secure: bool | None
    cookie_domain: str | None
    session_key: str
    first_touch: bool


def _ignored(source: str, raw: str) -> None:
    # The value itself is never logged: it is attacker-controlled.
    logger.debug("ignored an invalid mmref from the %s (%d characters)", source, len(raw))


def _our_cookie(settings: CaptureSettings, cookie_header: str) -> str | None:
    """The token of our cookie, among every cookie of its name the browser sent.

    A cookie planted under our name (by a sibling subdomain, or over plain HTTP) is
    sent too. Browsers send longer paths first, then older cookies first, so ours,
    set for the whole site ("/"), comes after one planted for a longer path: the last
    valid value is ours. ``request.cookies`` keeps the first only, which would let the
    planted one hide or replace the player's token.
    """
    found = None
    for raw in parse_cookie(cookie_header).getlist(settings.cookie_name):
        token = valid_token(raw)
        if token is None:
            _ignored("cookie", raw)
        else:
            found = token
    return found


def _session_may_hold_token(cookie_header: str) -> bool:
    """False when the session is certainly empty, known without opening it.

    Flask's own cookie session is empty when the request has no session cookie, and a
    cookie name appears verbatim in the ``Cookie`` header (names are never escaped).
    Opening the session anyway would build a serializer on every request and add
    ``Vary: Cookie`` to pages that depend on no cookie. Another session interface
    (server-side sessions) is always asked.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    interface = app.session_interface
    if type(interface).open_session is not SecureCookieSessionInterface.open_session:
        return True
    return interface.get_cookie_name(app) in cookie_header


def _session(settings: CaptureSettings) -> SessionMixin | None:
    """The request's session, or None when the app has none to write to.

    Without ``SECRET_KEY`` Flask's session is a null session that raises on any write:
    writing the token there would answer every visitor arriving with ``?mmref=`` a
    500. Refusing at ``init_app`` would stop image builds and migrations that run
    without the portal's secrets; instead our cookie alone carries the token.
    """
    sess: SessionMixin = session._get_current_object()  # type: ignore[attr-defined]
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if not app.session_interface.is_null_session(sess):
        return sess
    if app not in _WARNED_NO_SESSION:
        _WARNED_NO_SESSION.add(app)
        logger.warning(
            "the app has no session (SECRET_KEY is not set): the pending mmref token is "
            "kept in the %r cookie alone. Set SECRET_KEY to a long random value (such as "
            "secrets.token_hex()) so that the session keeps it too",
            settings.cookie_name,
        )
    return None


def capture(settings: CaptureSettings, req: Request) -> tuple[str, bool] | None:
    """The pending token, kept in the session, and whether our cookie must be set.

    None when there is no valid token. The request hook calls it only for a request
    with a query string or cookies: with neither there is no token anywhere. It runs on
    most requests of a portal, so it reads the raw environ and resolves the session
    proxy at most once.
    """
    environ = req.environ
    query = environ.get("QUERY_STRING")
    cookie_header = environ.get("HTTP_COOKIE")
    pending = None
    sess = None
    set_cookie = False
    if cookie_header:
        if _session_may_hold_token(cookie_header):
            sess = _session(settings)
            if sess is not None:
                pending = valid_token(sess.get(settings.session_key))
        # The header is only parsed when it can hold our cookie. A token pending in
        # the session is never replaced by a cookie: first touch holds.
        if pending is None and settings.cookie_name in cookie_header:
            pending = _our_cookie(settings, cookie_header)
    # Only a query string that names mmref, or escapes a character, can carry it.
    raw_query = None
    if query and (QUERY_PARAM in query or "%" in query):
        raw_query = req.args.get(QUERY_PARAM)
    if raw_query is not None:
        fresh = valid_token(raw_query)
        if fresh is None:
            _ignored("query string", raw_query)
        elif pending is None or (fresh != pending and not settings.first_touch):
            pending = fresh
            set_cookie = True
        elif fresh != pending:
            logger.debug("kept the first pending mmref; a later one arrived (first touch)")
        elif (
            not cookie_header
            or settings.cookie_name not in cookie_header
            or _our_cookie(settings, cookie_header) != fresh
        ):
            # Ours is missing (or only a planted one is there): set it again.
            set_cookie = True
    if pending is None:
        return None
    if sess is None:
        sess = _session(settings)
    if sess is not None and sess.get(settings.session_key) != pending:
        sess[settings.session_key] = pending
    return pending, set_cookie


def forget(settings: CaptureSettings) -> None:
    """Drop the pending token from the session and ``g``: it is bound to an account now."""
    sess = _session(settings)
    if sess is not None:
        sess.pop(settings.session_key, None)
    g.mmref = None


def keep(settings: CaptureSettings, token: str) -> None:
    """Make ``token`` pending again (after :func:`forget`, in a request that failed)."""
    sess = _session(settings)
    if sess is not None:
        sess[settings.session_key] = token
    g.mmref = token


def write_cookie(
    settings: CaptureSettings, response: Response, action: str, token: str | None
) -> None:
    """Set our first-party cookie to ``token`` (``SET``), or clear it (``CLEAR``)."""
    if action == SET and token is not None:
        secure = request.is_secure if settings.cookie_secure is None else settings.cookie_secure
        response.set_cookie(
            settings.cookie_name,
            token,
            max_age=settings.cookie_max_age,
            secure=secure,
            httponly=True,
            samesite="Lax",
            domain=settings.cookie_domain,
        )
    elif action == CLEAR and settings.cookie_name in request.cookies:
        response.delete_cookie(
            settings.cookie_name,
            domain=settings.cookie_domain,
            httponly=True,
            samesite="Lax",
        )
