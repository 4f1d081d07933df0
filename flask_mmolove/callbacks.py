"""The endpoint MMOLove's reward callbacks (votes) are posted to, served at
``MMOLOVE_CALLBACK_URL`` once ``MMOLOVE_CALLBACK_SECRET`` is set.

Each answer is what MMOLove's retry schedule needs to hear. 2xx only once the vote is
kept (a retried vote already kept is 2xx too, and keeps nothing new); 401 for a
signature that does not verify, 400 for a signed body that is no vote, 413 for a body
no vote needs, 503 when it cannot be kept now (MMOLove retries). Never a 500. A vote
for a username the portal does not know is still 2xx: MMOLove retries every 4xx for
hours, and who that voter is stays the portal's decision, in ``heart_counted``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any, Final

from flask import Flask, Response, current_app, jsonify, request

from .outbox.values import HEART_ID_MAX
from .protocol import (
    EVENT_HEADER,
    HEART_COUNTED,
    HEART_TEST,
    SIGNATURE_HEADER,
    CallbackPayloadError,
    SignatureError,
    check_heart_callback,
    check_legacy_get,
)
from .redaction import Secret
from .state import MMOLoveState, get_state

logger = logging.getLogger("flask_mmolove")

#: The endpoint's name among the app's views.
ENDPOINT: Final = "mmolove_callback"
#: Far more than a vote's body (a few hundred bytes); more is refused unread.
MAX_BODY: Final = 64 * 1024


def install(app: Flask, state: MMOLoveState) -> None:
    """Serve the endpoint, exempt from Flask-WTF's CSRF check (MMOLove signs instead,
    and cannot send a form token), whichever extension the portal set up first."""
    methods = ["POST", "GET"] if state.settings.callback_legacy_get else ["POST"]
    app.add_url_rule(state.settings.callback_url, ENDPOINT, receive, methods=methods)
    _exempt_from_csrf(app)

    @app.before_request
    def _exempt_late() -> None:
        # CSRFProtect set up after this extension: its check runs after this hook.
        if request.endpoint == ENDPOINT:
            _exempt_from_csrf(current_app)


def _exempt_from_csrf(app: Flask) -> None:
    csrf = app.extensions.get("csrf")
    if csrf is not None and hasattr(csrf, "exempt"):
        csrf.exempt(f"{__name__}.{receive.__name__}")


def _answer(status: int, **body: Any) -> Response:
    response = jsonify(body)
    response.status_code = status
    return response


def receive() -> Response:
    """Verify, keep, answer: the view at ``MMOLOVE_CALLBACK_URL``."""
    state = get_state()
    # Held wrapped: verification unwraps each only inside the MAC's computation, so no
    # frame of an unexpected error (shown by a debugger or Sentry) holds one in plain.
    secrets = state.settings.callback_secrets
    if request.method == "GET":
        return _legacy(state, secrets)
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _answer(413, error=f"a vote's body is at most {MAX_BODY} bytes")
    raw = request.stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        return _answer(413, error=f"a vote's body is at most {MAX_BODY} bytes")
    try:
        vote = check_heart_callback(raw, request.headers.get(SIGNATURE_HEADER, ""), secrets)
    except SignatureError as exc:
        logger.warning("a reward callback was refused: %s", exc)
        return _answer(401, error=str(exc))
    except CallbackPayloadError as exc:
        logger.warning("a signed reward callback was no vote: %s", exc)
        return _answer(400, error=str(exc))
    named = request.headers.get(EVENT_HEADER)
    if named is not None and named != vote["event"]:
        return _answer(400, error=f"{EVENT_HEADER} says {named[:40]!r}, the body otherwise")
    if len(vote["heart_id"]) > HEART_ID_MAX:
        return _answer(400, error=f"heart_id is longer than a UUID ({HEART_ID_MAX} at most)")
    # A test callback's id is all zeros, every time: each one is kept as itself.
    heart_id = vote["heart_id"] if vote["event"] == HEART_COUNTED else f"test-{uuid.uuid4()}"
    return _keep(state, heart_id, vote["event"], vote["username"], raw)


def _legacy(state: MMOLoveState, secrets: Sequence[Secret]) -> Response:
    try:
        vote = check_legacy_get(request.args, secrets)
    except SignatureError as exc:
        logger.warning("a legacy reward callback was refused: %s", exc)
        return _answer(401, error=str(exc))
    # No heart_id in this mode: the signed pair names the vote, so a retry is the same.
    signed = f"{vote['username']}|{vote['ts']}".encode()
    heart_id = "legacy-" + hashlib.sha256(signed).hexdigest()[:40]
    payload = json.dumps(
        {
            "event": HEART_COUNTED,
            "username": vote["username"],
            "heart_id": heart_id,
            "timestamp": vote["ts"],
            "legacy": True,
        },
        separators=(",", ":"),
    ).encode()
    return _keep(state, heart_id, HEART_COUNTED, vote["username"], payload)


def _keep(state: MMOLoveState, heart_id: str, event: str, username: str, raw: bytes) -> Response:
    delivery = state.delivery
    if delivery is None:
        return _answer(503, error="MMOLOVE_ENABLED is false: votes are not kept")
    try:
        new = delivery.outbox.record_heart(
            heart_id=heart_id, event=event, username=username, payload=raw
        )
    except Exception:
        # Not kept: MMOLove tries again (1 min, 5 min, 30 min, 2 h, 6 h).
        logger.exception("a vote (heart %s) could not be kept; MMOLove will retry", heart_id)
        return _answer(503, error="the vote could not be kept now; try again")
    if new and event != HEART_TEST and state.background is not None:
        # Announced by the deliverer, never in this request: MMOLove wants its answer
        # as soon as the vote is kept, and the grant may be slow.
        state.background.wake()
    return _answer(200, ok=True, duplicate=not new)
