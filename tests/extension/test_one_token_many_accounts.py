"""Issue 15, proof 6: one share-link token replayed on three new accounts is one MMOLove
referral, credited once, against a live sandbox.

The first account is bound and reported; the others are logged, not bound, their
``registered`` never sent, their milestones not referred (a milestone in the very
registration request included), and every one of their requests succeeds. Standalone
and with ``db=`` (the portal's transaction is never spoilt by the refusal), and with the
registrations racing in threads (SQLite and PostgreSQL).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from portal import Recorder
from test_portal_transaction import build

from flask_mmolove import player_qualified, referral_registered, set_referee


def _bindings(app: Flask) -> list[tuple[str, str]]:
    outbox = app.extensions["mmolove"].outbox
    b = outbox.bindings
    with outbox.engine.connect() as conn:
        return [(str(i), str(t)) for i, t in conn.execute(sa.select(b.c.identity, b.c.token))]


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and "was not bound" in record.getMessage()
    ]


def test_one_token_on_three_accounts_is_one_referral_credited_once(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_portal()
    recorder = Recorder(app)
    token = mmolove_sandbox.mint_token("farmer")
    caplog.set_level(logging.INFO, logger="flask_mmolove")
    for name in ("main", "alt-1", "alt-2"):
        browser = app.test_client()  # a browser of its own: the link replayed
        browser.get(f"/register?mmref={token}")
        assert browser.post("/register", data={"name": name}).status_code == 302
        # Spent either way: not pending in that browser any more.
        assert browser.get("/page").json == {"mmref": None}
    assert mmolove_sandbox.accepted_count("registered") == 1
    assert [r["identity"] for r in recorder.registered] == ["1000"]
    assert _bindings(app) == [("1000", token)]
    refusals = _refusals(caplog)
    assert len(refusals) == 2
    assert "'1001'" in refusals[0]
    assert "'1002'" in refusals[1]
    assert token not in caplog.text or len(token) <= 12  # named by its start only

    for user_id in ("1001", "1002", "1000"):
        assert app.test_client().post(f"/play/{user_id}").status_code == 200
    assert mmolove_sandbox.accepted_count("qualified") == 1
    assert [c["identity"] for c in recorder.credited] == ["1000"]
    recorder.disconnect()


def test_an_alts_milestone_in_its_registration_request_is_not_referred(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    """Standalone, a request's binding is written after its response: a milestone in
    the same request must not take the token before the binding is known."""
    app = make_portal()

    @app.post("/register-and-play")
    @referral_registered
    def register_and_play() -> Any:
        set_referee(request.form["id"])
        player_qualified.send(app, identity=request.form["id"])
        return "created", 201

    recorder = Recorder(app)
    token = mmolove_sandbox.mint_token("farmer")
    first = app.test_client()
    first.get(f"/register?mmref={token}")
    assert first.post("/register", data={"name": "main"}).status_code == 302
    alt = app.test_client()
    alt.get(f"/page?mmref={token}")
    assert alt.post("/register-and-play", data={"id": "alt"}).status_code == 201
    assert mmolove_sandbox.accepted_count("qualified") == 0
    assert recorder.credited == []
    assert app.extensions["mmolove"].outbox.stats().pending == 0
    assert app.test_client().post("/play/1000").status_code == 200
    assert [c["identity"] for c in recorder.credited] == ["1000"]
    recorder.disconnect()


# --- with db=: in the portal's transaction ---------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_portal(
    request: pytest.FixtureRequest, portal_config: dict[str, Any], tmp_path: Path
) -> Iterator[tuple[Flask, SQLAlchemy, type]]:
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'portal.sqlite3'}"
    else:
        uri = str(request.getfixturevalue("pg_uri"))
    app, db, ext, user = build(portal_config, uri)
    yield app, db, user
    ext.shutdown(app)
    with app.app_context():
        db.drop_all()
        db.engine.dispose()


def _names(app: Flask, db: SQLAlchemy, user: type) -> list[str]:
    with app.app_context():
        return sorted(u.name for u in db.session.scalars(sa.select(user)))


def test_with_db_one_token_on_three_accounts_commits_them_all_and_credits_once(
    db_portal: tuple[Flask, SQLAlchemy, type],
    mmolove_sandbox: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, db, user = db_portal
    recorder = Recorder(app)
    token = mmolove_sandbox.mint_token("farmer")
    caplog.set_level(logging.INFO, logger="flask_mmolove")
    for name in ("main", "alt-1", "alt-2"):
        browser = app.test_client()
        browser.get(f"/register?mmref={token}")
        # The alts reach the milestone in the registration request itself.
        data = {"name": name, **({"play": "1"} if name != "main" else {})}
        assert browser.post("/register", data=data).status_code == 201
    # Every account committed: the refused binding did not spoil the transaction.
    assert _names(app, db, user) == ["alt-1", "alt-2", "main"]
    [(referee, bound)] = _bindings(app)
    assert bound == token
    assert len(_refusals(caplog)) == 2
    assert mmolove_sandbox.accepted_count("registered") == 1
    assert mmolove_sandbox.accepted_count("qualified") == 0
    for user_id in ("2", "3", referee):
        assert app.test_client().post(f"/play/{user_id}").status_code == 200
    assert mmolove_sandbox.accepted_count("qualified") == 1
    credited = [c["identity"] for c in recorder.credited]
    assert credited == [referee]
    recorder.disconnect()


def test_with_db_concurrent_registrations_on_one_token_bind_one_account(
    db_portal: tuple[Flask, SQLAlchemy, type], mmolove_sandbox: Any
) -> None:
    app, db, user = db_portal
    token = mmolove_sandbox.mint_token("farmer")
    browsers = [app.test_client() for _ in range(4)]
    for browser in browsers:
        browser.get(f"/register?mmref={token}")
    start = threading.Barrier(len(browsers))
    statuses: list[int] = []
    errors: list[BaseException] = []

    def register(browser: Any, name: str) -> None:
        start.wait()
        try:
            statuses.append(browser.post("/register", data={"name": name}).status_code)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=register, args=(browser, f"acct-{i}"))
        for i, browser in enumerate(browsers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert statuses == [201] * len(browsers)
    assert len(_names(app, db, user)) == len(browsers)
    assert len(_bindings(app)) == 1
    assert mmolove_sandbox.accepted_count("registered") == 1


def test_standalone_concurrent_registrations_on_one_token_bind_one_account(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    app = make_portal()
    token = mmolove_sandbox.mint_token("farmer")
    browsers = [app.test_client() for _ in range(4)]
    for browser in browsers:
        browser.get(f"/register?mmref={token}")
    start = threading.Barrier(len(browsers))
    statuses: list[int] = []

    def register(browser: Any, i: int) -> None:
        start.wait()
        statuses.append(browser.post("/register-async", data={"id": f"acct-{i}"}).status_code)

    threads = [threading.Thread(target=register, args=(b, i)) for i, b in enumerate(browsers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [201] * len(browsers)
    assert len(_bindings(app)) == 1
    assert mmolove_sandbox.accepted_count("registered") == 1
