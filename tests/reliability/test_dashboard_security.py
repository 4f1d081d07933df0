"""Item 14: the operator view. Without the portal's access check nobody gets in, on
any of its routes; its retry actions are CSRF-protected; the secret never shows.

The portal here is a realistic one: Flask-Login, players and an admin, and the
access check the README shows (``current_user.is_authenticated and
current_user.is_admin``). Every route of the blueprint is found in the URL map, so a
route added later is covered without touching this test.
"""

from __future__ import annotations

import html
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from flask_login import LoginManager, UserMixin, current_user, login_user
from reliability_support import record_figures

from flask_mmolove import MMOLove, build_body
from flask_mmolove.dashboard import BLUEPRINT_NAME, init_dashboard

SECRET = "dash-canary-" + secrets.token_hex(8)
FIELD = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]+)"')


class User(UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id
        self.is_admin = user_id.startswith("admin")


@pytest.fixture
def sandbox(mmolove_sandbox_factory: Callable[..., Any]) -> Any:
    return mmolove_sandbox_factory(secret=SECRET)


@pytest.fixture
def make_portal(sandbox: Any, tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    made: list[tuple[MMOLove, Flask]] = []

    def factory(access_check: Any = "readme", *, flask_wtf: bool = False) -> Flask:
        app = Flask(__name__)
        app.config.update(
            SECRET_KEY="portal-" + secrets.token_hex(8),
            MMOLOVE_ENDPOINT=sandbox.endpoint,
            MMOLOVE_SERVER_ID=sandbox.server_id,
            MMOLOVE_REFERRAL_SECRET=sandbox.secret,
            MMOLOVE_DATABASE_URI=f"sqlite:///{tmp_path / f'outbox{len(made)}.sqlite3'}",
            MMOLOVE_DELIVERY="inline",
        )
        ext = MMOLove()
        ext.init_app(app)
        LoginManager(app).user_loader(User)

        @app.get("/login/<user_id>")
        def login(user_id: str) -> str:
            login_user(User(user_id))
            return "ok"

        if flask_wtf:
            from flask_wtf.csrf import CSRFProtect

            CSRFProtect(app)
        if access_check == "readme":

            def access_check() -> bool:
                return bool(current_user.is_authenticated and current_user.is_admin)

        init_dashboard(app, access_check=access_check)
        made.append((ext, app))
        return app

    yield factory
    for ext, app in made:
        ext.shutdown(app)


def dead_letter(app: Flask, sandbox: Any, identity: str) -> int:
    """An event MMOLove refused (404): the kind an operator retries."""
    outbox = app.extensions["mmolove"].outbox
    token = sandbox.mint_token(identity)
    event_id: int = outbox.enqueue(
        event="registered",
        token=token,
        identity=identity,
        server_event_id=f"reg-{identity}",
        body=build_body(
            "registered",
            token=token,
            server_id=sandbox.server_id,
            server_event_id=f"reg-{identity}",
            referee_identity=identity,
        ),
    )
    sandbox.fail_next(1, status=404, body={"error": "unknown token", "echo": SECRET})
    app.extensions["mmolove"].deliverer.run_once(ids=[event_id])
    assert state_of(app, event_id) == "dead"
    return event_id


def state_of(app: Flask, event_id: int) -> str:
    event = app.extensions["mmolove"].outbox.get(event_id)
    assert event is not None
    return str(event.state)


def routes(app: Flask, event_id: int) -> list[tuple[str, str]]:
    """(method, URL) for every route of the dashboard blueprint."""
    out = []
    with app.test_request_context():
        for rule in app.url_map.iter_rules():
            if not rule.endpoint.startswith(BLUEPRINT_NAME + "."):
                continue
            values: dict[str, Any] = {}
            if "event_id" in rule.arguments:
                values["event_id"] = event_id
            if "filename" in rule.arguments:
                values["filename"] = "dashboard.css"
            url = rule.build(values, append_unknown=False)
            assert url is not None
            path = url[1] if isinstance(url, tuple) else url
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                out.append((method, path))
    assert len(out) >= 4, out
    return out


def client_as(app: Flask, user: str | None) -> FlaskClient:
    client = app.test_client()
    if user is not None:
        assert client.get(f"/login/{user}").status_code == 200
    return client


def form_token(client: FlaskClient, path: str = "/mmolove/") -> tuple[str, str]:
    page = client.get(path)
    assert page.status_code == 200
    match = FIELD.search(page.get_data(as_text=True))
    assert match, "no CSRF field on the page"
    return match.group(1), html.unescape(match.group(2))


@pytest.mark.parametrize(
    ("who", "check", "expected"),
    [
        ("anonymous", "readme", 403),
        ("player", "readme", 403),
        ("admin", None, 404),  # no access check given: as if not mounted
        ("admin", lambda: None, 403),  # a check that forgot to return
        ("admin", lambda: "yes", 403),  # truthy is not True
        ("admin", lambda: current_user, 403),  # a user object is not a verdict
        ("admin", lambda: 1, 403),
    ],
    ids=["anonymous", "player", "no-check", "none", "truthy-str", "user-object", "one"],
)
def test_no_route_lets_in_without_the_portals_access_check(
    make_portal: Callable[..., Flask], sandbox: Any, who: str, check: Any, expected: int
) -> None:
    app = make_portal(check)
    dead = dead_letter(app, sandbox, "d1")
    client = client_as(app, None if who == "anonymous" else f"{who}-1")
    checked = 0
    for method, path in routes(app, dead):
        response = client.open(path, method=method, data={"csrf_token": "x"})
        assert response.status_code == expected, (method, path, response.status_code)
        assert SECRET not in response.get_data(as_text=True)
        checked += 1
    # Nothing any of them posted changed anything.
    assert state_of(app, dead) == "dead"
    assert [r.status for r in sandbox.events] == [404]
    if who == "anonymous":
        record_figures("14 dashboard access", routes_checked=checked, refused_with=expected)


def test_the_admin_gets_in_and_sees_no_secret(
    make_portal: Callable[..., Flask], sandbox: Any
) -> None:
    app = make_portal()
    dead = dead_letter(app, sandbox, "d2")
    client = client_as(app, "admin-1")
    for method, path in routes(app, dead):
        if method == "GET":
            with client.get(path) as page:
                assert page.status_code == 200, path
                assert SECRET not in page.get_data(as_text=True)


@pytest.mark.parametrize("csrf", ["own token", "flask-wtf"])
def test_retry_is_csrf_protected(
    make_portal: Callable[..., Flask], sandbox: Any, csrf: str
) -> None:
    app = make_portal(flask_wtf=csrf == "flask-wtf")
    dead = dead_letter(app, sandbox, "d3")
    admin = client_as(app, "admin-1")
    other_admin = client_as(app, "admin-2")
    name, token = form_token(admin, f"/mmolove/events/{dead}")
    _, foreign = form_token(other_admin)
    retry = f"/mmolove/events/{dead}/retry"
    forged: list[tuple[str, dict[str, Any]]] = [
        ("no token", {"data": {}}),
        ("empty token", {"data": {name: ""}}),
        ("random token", {"data": {name: secrets.token_urlsafe(32)}}),
        ("another operator's token", {"data": {name: foreign}}),
        ("token in the query string", {"query_string": {name: token}}),
        ("token as JSON", {"json": {name: token}}),
        ("token mangled", {"data": {name: token[:-2] + ("AA" if token[-2:] != "AA" else "BB")}}),
    ]
    refused = 0
    for what, kwargs in forged:
        for path in (retry, "/mmolove/retry-dead"):
            response = admin.post(path, **kwargs)
            assert response.status_code == 400, (what, path, response.status_code)
            refused += 1
    assert admin.get(retry).status_code == 405
    assert state_of(app, dead) == "dead"
    assert [r.status for r in sandbox.events] == [404]
    # With its own page's token, the operator's retry goes through and is delivered.
    response = admin.post(retry, data={name: token})
    assert response.status_code == 303
    assert state_of(app, dead) == "delivered"
    assert sandbox.accepted_count("registered") == 1
    record_figures(f"14 dashboard CSRF ({csrf})", forged_posts_refused=refused, genuine=1)
