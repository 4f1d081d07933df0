"""flask_mmolove.dashboard: access, what it shows, retry and its CSRF check, no secret."""

from __future__ import annotations

import html
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import markupsafe
import pytest
from flask import Flask, abort, redirect
from flask.testing import FlaskClient
from flask_wtf.csrf import CSRFProtect

from flask_mmolove import MMOLove, build_body
from flask_mmolove.dashboard import create_dashboard_blueprint, init_dashboard

SECRET = "s3cr<t&\"'>-dashboard-" + "9f2c1e"
TOKEN_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')

Allowed = Callable[[], bool]


def allow() -> bool:
    return True


@pytest.fixture
def sandbox(mmolove_sandbox_factory: Callable[..., Any]) -> Any:
    # HTML- and JSON-special characters: an escaped copy must not slip through either.
    return mmolove_sandbox_factory(secret=SECRET)


@pytest.fixture
def make_app(sandbox: Any, tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    made: list[tuple[MMOLove, Flask]] = []

    def factory(check: Allowed | None = allow, *, flask_wtf: bool = False, **config: Any) -> Flask:
        app = Flask(__name__)
        app.config.update(
            {
                "SECRET_KEY": "dashboard-tests",
                "MMOLOVE_ENDPOINT": sandbox.endpoint,
                "MMOLOVE_SERVER_ID": sandbox.server_id,
                "MMOLOVE_REFERRAL_SECRET": sandbox.secret,
                "MMOLOVE_DATABASE_URI": f"sqlite:///{tmp_path / f'outbox{len(made)}.sqlite3'}",
                "MMOLOVE_DELIVERY": "inline",
                "MMOLOVE_RETRY_BASE": 0.05,
                "MMOLOVE_RETRY_CAP": 0.1,
                "MMOLOVE_POLL_INTERVAL": 0.1,
                **config,
            }
        )
        ext = MMOLove()
        ext.init_app(app)
        if flask_wtf:
            CSRFProtect(app)
        init_dashboard(app, access_check=check)
        made.append((ext, app))
        return app

    yield factory
    for ext, app in made:
        ext.shutdown(app)


def enqueue(app: Flask, sandbox: Any, identity: str) -> int:
    outbox = app.extensions["mmolove"].outbox
    token = sandbox.mint_token("friend")
    body = build_body(
        "registered",
        token=token,
        server_id=sandbox.server_id,
        server_event_id=f"reg-{identity}",
        referee_identity=identity,
    )
    event_id: int = outbox.enqueue(
        event="registered",
        token=token,
        identity=identity,
        server_event_id=f"reg-{identity}",
        body=body,
    )
    return event_id


def deliver(app: Flask, event_id: int) -> Any:
    state = app.extensions["mmolove"]
    state.deliverer.run_once(ids=[event_id])
    return state.outbox.get(event_id)


def dead_letter(app: Flask, sandbox: Any, identity: str = "1001") -> int:
    """An event MMOLove refused with a 400 whose answer echoes the secret."""
    event_id = enqueue(app, sandbox, identity)
    sandbox.fail_next(1, 400, body={"error": "token is malformed", "echo": SECRET})
    assert deliver(app, event_id).state == "dead"
    return event_id


def csrf_from(client: FlaskClient, path: str = "/mmolove/") -> str:
    page = client.get(path)
    assert page.status_code == 200
    match = TOKEN_FIELD.search(page.get_data(as_text=True))
    assert match, "no CSRF field on the page"
    return html.unescape(match.group(1))


def state_of(app: Flask, event_id: int) -> str:
    event = app.extensions["mmolove"].outbox.get(event_id)
    assert event is not None
    return str(event.state)


PAGES = ["/mmolove/", "/mmolove/?state=dead", "/mmolove/events/1", "/mmolove/static/dashboard.css"]
POSTS = ["/mmolove/events/1/retry", "/mmolove/retry-dead"]


def test_without_an_access_check_every_page_is_404(
    make_app: Callable[..., Flask], sandbox: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="flask_mmolove"):
        app = make_app(None)
    assert "without an access_check" in caplog.text
    dead_letter(app, sandbox)
    client = app.test_client()
    for path in PAGES:
        assert client.get(path).status_code == 404, path
    for path in POSTS:
        assert client.post(path).status_code == 404, path
    assert state_of(app, 1) == "dead"


@pytest.mark.parametrize("answer", [False, None, 1, "yes", object()])
def test_denied_unless_the_check_returns_true(
    make_app: Callable[..., Flask], sandbox: Any, answer: Any
) -> None:
    app = make_app(lambda: answer)
    dead_letter(app, sandbox)
    client = app.test_client()
    for path in PAGES:
        assert client.get(path).status_code == 403, path
    for path in POSTS:
        assert client.post(path).status_code == 403, path
    assert state_of(app, 1) == "dead"


def test_the_check_may_redirect_to_a_login_page(make_app: Callable[..., Flask]) -> None:
    def to_login() -> bool:
        abort(redirect("/login"))

    page = make_app(to_login).test_client().get("/mmolove/")
    assert page.status_code == 302
    assert page.headers["Location"] == "/login"


def test_the_check_runs_per_request(make_app: Callable[..., Flask]) -> None:
    allowed = [False]
    client = make_app(lambda: allowed[0]).test_client()
    assert client.get("/mmolove/").status_code == 403
    allowed[0] = True
    assert client.get("/mmolove/").status_code == 200


def test_access_check_must_be_callable() -> None:
    with pytest.raises(TypeError, match="access_check"):
        create_dashboard_blueprint(True)  # type: ignore[arg-type]


def test_init_dashboard_needs_the_extension() -> None:
    with pytest.raises(RuntimeError, match="init_app"):
        init_dashboard(Flask(__name__), access_check=allow)


def test_shows_pending_delivered_and_dead_events(
    make_app: Callable[..., Flask], sandbox: Any
) -> None:
    app = make_app()
    dead = dead_letter(app, sandbox, "1001")
    delivered = enqueue(app, sandbox, "1002")
    assert deliver(app, delivered).state == "delivered"
    retrying = enqueue(app, sandbox, "1003")
    sandbox.fail_next(1, 503, body={"error": "maintenance"})
    assert deliver(app, retrying).state == "pending"

    client = app.test_client()
    page = client.get("/mmolove/").get_data(as_text=True)
    assert 'Dead letters <span class="count bad">1</span>' in page
    assert 'Delivered <span class="count">1</span>' in page
    assert 'Pending <span class="count">1</span>' in page
    rows = re.findall(r"<tr class=\"state-([a-z-]+)\">(.*?)</tr>", page, re.S)
    assert [state for state, _ in rows] == ["pending", "delivered", "dead"]
    pending_row, delivered_row, dead_row = (row for _, row in rows)
    assert "503" in pending_row
    assert "maintenance" in pending_row
    assert "reg-1003" in pending_row
    assert "400" in dead_row
    assert "token is malformed" in dead_row
    assert "Retry event" in dead_row
    assert "Retry event" not in delivered_row + pending_row
    # Attempts: one each.
    assert all(re.search(r"<td>1</td>", row) for _, row in rows)

    only_dead = client.get("/mmolove/?state=dead").get_data(as_text=True)
    assert "reg-1001" in only_dead
    assert "reg-1002" not in only_dead
    assert "reg-1003" not in only_dead
    # An unknown filter shows everything rather than failing.
    assert "reg-1002" in client.get("/mmolove/?state=bogus").get_data(as_text=True)

    detail = client.get(f"/mmolove/events/{dead}").get_data(as_text=True)
    assert "Event #1: registered" in detail
    assert "&#34;referee_identity&#34;: &#34;1001&#34;" in detail
    assert client.get("/mmolove/events/999").status_code == 404


def test_pages_are_not_cached_or_framed(make_app: Callable[..., Flask]) -> None:
    page = make_app().test_client().get("/mmolove/")
    assert page.headers["Cache-Control"] == "no-store"
    assert page.headers["X-Frame-Options"] == "DENY"


def test_retry_requeues_a_dead_letter(make_app: Callable[..., Flask], sandbox: Any) -> None:
    app = make_app()
    event_id = dead_letter(app, sandbox)
    client = app.test_client()
    token = csrf_from(client)
    answer = client.post(
        f"/mmolove/events/{event_id}/retry", data={"csrf_token": token, "state": "dead"}
    )
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/mmolove/?state=dead"
    # Inline delivery: the requeued event went out before the answer.
    assert state_of(app, event_id) == "delivered"
    assert sandbox.accepted_count("registered") == 1
    page = client.get("/mmolove/").get_data(as_text=True)
    assert f"Event #{event_id} is queued to be sent again." in page


def test_retry_from_the_event_page_returns_there(
    make_app: Callable[..., Flask], sandbox: Any
) -> None:
    app = make_app()
    event_id = dead_letter(app, sandbox)
    client = app.test_client()
    token = csrf_from(client, f"/mmolove/events/{event_id}")
    answer = client.post(
        f"/mmolove/events/{event_id}/retry", data={"csrf_token": token, "back": "event"}
    )
    assert answer.headers["Location"] == f"/mmolove/events/{event_id}"


def test_retry_in_thread_mode_wakes_the_delivery_thread(
    make_app: Callable[..., Flask], sandbox: Any
) -> None:
    app = make_app(MMOLOVE_DELIVERY="thread", MMOLOVE_POLL_INTERVAL=30.0)
    event_id = dead_letter(app, sandbox)
    client = app.test_client()
    client.post(f"/mmolove/events/{event_id}/retry", data={"csrf_token": csrf_from(client)})
    deadline = time.monotonic() + 10
    while state_of(app, event_id) != "delivered" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state_of(app, event_id) == "delivered"


def test_retry_all_dead_letters(make_app: Callable[..., Flask], sandbox: Any) -> None:
    app = make_app()
    first = dead_letter(app, sandbox, "1001")
    second = dead_letter(app, sandbox, "1002")
    client = app.test_client()
    page = client.get("/mmolove/").get_data(as_text=True)
    assert "Retry all 2 dead letter(s)" in page
    client.post("/mmolove/retry-dead", data={"csrf_token": csrf_from(client)})
    assert state_of(app, first) == state_of(app, second) == "delivered"


def test_retry_of_a_delivered_event_changes_nothing(
    make_app: Callable[..., Flask], sandbox: Any
) -> None:
    app = make_app()
    event_id = enqueue(app, sandbox, "1001")
    deliver(app, event_id)
    dead_letter(app, sandbox, "1002")  # so that the page has a form, and a token
    client = app.test_client()
    client.post(f"/mmolove/events/{event_id}/retry", data={"csrf_token": csrf_from(client)})
    assert state_of(app, event_id) == "delivered"
    assert "is delivered, not dead" in client.get("/mmolove/").get_data(as_text=True)
    assert sandbox.accepted_count("registered") == 1


@pytest.mark.parametrize("flask_wtf", [False, True], ids=["own-token", "flask-wtf"])
def test_retry_without_a_valid_csrf_token_is_refused(
    make_app: Callable[..., Flask], sandbox: Any, flask_wtf: bool
) -> None:
    app = make_app(flask_wtf=flask_wtf)
    event_id = dead_letter(app, sandbox)
    client = app.test_client()
    good = csrf_from(client)
    url = f"/mmolove/events/{event_id}/retry"
    assert client.post(url).status_code == 400
    assert client.post(url, data={"csrf_token": ""}).status_code == 400
    assert client.post(url, data={"csrf_token": good[:-2] + "xx"}).status_code == 400
    assert client.post("/mmolove/retry-dead").status_code == 400
    # A token is bound to the session it was given to.
    stranger = app.test_client()
    stranger.get("/mmolove/")
    assert stranger.post(url, data={"csrf_token": good}).status_code == 400
    assert state_of(app, event_id) == "dead"
    assert client.post(url, data={"csrf_token": good}).status_code == 303
    assert state_of(app, event_id) == "delivered"


def test_flask_wtf_switched_off_still_leaves_retry_guarded(
    make_app: Callable[..., Flask], sandbox: Any
) -> None:
    app = make_app(flask_wtf=True, WTF_CSRF_ENABLED=False)
    event_id = dead_letter(app, sandbox)
    client = app.test_client()
    url = f"/mmolove/events/{event_id}/retry"
    assert client.post(url).status_code == 400
    assert client.post(url, data={"csrf_token": csrf_from(client)}).status_code == 303


def test_flask_wtf_exemption_does_not_unguard_retry(
    make_app: Callable[..., Flask], sandbox: Any
) -> None:
    app = make_app(flask_wtf=True)
    app.extensions["csrf"].exempt(app.blueprints["mmolove_dashboard"])
    event_id = dead_letter(app, sandbox)
    assert app.test_client().post(f"/mmolove/events/{event_id}/retry").status_code == 400
    assert state_of(app, event_id) == "dead"


def test_own_token_needs_a_secret_key(make_app: Callable[..., Flask], sandbox: Any) -> None:
    app = make_app(SECRET_KEY=None, TESTING=True)
    dead_letter(app, sandbox)
    with pytest.raises(RuntimeError, match="SECRET_KEY"):
        app.test_client().get("/mmolove/")


def test_the_secret_never_appears(make_app: Callable[..., Flask], sandbox: Any) -> None:
    app = make_app(flask_wtf=True)
    dead = dead_letter(app, sandbox)
    outbox = app.extensions["mmolove"].outbox
    # Delivery already scrubs an echoed secret before storing it; put one back by hand
    # to prove the dashboard's own scrubbing too.
    assert json.dumps(SECRET)[1:-1] not in (outbox.get(dead).last_error or "")
    with outbox.engine.begin() as conn:
        conn.execute(
            outbox.events.update()
            .where(outbox.events.c.id == dead)
            .values(last_error=json.dumps({"error": "bad key", "echo": SECRET}))
        )
    stored = outbox.get(dead).last_error
    assert json.dumps(SECRET)[1:-1] in stored, "the test needs an answer that echoes it"
    delivered = enqueue(app, sandbox, "1002")
    deliver(app, delivered)
    client = app.test_client()
    forms = {
        SECRET,
        html.escape(SECRET),
        str(markupsafe.escape(SECRET)),
        json.dumps(SECRET)[1:-1],
        html.escape(json.dumps(SECRET)[1:-1]),
        str(markupsafe.escape(json.dumps(SECRET)[1:-1])),
    }
    pages = [
        *PAGES,
        "/mmolove/?state=pending",
        "/mmolove/?state=delivered",
        f"/mmolove/events/{dead}",
        f"/mmolove/events/{delivered}",
        "/mmolove/events/999",
    ]
    for path in pages:
        with client.get(path) as page:
            text = page.get_data(as_text=True)
        for form in forms:
            assert form not in text, path
    assert "[redacted]" in client.get(f"/mmolove/events/{dead}").get_data(as_text=True)
    retried = client.post(
        f"/mmolove/events/{dead}/retry",
        data={"csrf_token": csrf_from(client)},
        follow_redirects=True,
    )
    assert all(form not in retried.get_data(as_text=True) for form in forms)


def test_a_disabled_extension_is_said_so(make_app: Callable[..., Flask]) -> None:
    client = make_app(MMOLOVE_ENABLED=False).test_client()
    assert "switched off" in client.get("/mmolove/").get_data(as_text=True)
    assert client.get("/mmolove/events/1").status_code == 404


def test_a_custom_prefix_and_name(sandbox: Any, tmp_path: Path) -> None:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="x",
        MMOLOVE_ENDPOINT=sandbox.endpoint,
        MMOLOVE_SERVER_ID=sandbox.server_id,
        MMOLOVE_REFERRAL_SECRET=sandbox.secret,
        MMOLOVE_DATABASE_URI=f"sqlite:///{tmp_path / 'o.sqlite3'}",
        MMOLOVE_DELIVERY="worker",
    )
    ext = MMOLove(app)
    try:
        app.register_blueprint(
            create_dashboard_blueprint(allow, url_prefix="/ops/referrals", name="referrals")
        )
        page = app.test_client().get("/ops/referrals/")
        assert page.status_code == 200
        assert "/ops/referrals/static/dashboard.css" in page.get_data(as_text=True)
    finally:
        ext.shutdown(app)


@pytest.mark.parametrize(
    "page",
    [
        str(10**400),
        str(2**63 - 1),
        str(2**63),
        str(2**63 // 50 + 1),
        "99999999999999999999",
        "-1",
        "-" + str(10**400),
        "0",
        "abc",
        "1e9",
        "",
        "1" * 5000,
        "\u0663",
        "1_000",
        "NaN",
    ],
)
def test_any_page_value_answers_without_an_error(
    make_app: Callable[..., Flask], sandbox: Any, page: str
) -> None:
    app = make_app()
    enqueue(app, sandbox, "1001")
    client = app.test_client()
    for state in ("", "dead"):
        response = client.get("/mmolove/", query_string={"page": page, "state": state})
        assert response.status_code == 200, response.get_data(as_text=True)[:500]
