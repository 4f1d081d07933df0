"""The sandbox as a Flask app: MMOLove's ingest endpoint, share links, log and faults."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from flask import Flask, Response, current_app, jsonify, redirect, render_template, request, url_for
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from ..protocol import DEFAULT_TOLERANCE, SIGNATURE_HEADER
from .callbacks import CallbackSender
from .faults import Fault, fault_from_json
from .rules import Reply
from .state import SandboxState
from .tokens import TOKEN_LIFETIME

EXTENSION_KEY: Final = "mmolove_sandbox"
CALLBACKS_KEY: Final = "mmolove_sandbox_callbacks"
INGEST_PATH: Final = "/api/referral/events"
#: Referral codes are short; a long one is a broken link, and it would push the token
#: past the 512 characters flask_mmolove.capture accepts.
_MAX_CODE: Final = 64
_MAX_BODY: Final = 1024 * 1024
#: What POST /_hearts passes on to send_heart().
_HEART_FIELDS: Final = ("username", "streak_day", "extra", "heart_id", "period", "timestamp")


class _OrderedJSONProvider(DefaultJSONProvider):
    # Answers keep the documented key order ({"ok": true, "duplicate": true}).
    sort_keys = False


class _SandboxFlask(Flask):
    json_provider_class = _OrderedJSONProvider


def sandbox_state(app: Flask | None = None) -> SandboxState:
    """The :class:`SandboxState` behind a sandbox app (default: the current app)."""
    target = current_app if app is None else app
    state = target.extensions.get(EXTENSION_KEY)
    if not isinstance(state, SandboxState):
        raise RuntimeError("this app was not made by create_sandbox_app()")
    return state


def sandbox_callbacks(app: Flask | None = None) -> CallbackSender:
    """The :class:`~.callbacks.CallbackSender` of a sandbox app (default: the current
    app): MMOLove's reward callbacks to the portal."""
    target = current_app if app is None else app
    sender = target.extensions.get(CALLBACKS_KEY)
    if not isinstance(sender, CallbackSender):
        raise RuntimeError("this app was not made by create_sandbox_app()")
    return sender


def create_sandbox_app(
    *,
    secret: str,
    server_id: str,
    registration_url: str,
    token_key: str | None = None,
    tolerance: int = DEFAULT_TOLERANCE,
    clock: Callable[[], float] | None = None,
    callback_url: str | None = None,
    callback_secret: str | None = None,
) -> Flask:
    """A Flask app that behaves like MMOLove for one server.

    ``clock`` (default :func:`time.time`) is MMOLove's clock: it judges the replay
    window, ages tokens, stamps the log and signs reward callbacks. ``token_key`` signs
    ``mmref`` tokens and by default is derived from ``secret``. The registration URL
    may be plain http here, for local portals; real MMOLove requires public https.
    Reward callbacks go to ``callback_url``, signed with ``callback_secret`` (default
    a fresh random one); :func:`sandbox_callbacks` configures and sends them.
    """
    state = SandboxState(
        secret=secret,
        server_id=server_id,
        registration_url=registration_url,
        token_key=token_key,
        tolerance=tolerance,
        clock=clock,
    )
    app = _SandboxFlask(__name__)
    # The secret deliberately stays out of app.config, where debug pages and config
    # dumps would show it; SECRET_KEY is unused because nothing here needs a session.
    app.config["MAX_CONTENT_LENGTH"] = _MAX_BODY
    app.extensions[EXTENSION_KEY] = state
    app.extensions[CALLBACKS_KEY] = CallbackSender(
        server_id=state.server_id, clock=state.clock, url=callback_url, secret=callback_secret
    )
    app.add_url_rule(INGEST_PATH, "ingest", _ingest, methods=["POST"])
    app.add_url_rule("/r/<server_id>", "share", _share, methods=["GET"])
    app.add_url_rule("/", "index", _index, methods=["GET"])
    app.add_url_rule("/log", "log", _log_page, methods=["GET"])
    app.add_url_rule("/log.json", "log_json", _log_json, methods=["GET"])
    app.add_url_rule("/callbacks.json", "callbacks_json", _callbacks_json, methods=["GET"])
    app.add_url_rule("/_hearts", "hearts", _hearts, methods=["POST"])
    app.add_url_rule("/_faults", "faults", _faults, methods=["GET", "POST", "DELETE"])
    app.add_url_rule("/_state", "state", _state, methods=["GET"])
    app.add_url_rule("/_reset", "reset", _reset, methods=["POST"])
    app.register_error_handler(HTTPException, _http_error)
    return app


def _json(status: int, data: Any, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(data)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _http_error(exc: HTTPException) -> Response:
    return _json(exc.code or 500, {"error": exc.description or exc.name})


def _respond(reply: Reply) -> Response:
    return _json(reply.status, reply.data, dict(reply.headers))


def _drop_connection() -> Response:
    """End the exchange with no HTTP answer at all, as a network failure would."""
    sock = request.environ.get("werkzeug.socket")
    if not isinstance(sock, socket.socket):
        # No socket (e.g. Flask's test client): the closest thing is to fail loudly.
        raise ConnectionAbortedError("scripted drop: no socket to close outside a server")
    # Shut down, not close: werkzeug still owns the socket and closes it later. Its
    # attempt to write the answer then fails with a broken pipe, which it treats as
    # the client going away, so the sender sees the connection end with no reply.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    return Response(status=200)


def _fault_reply(fault: Fault) -> Response:
    headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
    if isinstance(fault.body, str):
        response = Response(fault.body, status=fault.status, mimetype="text/plain")
        response.headers.update(headers)
        return response
    body = fault.body if fault.body is not None else {"error": f"injected fault {fault.status}"}
    return _json(fault.status, body, headers)


def _ingest() -> Response:
    state = sandbox_state()
    received, peer = state.clock(), request.remote_addr
    raw = request.get_data(cache=True)
    signature = request.headers.get(SIGNATURE_HEADER)
    content_type = request.headers.get("Content-Type")
    fault = state.take_fault()
    if fault is not None and fault.kind == "status":
        response = _fault_reply(fault)
        answered = response.get_json(silent=True)
        state.log_fault(
            raw,
            signature,
            fault,
            content_type=content_type,
            status=response.status_code,
            response=answered if isinstance(answered, dict) else None,
            received=received,
            peer=peer,
        )
        return response
    if fault is not None and fault.kind == "drop" and not fault.after_commit:
        state.log_fault(
            raw, signature, fault, content_type=content_type, received=received, peer=peer
        )
        return _drop_connection()
    if fault is not None and fault.kind == "delay":
        state.wait(fault.seconds)
    lose_answer = fault is not None and fault.kind == "drop"
    reply = state.ingest(
        raw,
        signature,
        content_type=content_type,
        fault=fault,
        answered=not lose_answer,
        received=received,
        peer=peer,
    )
    if lose_answer:
        return _drop_connection()
    return _respond(reply)


def _with_query(url: str, name: str, value: str) -> str:
    # Appended to the raw query rather than re-encoded, so the portal's own
    # parameters reach it byte for byte; an old value of the same name is replaced.
    parts = urlsplit(url)
    kept = [
        pair
        for pair in parts.query.split("&")
        if pair and pair != name and not pair.startswith(name + "=")
    ]
    kept.append(f"{name}={value}")
    return urlunsplit(parts._replace(query="&".join(kept)))


def _share(server_id: str) -> BaseResponse:
    state = sandbox_state()
    if server_id != state.server_id:
        return _json(404, {"error": "unknown server"})
    code = request.args.get("ref", "").strip()
    if not code:
        return _json(400, {"error": "ref is required: /r/<server>?ref=<referral code>"})
    if len(code) > _MAX_CODE:
        return _json(400, {"error": f"ref must be at most {_MAX_CODE} characters"})
    token = state.mint_token(code)
    response = redirect(_with_query(state.registration_url, "mmref", token), 302)
    # MMOLove sets this on its own domain, which never sends it to the portal
    # (protocol.md 4). The sandbox shares a host with the portal (127.0.0.1, or the
    # demo's mount on the portal's own origin), and cookies do not keep ports apart:
    # the path keeps it on this share link, so no portal page receives it and takes
    # it for its own first-party cookie.
    response.set_cookie(
        "mmref",
        token,
        path=url_for("share", server_id=server_id),
        max_age=TOKEN_LIFETIME,
        httponly=True,
        samesite="Lax",
        secure=request.is_secure,
    )
    return response


def _index() -> BaseResponse:
    # Relative to the mount point: the demo serves the sandbox under /_mmolove/.
    return redirect(url_for("log"))


def _short(token: str | None) -> str:
    if not token:
        return ""
    return token if len(token) <= 18 else f"{token[:10]}…{token[-6:]}"


def _log_page() -> str:
    state = sandbox_state()
    records = state.public_log()
    share_link = f"{request.url_root}r/{state.server_id}?ref=friend"
    return render_template(
        "log.html",
        records=list(reversed(records)),
        server_id=state.server_id,
        endpoint=request.url_root.rstrip("/") + INGEST_PATH,
        share_link=share_link,
        accepted=state.accepted_count(),
        clicks=state.clicks,
        faults=state.faults,
        short=_short,
    )


def _log_json() -> Response:
    return _json(200, sandbox_state().public_log())


def _callbacks_json() -> Response:
    return _json(200, sandbox_callbacks().public_log())


def _hearts() -> Response:
    """Send a reward callback from a test in another process: ``{"username": ...,
    "streak_day": ..., "extra": {...}, "heart_id": ...}``, or ``{"test": true}``."""
    spec = request.get_json(silent=True)
    if not isinstance(spec, dict):
        return _json(400, {"error": 'send a JSON object: {"username": ...} or {"test": true}'})
    sender = sandbox_callbacks()
    try:
        if spec.get("test") is True:
            delivery = sender.send_test()
        else:
            unknown = set(spec) - set(_HEART_FIELDS)
            if unknown:
                raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
            delivery = sender.send_heart(**spec)
    except (TypeError, ValueError, RuntimeError) as exc:
        return _json(400, {"error": str(exc)})
    return _json(202, {"ok": True, "heart_id": delivery.heart_id, "event": delivery.event})


def _faults() -> Response:
    state = sandbox_state()
    if request.method == "DELETE":
        state.clear_faults()
        return _json(200, {"ok": True, "faults": []})
    if request.method == "POST":
        spec = request.get_json(silent=True)
        if isinstance(spec, dict) and "faults" in spec:
            spec = spec["faults"]
        specs = spec if isinstance(spec, list) else [spec]
        try:
            # All or nothing: a half-scripted fault plan would mislead the test using it.
            faults = [fault_from_json(item) for item in specs]
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        state.add_faults(faults)
    return _json(200, {"ok": True, "faults": state.scrub(state.faults)})


def _state() -> Response:
    state = sandbox_state()
    return _json(200, state.scrub(state.snapshot()))


def _reset() -> Response:
    sandbox_state().reset()
    return _json(200, {"ok": True})
