"""Item 11: hostile requests. Any query string, cookie or header value: never a 500,
never a stored or echoed invalid token, never a header injection, never the raw
value in the log; a valid token and identity are always recorded."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from portal import build_portal

import flask_mmolove
from flask_mmolove.capture import MAX_TOKEN_LENGTH, valid_token
from flask_mmolove.referrals import normalize_identity

TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~+/=:-"
#: Values that could break out of a header, a cookie or an HTML attribute.
NASTY = ["\r\n", "\n", "\r", ";", ",", '"', "<", ">", " ", "\t", "\x00", "%0d%0a", "é", "\u2028"]

# Latin-1 without CR/LF: what a WSGI server can hand over as a header value.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=600,
)
tokenish = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=MAX_TOKEN_LENGTH + 20)
hostile = st.one_of(
    tokenish,
    st.text(max_size=700),
    st.builds(lambda a, n, b: a + n + b, tokenish, st.sampled_from(NASTY), tokenish),
)


#: Every message template the package logs with is a literal in its source.
PACKAGE_SOURCE = "\n".join(
    path.read_text() for path in Path(flask_mmolove.__file__).parent.rglob("*.py")
)


def literal(value: object) -> bool:
    return isinstance(value, str) and f'"{value}"' in PACKAGE_SOURCE


class Logs(logging.Handler):
    """What the package logged, as the parts a request could have put there: the
    arguments of a template written in the package's source, but for literals of the
    source (whose text may contain anything, a fuzzed value included); or else the
    whole message."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if literal(record.msg):
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            self.lines.extend(str(arg) for arg in args if not literal(arg))
        else:
            self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Flask, Logs]]:
    # Nothing is sent (worker mode, nothing runs one): this is about what is kept.
    db = tmp_path_factory.mktemp("fuzz") / "outbox.sqlite3"
    app = build_portal(
        {
            "MMOLOVE_SERVER_ID": "srv-fuzz",
            "MMOLOVE_REFERRAL_SECRET": "fuzz-secret-value",
            "MMOLOVE_ENDPOINT": "http://127.0.0.1:9/api/referral/events",
            "MMOLOVE_DATABASE_URI": f"sqlite:///{db}",
            "MMOLOVE_DELIVERY": "worker",
        }
    )
    logs = Logs()
    logger = logging.getLogger("flask_mmolove")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(logs)
    yield app, logs
    logger.removeHandler(logs)
    logger.setLevel(old_level)
    app.extensions["mmolove"].outbox.dispose()


def check_response(app: Flask, response: Any) -> None:
    assert response.status_code < 500, response.data[:300]
    for name, value in response.headers.items():
        assert "\r" not in value
        assert "\n" not in value, (name, value)
    serializer = app.session_interface.get_signing_serializer(app)  # type: ignore[attr-defined]
    for cookie in response.headers.getlist("Set-Cookie"):
        name, _, rest = cookie.partition("=")
        value = rest.split(";", 1)[0]
        if name == "mmref" and value:
            assert valid_token(value) == value
        if name == app.config.get("SESSION_COOKIE_NAME", "session") and value:
            stored = serializer.loads(value).get("mmolove_mmref")
            assert stored is None or valid_token(stored) == stored
    if response.is_json:
        echoed = response.json.get("mmref")
        assert echoed is None or valid_token(echoed) == echoed


def no_raw_value_logged(logs: Logs, *values: str) -> None:
    text = "\n".join(logs.lines)
    for value in values:
        if len(value) >= 8 and valid_token(value) is None and value.strip():
            assert value not in text


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    query=st.binary(max_size=800) | st.builds(lambda v: b"mmref=" + v, st.binary(max_size=700)),
    mmref_param=st.none() | hostile,
    cookie_header=st.none() | header_text,
    mmref_cookie=st.none() | hostile.filter(lambda v: "\r" not in v and "\n" not in v),
    other_header=header_text,
)
@example(
    query=b"",
    mmref_param="tok\r\nSet-Cookie: admin=1",
    cookie_header=None,
    mmref_cookie="tok; Domain=evil.example",
    other_header="",
)
# A value that is part of a log message's own text is not a leak.
@example(
    query=b"",
    mmref_param="",
    cookie_header=None,
    mmref_cookie="query st",
    other_header="",
)
def test_any_request_is_answered_safely(
    fuzz_app: tuple[Flask, Logs],
    query: bytes,
    mmref_param: str | None,
    cookie_header: str | None,
    mmref_cookie: str | None,
    other_header: str,
) -> None:
    app, logs = fuzz_app
    logs.lines.clear()
    client = app.test_client()
    cookies = []
    if cookie_header is not None:
        cookies.append(cookie_header)
    if mmref_cookie is not None:
        cookies.append(f"mmref={mmref_cookie}")
    headers = {"User-Agent": other_header, "Referer": other_header}
    if cookies:
        headers["Cookie"] = "; ".join(cookies)
    query_string: Any = query.decode("latin-1")
    if mmref_param is not None:
        query_string = {"mmref": mmref_param}
    response = client.get("/page", query_string=query_string, headers=headers)
    check_response(app, response)
    expected = valid_token(mmref_param) if mmref_param is not None else None
    if expected is not None and "Cookie" not in headers:
        # A valid token alone on a request is taken, echoed and kept.
        assert response.json == {"mmref": expected}
    no_raw_value_logged(logs, mmref_param or "", mmref_cookie or "")


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mmref=hostile, identity=st.text(max_size=300))
@example(mmref="tok-1", identity="x" * 255)
@example(mmref="tok-1", identity=" padded ")
def test_registration_keeps_only_valid_tokens_and_loses_no_valid_one(
    fuzz_app: tuple[Flask, Logs], mmref: str, identity: str
) -> None:
    app, logs = fuzz_app
    outbox = app.extensions["mmolove"].outbox
    client = app.test_client()
    token = valid_token(mmref)
    referee = normalize_identity(identity)
    # What earlier examples left: first touch per identity, one account per token.
    had = outbox.token_for(referee) if referee is not None else None
    owner = _owner_of(outbox, token) if token is not None else None
    check_response(app, client.get("/page", query_string={"mmref": mmref}))
    response = client.post("/register-callable", data={"id": identity})
    check_response(app, response)
    if token is not None and referee is not None:
        bound = outbox.token_for(referee)
        if had is not None:
            assert bound == had
        elif owner is not None and owner != referee:
            assert bound is None, "one token bound a second account"
        else:
            # A valid token and a usable identity, both free: recorded.
            assert bound == token, (len(referee), referee[:40])
            events = [
                e
                for e in outbox.list_events(limit=1_000_000)
                if (e.identity, e.token, e.event) == (referee, bound, "registered")
            ]
            assert events, "the registration was lost"
    for event in outbox.list_events(limit=5):
        assert valid_token(event.token) == event.token
        assert normalize_identity(event.identity) == event.identity
    no_raw_value_logged(logs, mmref)


def _owner_of(outbox: Any, token: str) -> str | None:
    """The identity ``token`` is bound to, if any."""
    b = outbox.bindings
    with outbox.engine.connect() as conn:
        found = conn.execute(sa.select(b.c.identity).where(b.c.token == token)).scalar()
    return None if found is None else str(found)
