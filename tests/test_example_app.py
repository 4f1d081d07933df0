"""The demo portal through its app factory and Flask's test client (no browser)."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, text
from support import wait_for

from example_app import create_app
from example_app.demo import DemoServer, ensure_admin, main
from example_app.extensions import db, mmolove
from example_app.models import Reward, User
from flask_mmolove import referrer_credited

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_token(html: str) -> str:
    match = CSRF.search(html)
    assert match, "the page has no CSRF token"
    return match.group(1)


def accepted(sandbox: Any, event: str) -> list[Any]:
    return [r for r in sandbox.events if r.event == event and r.status == 200]


@pytest.fixture
def make_portal(mmolove_sandbox: Any, tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    made: list[Flask] = []

    def factory(**overrides: Any) -> Flask:
        config = {
            "SECRET_KEY": "test-only",
            "MMOLOVE_ENDPOINT": mmolove_sandbox.endpoint,
            "MMOLOVE_SERVER_ID": mmolove_sandbox.server_id,
            "MMOLOVE_REFERRAL_SECRET": mmolove_sandbox.secret,
            # Inline: every event is delivered before the request returns.
            "MMOLOVE_DELIVERY": "inline",
            **overrides,
        }
        app = create_app(config, instance_path=str(tmp_path / f"instance{len(made)}"))
        made.append(app)
        return app

    yield factory
    for app in made:
        mmolove.shutdown(app)
        with app.app_context():
            db.engine.dispose()


@pytest.fixture
def portal(make_portal: Callable[..., Flask]) -> Flask:
    return make_portal()


def register(client: FlaskClient, name: str, *, landing: str = "/register") -> Any:
    page = client.get(landing)
    assert page.status_code == 200
    return client.post(
        "/register",
        data={
            "csrf_token": csrf_token(page.get_data(as_text=True)),
            "username": name,
            "password": PASSWORD,
            "confirm": PASSWORD,
        },
    )


def login(client: FlaskClient, name: str, password: str = PASSWORD) -> Any:
    page = client.get("/login")
    return client.post(
        "/login",
        data={
            "csrf_token": csrf_token(page.get_data(as_text=True)),
            "username": name,
            "password": password,
        },
    )


def logout(client: FlaskClient) -> None:
    page = client.get("/")
    client.post("/logout", data={"csrf_token": csrf_token(page.get_data(as_text=True))})


def quest(client: FlaskClient) -> Any:
    page = client.get("/play")
    return client.post("/play", data={"csrf_token": csrf_token(page.get_data(as_text=True))})


def user(app: Flask, name: str) -> User:
    with app.app_context():
        found = db.session.execute(select(User).where(User.username == name)).scalar_one()
        db.session.expunge(found)
        return found


def rewards(app: Flask) -> list[tuple[int, int | None, int]]:
    with app.app_context():
        rows = db.session.execute(select(Reward.referee_id, Reward.referrer_id, Reward.gold))
        return [tuple(row) for row in rows]  # type: ignore[misc]


def referred_player(app: Flask, sandbox: Any) -> tuple[User, User, FlaskClient]:
    """Ayla registers and shares her link; Bram registers through it."""
    ayla_client = app.test_client()
    assert register(ayla_client, "ayla").status_code == 303
    ayla = user(app, "ayla")
    bram_client = app.test_client()
    token = sandbox.mint_token(ayla.share_code)
    created = register(bram_client, "bram", landing=f"/register?mmref={token}")
    assert created.status_code == 303
    return ayla, user(app, "bram"), bram_client


def test_register_with_token_sends_registered(portal: Flask, mmolove_sandbox: Any) -> None:
    client = portal.test_client()
    token = mmolove_sandbox.mint_token("somecode")
    landing = client.get(f"/register?mmref={token}")
    assert "You were invited by a friend" in landing.get_data(as_text=True)

    created = register(client, "bram", landing="/register")
    assert created.status_code == 303
    assert created.headers["Location"].endswith("/play")
    bram = user(portal, "bram")
    [reg] = accepted(mmolove_sandbox, "registered")
    body = json.loads(reg.body)
    assert body["token"] == token
    assert body["referee_identity"] == str(bram.id)
    assert body["server_event_id"] == f"reg-{bram.id}"
    # Bound and forgotten: the next visitor of /register in this browser is not invited.
    logout(client)
    assert "invited" not in client.get("/register").get_data(as_text=True)


def test_register_without_token_sends_nothing(portal: Flask, mmolove_sandbox: Any) -> None:
    client = portal.test_client()
    assert "invited" not in client.get("/register").get_data(as_text=True)
    assert register(client, "solo").status_code == 303
    for _ in range(4):
        quest(client)
    assert user(portal, "solo").level == 3
    assert mmolove_sandbox.events == []
    assert rewards(portal) == []


def test_invalid_form_is_422_sends_nothing_and_keeps_the_token(
    portal: Flask, mmolove_sandbox: Any
) -> None:
    client = portal.test_client()
    token = mmolove_sandbox.mint_token("code")
    page = client.get(f"/register?mmref={token}").get_data(as_text=True)
    bad = client.post(
        "/register",
        data={"csrf_token": csrf_token(page), "username": "x", "password": "short", "confirm": ""},
    )
    assert bad.status_code == 422
    html = bad.get_data(as_text=True)
    assert 'aria-invalid="true"' in html
    assert "You were invited by a friend" in html
    assert mmolove_sandbox.events == []
    assert register(client, "bram").status_code == 303
    assert len(accepted(mmolove_sandbox, "registered")) == 1


def test_taken_name_is_refused(portal: Flask) -> None:
    assert register(portal.test_client(), "ayla").status_code == 303
    again = register(portal.test_client(), "ayla")
    assert again.status_code == 422
    assert "That name is taken." in again.get_data(as_text=True)


def test_milestone_sends_qualified_and_rewards_the_referrer(
    portal: Flask, mmolove_sandbox: Any
) -> None:
    ayla, bram, client = referred_player(portal, mmolove_sandbox)
    for _ in range(3):
        quest(client)
    assert user(portal, "bram").level == 2
    assert accepted(mmolove_sandbox, "qualified") == []

    reached = quest(client)
    assert reached.status_code == 303
    assert user(portal, "bram").level == 3
    [qual] = accepted(mmolove_sandbox, "qualified")
    assert json.loads(qual.body)["server_event_id"] == f"qual-{bram.id}"
    assert rewards(portal) == [(bram.id, ayla.id, 500)]
    assert user(portal, "ayla").gold == 500

    ayla_client = portal.test_client()
    login(ayla_client, "ayla")
    page = ayla_client.get("/rewards").get_data(as_text=True)
    assert "bram" in page
    assert "500 gold" in page


def test_reward_is_granted_exactly_once(portal: Flask, mmolove_sandbox: Any) -> None:
    ayla, bram, client = referred_player(portal, mmolove_sandbox)
    for _ in range(8):
        quest(client)
    assert user(portal, "bram").level == 5
    assert len(accepted(mmolove_sandbox, "qualified")) == 1
    # The grant committed with the credit's record (db= mode): later passes find
    # nothing left to announce, and the demo needs no check of its own.
    assert portal.extensions["mmolove"].deliverer.notify_credits() == 0
    assert rewards(portal) == [(bram.id, ayla.id, 500)]
    assert user(portal, "ayla").gold == 500


def test_a_grant_that_fails_is_rolled_back_and_granted_once_later(
    portal: Flask, mmolove_sandbox: Any
) -> None:
    failures = {"left": 1}

    @referrer_credited.connect_via(portal)
    def game_server_down(sender: Flask, **kwargs: Any) -> None:
        # Connected after the demo's grant: it runs once the reward is added and fails.
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("the game server did not answer")

    ayla, bram, client = referred_player(portal, mmolove_sandbox)
    for _ in range(8):
        quest(client)
    assert rewards(portal) == []
    assert user(portal, "ayla").gold == 0
    with portal.app_context():
        db.session.execute(text("UPDATE mmolove_credits SET next_attempt_at = 0"))
        db.session.commit()
    assert portal.extensions["mmolove"].deliverer.notify_credits() == 1
    assert portal.extensions["mmolove"].deliverer.notify_credits() == 0
    assert rewards(portal) == [(bram.id, ayla.id, 500)]
    assert user(portal, "ayla").gold == 500


def test_dry_runs_grant_no_reward(make_portal: Callable[..., Flask], mmolove_sandbox: Any) -> None:
    app = make_portal(MMOLOVE_TEST_MODE=True)
    _, _, client = referred_player(app, mmolove_sandbox)
    for _ in range(4):
        quest(client)
    assert [r.verdict for r in mmolove_sandbox.events] == ["test", "test"]
    assert rewards(app) == []


def test_a_signed_in_player_following_a_share_link_is_not_a_referee(
    portal: Flask, mmolove_sandbox: Any
) -> None:
    client = portal.test_client()
    register(client, "ayla")
    token = mmolove_sandbox.mint_token("friend")
    page = client.get(f"/register?mmref={token}")
    assert page.status_code == 403
    assert "already signed in" in page.get_data(as_text=True)
    assert mmolove_sandbox.events == []


def test_forms_refuse_a_missing_csrf_token(portal: Flask, mmolove_sandbox: Any) -> None:
    client = portal.test_client()
    token = mmolove_sandbox.mint_token("friend")
    client.get(f"/register?mmref={token}")
    form = {"username": "bram", "password": PASSWORD, "confirm": PASSWORD}
    refused = client.post("/register", data=form)
    assert refused.status_code == 400
    assert "too old" in refused.get_data(as_text=True)
    assert mmolove_sandbox.events == []
    register(client, "bram")
    assert client.post("/play").status_code == 400
    assert client.post("/logout").status_code == 400
    assert client.post("/login", data={"username": "bram", "password": PASSWORD}).status_code == 400
    assert user(portal, "bram").xp == 0


def test_login_rejects_a_wrong_password_and_open_redirects(portal: Flask) -> None:
    client = portal.test_client()
    register(client, "ayla")
    logout(client)
    assert login(client, "ayla", "wrong password").status_code == 401
    page = client.get("/login?next=//evil.example/").get_data(as_text=True)
    assert "evil.example" not in page
    assert login(client, "ayla").headers["Location"].endswith("/play")


#: Raw query strings for ``next=``: every way a browser could be led off the site.
HOSTILE_NEXT = [
    "//evil.example/",
    "/%09/evil.example",
    "/%0A/evil.example",
    "%0A",
    "/%0D%0A/evil.example",
    "%09//evil.example",
    "%20//evil.example",
    "/%5Cevil.example",
    "/%5C/evil.example",
    "%5C%5Cevil.example",
    "/%5C%5Cevil.example",
    "%2F%2Fevil.example",
    "/%2F/evil.example",
    "https://evil.example/",
    "HTTPS://evil.example/",
    "https:evil.example",
    "https:/evil.example",
    "javascript:alert(1)",
    "/%00/evil.example",
    "/%E3%80%80/evil.example",
    "%EF%BC%8F%EF%BC%8Fevil.example",
    "/%252F%252Fevil.example",
    "/%2509/evil.example",
    "/ /evil.example",
]


def _lands_on_the_site(location: str) -> bool:
    """Where a browser goes: it drops tabs and line breaks anywhere in a URL, leading
    spaces and controls, and reads a backslash as a slash."""
    browser = re.sub(r"[\t\n\r]", "", location).lstrip("\x00 ").replace("\\", "/")
    parts = urlsplit(urljoin("http://localhost/login", browser))
    return parts.scheme == "http" and parts.netloc == "localhost"


def test_next_only_ever_stays_on_the_site(portal: Flask) -> None:
    client = portal.test_client()
    register(client, "ayla")
    logout(client)
    off_site = []
    for raw in HOSTILE_NEXT:
        page = client.get(f"/login?next={raw}")
        assert page.status_code == 200, raw
        value = unquote(raw)
        response = client.post(
            "/login",
            data={
                "csrf_token": csrf_token(page.get_data(as_text=True)),
                "username": "ayla",
                "password": PASSWORD,
                "next": value,
            },
        )
        assert response.status_code == 303, (raw, response.status_code)
        location = response.headers["Location"]
        if not _lands_on_the_site(location):
            off_site.append((raw, location))
        logout(client)
    assert off_site == []
    # A path of the site is kept, its query string included.
    page = client.get("/login?next=/rewards%3Ftab%3D1")
    response = client.post(
        "/login",
        data={
            "csrf_token": csrf_token(page.get_data(as_text=True)),
            "username": "ayla",
            "password": PASSWORD,
            "next": "/rewards?tab=1",
        },
    )
    assert response.headers["Location"] == "/rewards?tab=1"


def test_share_link_points_at_mmolove_with_the_players_code(
    portal: Flask, mmolove_sandbox: Any
) -> None:
    client = portal.test_client()
    register(client, "ayla")
    code = user(portal, "ayla").share_code
    page = client.get("/rewards").get_data(as_text=True)
    assert f"{mmolove_sandbox.url}/r/{mmolove_sandbox.server_id}?ref={code}" in page


def test_operator_view_is_for_the_admin_only(portal: Flask, mmolove_sandbox: Any) -> None:
    ensure_admin(portal, "admin-password")
    anonymous = portal.test_client()
    to_login = anonymous.get("/mmolove/")
    assert to_login.status_code == 302
    assert "/login?next=" in to_login.headers["Location"]

    player = portal.test_client()
    register(player, "ayla")
    assert player.get("/mmolove/").status_code == 403
    assert "Deliveries" not in player.get("/play").get_data(as_text=True)

    admin = portal.test_client()
    login(admin, "admin", "admin-password")
    page = admin.get("/mmolove/")
    assert page.status_code == 200
    assert "Referral deliveries" in page.get_data(as_text=True)
    assert mmolove_sandbox.secret not in page.get_data(as_text=True)


def test_the_demo_server_delivers_to_its_own_sandbox(tmp_path: Path) -> None:
    """Thread delivery POSTing to the very server that runs it, over real HTTP."""
    demo = DemoServer(port=0, instance_path=str(tmp_path), quiet=True, environ={}).start()
    try:
        http = requests.Session()
        share = f"{demo.url}/_mmolove/r/emberfall-demo?ref={demo.admin_code}"
        landing = http.get(share, timeout=5)
        assert landing.url.startswith(f"{demo.url}/register?mmref=")
        assert "You were invited by a friend" in landing.text
        created = http.post(
            f"{demo.url}/register",
            data={
                "csrf_token": csrf_token(landing.text),
                "username": "bram",
                "password": PASSWORD,
                "confirm": PASSWORD,
            },
            timeout=5,
        )
        assert created.url == f"{demo.url}/play"
        state = demo.sandbox_state
        wait_for(lambda: state.accepted_count("registered") == 1, what="registered")
        for _ in range(4):
            page = http.get(f"{demo.url}/play", timeout=5)
            http.post(f"{demo.url}/play", data={"csrf_token": csrf_token(page.text)}, timeout=5)
        wait_for(lambda: state.accepted_count("qualified") == 1, what="qualified")
        portal = demo.portal
        assert portal is not None
        expected = [(user(portal, "bram").id, user(portal, "admin").id, 500)]
        wait_for(lambda: rewards(portal) == expected, what="the reward")
        http.close()
    finally:
        demo.stop()


def test_external_endpoint_mode_reports_there(
    tmp_path: Path, mmolove_sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMOLOVE_ENDPOINT", mmolove_sandbox.endpoint)
    monkeypatch.setenv("MMOLOVE_SERVER_ID", mmolove_sandbox.server_id)
    monkeypatch.setenv("MMOLOVE_REFERRAL_SECRET", mmolove_sandbox.secret)
    demo = DemoServer(port=0, instance_path=str(tmp_path), quiet=True).start()
    try:
        assert demo.sandbox is None
        assert demo.portal is not None
        assert "reporting referrals to " + mmolove_sandbox.endpoint in demo.walkthrough()
        assert mmolove_sandbox.secret not in demo.walkthrough()
        assert requests.get(f"{demo.url}/_mmolove/log", timeout=5).status_code == 404
        client = demo.portal.test_client()
        token = mmolove_sandbox.mint_token(demo.admin_code)
        assert register(client, "bram", landing=f"/register?mmref={token}").status_code == 303
        wait_for(lambda: accepted(mmolove_sandbox, "registered"), what="registered")
    finally:
        demo.stop()


def test_external_endpoint_mode_needs_the_server_id_and_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MMOLOVE_SERVER_ID", raising=False)
    monkeypatch.delenv("MMOLOVE_REFERRAL_SECRET", raising=False)
    env = {
        "MMOLOVE_ENDPOINT": "http://127.0.0.1:9/api/referral/events",
        "PORT": "0",
        "DEMO_INSTANCE_PATH": str(tmp_path),
    }
    assert main(env) == 2
    assert "MMOLOVE_SERVER_ID is not set" in capsys.readouterr().err


def test_python_m_example_app_starts_on_a_fresh_instance(tmp_path: Path) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MMOLOVE_") and key not in ("HOST", "PORT", "SECRET_KEY")
    }
    env.update(PORT="0", DEMO_INSTANCE_PATH=str(tmp_path / "fresh"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "example_app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("Press Ctrl-C"):
                break
        output = "\n".join(lines)
        urls = re.findall(r"http://127\.0\.0\.1:\d+\S*", output)
        assert urls, output
        base = re.match(r"http://127\.0\.0\.1:\d+", urls[0])
        assert base is not None
        root = base.group(0)
        steps = [
            u for u in urls if u.startswith(root) and u not in (root + "/", root + "/_mmolove/")
        ]
        assert steps == [
            f"{root}/_mmolove/r/emberfall-demo?ref={steps[0].rsplit('=', 1)[1]}",
            f"{root}/_mmolove/log",
            f"{root}/play",
            f"{root}/_mmolove/log",
            f"{root}/login?next=/rewards",
            f"{root}/mmolove/",
            f"{root}/_mmolove/_hearts",  # the vote, as a curl command
        ], output
        assert re.search(r"Admin account: admin / \S+", output)
        landing = requests.get(steps[0], timeout=5)
        assert "You were invited by a friend" in landing.text
        assert (tmp_path / "fresh" / "portal.sqlite3").exists()
        # The referral tables live in the portal's own database (db=db).
        assert not (tmp_path / "fresh" / "mmolove.sqlite3").exists()
        with sqlite3.connect(tmp_path / "fresh" / "portal.sqlite3") as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert {"players", "mmolove_events", "mmolove_credits"} <= tables
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    assert proc.returncode == 0
