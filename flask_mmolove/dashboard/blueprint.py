"""The dashboard blueprint: guarded pages over the outbox, and a CSRF-checked retry."""

from __future__ import annotations

import hmac
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.wrappers import Response

from ..outbox import DEAD, PENDING, STATES, Outbox, OutboxEvent, Stats
from ..redaction import Redactor
from ..state import MMOLoveState, get_state

logger = logging.getLogger("flask_mmolove")

BLUEPRINT_NAME: Final = "mmolove_dashboard"
DEFAULT_URL_PREFIX: Final = "/mmolove"
PAGE_SIZE: Final = 50
#: The highest page the index shows; a higher ``?page=`` is shown as this one (empty,
#: with "Newer" leading back), so the offset always fits the database's 64-bit integer.
MAX_PAGE: Final = 1_000_000
#: What a table cell shows of an answer; the event's own page shows all of it.
PREVIEW_CHARS: Final = 160

#: Returns True to let the current request in; anything else is refused with 403. It
#: may also abort() itself, e.g. with a redirect to the portal's login page.
AccessCheck = Callable[[], bool]

_SESSION_TOKEN: Final = "_mmolove_dashboard_csrf"  # noqa: S105 (a session key's name)
_FIELD: Final = "csrf_token"


@dataclass(frozen=True)
class EventView:
    """One outbox event as the pages show it: times formatted, every text scrubbed."""

    id: int
    event: str
    identity: str
    token: str
    server_event_id: str
    #: ``pending``, ``in flight`` (leased right now), ``delivered`` or ``dead``.
    state: str
    attempts: int
    created: str
    last_attempt: str | None
    next_attempt: str | None
    delivered: str | None
    last_status: int | None
    last_reason: str | None
    error: str
    error_preview: str
    outcome: str | None
    response: str
    body: str
    retryable: bool


def _when(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _scrubber(state: MMOLoveState) -> Callable[[str | None], str]:
    redact = Redactor(state.settings.secret)

    def scrub(text: str | None) -> str:
        # Before any HTML escaping, which would hide a secret with "<" or "&" in it.
        return redact(text) if text else ""

    return scrub


def _pretty(text: str | None) -> str | None:
    """JSON indented for reading; anything else as it is."""
    if not text:
        return text
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


def _view(event: OutboxEvent, scrub: Callable[[str | None], str], now: float) -> EventView:
    leased = event.state == PENDING and event.lease_until is not None and event.lease_until > now
    error = scrub(event.last_error)
    full_error = scrub(_pretty(event.last_error))
    preview = error if len(error) <= PREVIEW_CHARS else error[: PREVIEW_CHARS - 1] + "…"
    return EventView(
        id=event.id,
        event=scrub(event.event),
        identity=scrub(event.identity),
        token=scrub(event.token),
        server_event_id=scrub(event.server_event_id),
        state="in flight" if leased else event.state,
        attempts=event.attempts,
        created=_when(event.created_at) or "",
        last_attempt=_when(event.last_attempt_at),
        next_attempt=_when(event.next_attempt_at) if event.state == PENDING else None,
        delivered=_when(event.delivered_at),
        last_status=event.last_status,
        last_reason=scrub(event.last_reason) or None,
        error=full_error,
        error_preview=preview,
        outcome=event.outcome,
        # Decoded before scrubbing, so an escaped secret is scrubbed in its plain form.
        response=scrub(_pretty(event.response)),
        body=scrub(_pretty(event.body.decode("utf-8", errors="replace"))),
        retryable=event.state == DEAD,
    )


# --- access and CSRF ------------------------------------------------------------------


def _guard(access_check: AccessCheck | None) -> Callable[[], None]:
    def guard() -> None:
        if access_check is None:
            # As if not mounted at all: the portal never said who may see this.
            abort(404)
        # Only a literal True lets anyone in, so a check that forgets to return
        # (None) or returns a user object fails closed.
        if access_check() is not True:
            abort(403)

    return guard


def _flask_wtf() -> Any | None:
    """The app's Flask-WTF ``CSRFProtect``, if it has one and it is enabled."""
    csrf = current_app.extensions.get("csrf")
    if csrf is None or not hasattr(csrf, "protect"):
        return None
    if not current_app.config.get("WTF_CSRF_ENABLED", True):
        # The portal switched Flask-WTF off (tests often do); the retry stays guarded
        # by our own token rather than by nothing.
        return None
    return csrf


def _csrf_input() -> dict[str, str]:
    """The hidden field every dashboard form carries: name and value."""
    if _flask_wtf() is not None:
        from flask_wtf.csrf import generate_csrf

        name = current_app.config.get("WTF_CSRF_FIELD_NAME", _FIELD)
        return {"name": str(name), "value": str(generate_csrf())}
    _require_session()
    token = session.get(_SESSION_TOKEN)
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session[_SESSION_TOKEN] = token
    return {"name": _FIELD, "value": token}


def _check_csrf() -> None:
    csrf = _flask_wtf()
    if csrf is not None:
        # Called directly, not left to CSRFProtect's before_request: that one skips
        # views the portal exempted, and this one must never be skipped.
        csrf.protect()
        return
    _require_session()
    expected = session.get(_SESSION_TOKEN)
    sent = request.form.get(_FIELD, "")
    if (
        not isinstance(expected, str)
        or not expected
        or not hmac.compare_digest(expected.encode(), sent.encode())
    ):
        abort(400, description="The form's CSRF token is missing or wrong: reload the page.")


def _require_session() -> None:
    if not current_app.secret_key:
        raise RuntimeError(
            "flask_mmolove.dashboard keeps its CSRF token in the session: set the app's "
            "SECRET_KEY (or install Flask-WTF's CSRFProtect)"
        )


def _harden(response: Response) -> Response:
    # Operator data must not be cached or framed: a framed retry button is a
    # clickjacking target even with the CSRF token in place.
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


# --- views ----------------------------------------------------------------------------


def _outbox() -> tuple[MMOLoveState, Outbox]:
    state = get_state()
    if state.outbox is None:
        abort(404)
    return state, state.outbox


def _filter(value: str | None) -> str | None:
    return value if value in STATES else None


def index() -> str:
    state = get_state()
    if state.outbox is None:
        return render_template("mmolove_dashboard/disabled.html")
    outbox = state.outbox
    shown = _filter(request.args.get("state"))
    # Anything not a whole number is page 1, whatever its size: it is the operator's
    # URL to edit, and never an error.
    page = min(MAX_PAGE, max(1, request.args.get("page", 1, type=int) or 1))
    # One extra row says whether an older page exists, without a count query.
    rows = outbox.list_events(state=shown, limit=PAGE_SIZE + 1, offset=(page - 1) * PAGE_SIZE)
    now = outbox.clock()
    stats: Stats = outbox.stats()
    scrub = _scrubber(state)
    return render_template(
        "mmolove_dashboard/index.html",
        events=[_view(event, scrub, now) for event in rows[:PAGE_SIZE]],
        stats=stats,
        shown=shown,
        states=STATES,
        page=page,
        older=len(rows) > PAGE_SIZE,
        endpoint=scrub(state.settings.endpoint),
        server_id=scrub(state.settings.server_id),
        delivery=state.settings.delivery,
        test_mode=state.settings.test_mode,
        oldest=None if stats.oldest_pending_age is None else round(stats.oldest_pending_age),
        hearts=outbox.heart_stats() if state.settings.callback_secrets else None,
    )


def event_detail(event_id: int) -> str:
    state, outbox = _outbox()
    event = outbox.get(event_id)
    if event is None:
        abort(404)
    return render_template(
        "mmolove_dashboard/event.html", event=_view(event, _scrubber(state), outbox.clock())
    )


def _back() -> Response:
    if request.form.get("back") == "event":
        event_id = request.view_args.get("event_id") if request.view_args else None
        if isinstance(event_id, int):
            return redirect(url_for(".event_detail", event_id=event_id), 303)
    return redirect(url_for(".index", state=_filter(request.form.get("state"))), 303)


def retry(event_id: int) -> Response:
    _check_csrf()
    state, outbox = _outbox()
    event = outbox.get(event_id)
    if event is None:
        abort(404)
    if event.state != DEAD:
        # Requeue would also hurry a pending event along; from here only dead letters
        # are offered, and a stale form must not do more than the button said.
        flash(f"Event #{event_id} is {event.state}, not dead: nothing to retry.", "error")
        return _back()
    if outbox.requeue([event_id]):
        logger.info("dashboard: event %d requeued by an operator", event_id)
        state.dispatch([event_id])
        flash(f"Event #{event_id} is queued to be sent again.", "success")
    else:
        flash(f"Event #{event_id} changed meanwhile; nothing was requeued.", "error")
    return _back()


def retry_all() -> Response:
    _check_csrf()
    state, outbox = _outbox()
    dead = [event.id for event in outbox.list_events(state=DEAD, limit=1_000_000)]
    count = outbox.requeue(dead) if dead else 0
    if count:
        logger.info("dashboard: %d dead letter(s) requeued by an operator", count)
        state.dispatch(dead)
    flash(f"{count} dead letter(s) queued to be sent again.", "success" if count else "error")
    return redirect(url_for(".index"), 303)


def create_dashboard_blueprint(
    access_check: AccessCheck | None = None,
    *,
    url_prefix: str = DEFAULT_URL_PREFIX,
    name: str = BLUEPRINT_NAME,
) -> Blueprint:
    """The operator pages as a blueprint; register it with ``app.register_blueprint``.

    ``access_check`` runs before every page (static files included) inside the
    request: return True to let the request in; anything else answers 403. Without
    one, every page answers 404. Retry buttons post a CSRF token: Flask-WTF's when the
    app has ``CSRFProtect`` enabled, else one this blueprint keeps in the session
    (which then needs ``SECRET_KEY``). The templates live under
    ``mmolove_dashboard/``; a portal may override ``mmolove_dashboard/base.html``.
    """
    if access_check is None:
        logger.warning(
            "the mmolove dashboard is registered without an access_check: every page of "
            "it answers 404. Pass access_check=lambda: <is this user an operator?>."
        )
    elif not callable(access_check):
        raise TypeError("access_check must be a function of no arguments returning a bool")
    bp = Blueprint(
        name,
        __name__,
        url_prefix=url_prefix,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static",
    )
    bp.before_request(_guard(access_check))
    bp.after_request(_harden)
    bp.context_processor(lambda: {"mmolove_csrf_input": _csrf_input})
    bp.add_url_rule("/", "index", index, methods=["GET"])
    bp.add_url_rule("/events/<int:event_id>", "event_detail", event_detail, methods=["GET"])
    bp.add_url_rule("/events/<int:event_id>/retry", "retry", retry, methods=["POST"])
    bp.add_url_rule("/retry-dead", "retry_all", retry_all, methods=["POST"])
    return bp


def init_dashboard(
    app: Flask,
    access_check: AccessCheck | None = None,
    *,
    url_prefix: str = DEFAULT_URL_PREFIX,
    name: str = BLUEPRINT_NAME,
) -> Blueprint:
    """Create the dashboard blueprint and register it on ``app``; returns it.

    Call it after ``MMOLove().init_app(app)``. See :func:`create_dashboard_blueprint`.
    """
    if "mmolove" not in app.extensions:
        raise RuntimeError(
            "call MMOLove().init_app(app) before init_dashboard(app): the dashboard shows "
            "that extension's outbox"
        )
    bp = create_dashboard_blueprint(access_check, url_prefix=url_prefix, name=name)
    app.register_blueprint(bp)
    return bp
