"""The reward-callback endpoint: a vote verified on its raw bytes, kept once per
``heart_id`` before the 2xx, announced once by ``heart_counted``; every other answer
the one MMOLove's retries need (401, 400, 413, 503), never a 500; test callbacks pay
nothing; Flask-WTF's CSRF check leaves it alone, whichever extension comes first."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_mmolove import MMOLove, heart_counted
from flask_mmolove.protocol import sign_heart_callback, sign_legacy_get, sign_referral_body

SECRET = "callback-secret-7d1e"
URL = "/mmolove/callback"


def _vote(heart_id: str | None = None, event: str = "heart.counted", **extra: Any) -> bytes:
    body = {
        "event": event,
        "server_id": "3f1c2a4e-0000-4000-8000-000000000001",
        "username": "Aria",
        "heart_id": heart_id or str(uuid.uuid4()),
        "period": "2026-11",
        "streak_day": 3,
        **extra,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _post(app: Flask, body: bytes, *, secret: str = SECRET, header: str | None = None) -> Any:
    event = json.loads(body).get("event", "heart.counted") if body[:1] == b"{" else "heart.counted"
    return app.test_client().post(
        URL,
        data=body,
        headers={
            "Content-Type": "application/json",
            "X-MMOLove-Event": event,
            "X-MMOLove-Signature": sign_heart_callback(secret, body) if header is None else header,
        },
    )


@pytest.fixture
def portal(make_portal: Callable[..., Flask]) -> Flask:
    return make_portal(MMOLOVE_DELIVERY="worker", MMOLOVE_CALLBACK_SECRET=SECRET)


def _announced(app: Flask) -> list[dict[str, Any]]:
    heard: list[dict[str, Any]] = []

    def receiver(sender: Flask, **kw: Any) -> None:
        heard.append(kw)

    heart_counted.connect(receiver, sender=app, weak=False)
    app.extensions["mmolove"].deliverer.run_once()
    app.extensions["mmolove"].deliverer.run_once()
    heart_counted.disconnect(receiver, sender=app)
    return heard


def test_a_vote_is_kept_answered_2xx_then_announced_once_with_every_field(portal: Flask) -> None:
    body = _vote(first_heart=True, loyalty_level=4)
    response = _post(portal, body)
    assert (response.status_code, response.json) == (200, {"ok": True, "duplicate": False})
    # MMOLove's retry of the same vote (its answer lost): 2xx, nothing new kept.
    again = _post(portal, body)
    assert (again.status_code, again.json) == (200, {"ok": True, "duplicate": True})
    [heard] = _announced(portal)
    assert heard["username"] == "Aria"
    assert heard["heart_id"] == json.loads(body)["heart_id"]
    assert heard["payload"] == json.loads(body)
    assert _announced(portal) == []
    stats = portal.extensions["mmolove"].outbox.heart_stats()
    assert (stats.received, stats.granted, stats.tests) == (1, 1, 0)


def test_a_receiver_that_fails_hears_the_vote_again_later(portal: Flask) -> None:
    _post(portal, _vote())
    calls: list[str] = []

    def flaky(sender: Flask, heart_id: str, **kw: Any) -> None:
        calls.append(heart_id)
        if len(calls) == 1:
            raise RuntimeError("the game server is down")

    heart_counted.connect(flaky, sender=portal, weak=False)
    try:
        deliverer = portal.extensions["mmolove"].deliverer
        assert deliverer.notify_hearts() == 0
        outbox = portal.extensions["mmolove"].outbox
        with outbox.engine.begin() as conn:  # due again now, not after the retry cap
            conn.execute(sa.update(outbox.hearts).values(next_attempt_at=0))
        assert deliverer.notify_hearts() == 1
        assert deliverer.notify_hearts() == 0
    finally:
        heart_counted.disconnect(flaky, sender=portal)
    assert len(calls) == 2
    assert calls[0] == calls[1]


def test_a_test_callback_answers_2xx_is_counted_and_pays_nothing(portal: Flask) -> None:
    zeros = "00000000-0000-0000-0000-000000000000"
    for _ in range(2):
        response = _post(portal, _vote(zeros, event="heart.test", username="test-user"))
        assert response.status_code == 200
    assert _announced(portal) == []
    stats = portal.extensions["mmolove"].outbox.heart_stats()
    assert (stats.received, stats.granted, stats.tests) == (0, 0, 2)


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (lambda body: sign_heart_callback("another-secret", body), 401),
        (lambda body: sign_heart_callback(SECRET, body, 1_000_000_000), 401),  # stale
        (lambda body: sign_referral_body(SECRET, body), 401),  # the Referral Kit's form
        (lambda body: "", 401),
        (lambda body: sign_heart_callback(SECRET, body + b" "), 401),  # body changed
    ],
)
def test_a_signature_that_does_not_verify_is_401_and_keeps_nothing(
    portal: Flask, header: Callable[[bytes], str], status: int
) -> None:
    body = _vote()
    response = _post(portal, body, header=header(body))
    assert response.status_code == status
    assert SECRET not in response.get_data(as_text=True)
    assert portal.extensions["mmolove"].outbox.heart_stats().received == 0


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"event":"heart.counted","username":"Aria"}',
        b'{"event":"heart.refund","server_id":"s","username":"u","heart_id":"h"}',
        b'{"event":"heart.counted","server_id":"s","username":"u","heart_id":"' + b"h" * 90 + b'"}',
        b"\xff" * 10,
        b"[" * 60_000,  # nested deeper than the parser goes: RecursionError
    ],
)
def test_a_signed_body_that_is_no_vote_is_400_never_500(portal: Flask, body: bytes) -> None:
    response = _post(portal, body)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert portal.extensions["mmolove"].outbox.heart_stats().received == 0


def test_a_body_no_vote_needs_is_413_unread(portal: Flask) -> None:
    body = _vote(padding="x" * 70_000)
    assert _post(portal, body).status_code == 413


def test_storage_failing_is_503_and_mmoloves_retry_succeeds(
    portal: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = portal.extensions["mmolove"].outbox
    outbox.hearts.drop(outbox.engine)
    body = _vote()
    with caplog.at_level(logging.ERROR, logger="flask_mmolove"):
        response = _post(portal, body)
    assert response.status_code == 503
    assert "could not be kept" in caplog.text
    outbox.hearts.create(outbox.engine)
    assert _post(portal, body).status_code == 200
    assert len(_announced(portal)) == 1


def test_both_secrets_verify_during_a_rotation(make_portal: Callable[..., Flask]) -> None:
    app = make_portal(MMOLOVE_DELIVERY="worker", MMOLOVE_CALLBACK_SECRET=["new-one", SECRET])
    assert _post(app, _vote(), secret=SECRET).status_code == 200
    assert _post(app, _vote(), secret="new-one").status_code == 200
    assert _post(app, _vote(), secret="retired").status_code == 401


def test_the_legacy_get_only_when_asked_for(make_portal: Callable[..., Flask]) -> None:
    query = sign_legacy_get(SECRET, "Aria")
    plain = make_portal(MMOLOVE_DELIVERY="worker", MMOLOVE_CALLBACK_SECRET=SECRET)
    assert plain.test_client().get(URL, query_string=query).status_code == 405
    legacy = make_portal(
        MMOLOVE_DELIVERY="worker",
        MMOLOVE_CALLBACK_SECRET=SECRET,
        MMOLOVE_CALLBACK_LEGACY_GET=True,
    )
    client = legacy.test_client()
    assert client.get(URL, query_string=query).status_code == 200
    assert client.get(URL, query_string=query).json == {"ok": True, "duplicate": True}
    forged = {**query, "username": "Mallory"}
    assert client.get(URL, query_string=forged).status_code == 401
    [heard] = _announced(legacy)
    assert heard["username"] == "Aria"


def test_no_secret_no_endpoint(make_portal: Callable[..., Flask]) -> None:
    app = make_portal(MMOLOVE_DELIVERY="worker")
    assert app.test_client().post(URL, data=_vote()).status_code == 404


@pytest.mark.parametrize("csrf_first", [True, False])
def test_flask_wtf_csrf_leaves_the_endpoint_alone(
    portal_config: dict[str, Any], csrf_first: bool
) -> None:
    from flask_wtf import CSRFProtect

    app = Flask(__name__)
    app.config.update(portal_config)
    app.config.update(SECRET_KEY="k", MMOLOVE_DELIVERY="worker", MMOLOVE_CALLBACK_SECRET=SECRET)
    csrf = CSRFProtect()
    ext = MMOLove()
    if csrf_first:
        csrf.init_app(app)
        ext.init_app(app)
    else:
        ext.init_app(app)
        csrf.init_app(app)

    @app.post("/form")
    def form() -> str:
        return "posted"

    try:
        assert _post(app, _vote()).status_code == 200
        # Everything else is still protected.
        assert app.test_client().post("/form").status_code == 400
    finally:
        ext.shutdown(app)


def test_a_bad_setting_is_refused_at_init_app_naming_the_key(
    make_portal: Callable[..., Flask],
) -> None:
    from flask_mmolove import ConfigurationError

    with pytest.raises(ConfigurationError, match="MMOLOVE_CALLBACK_SECRET"):
        make_portal(MMOLOVE_CALLBACK_SECRET=["", SECRET])
    with pytest.raises(ConfigurationError, match="MMOLOVE_CALLBACK_URL"):
        make_portal(MMOLOVE_CALLBACK_SECRET=SECRET, MMOLOVE_CALLBACK_URL="https://elsewhere/")


def test_with_db_a_vote_granted_through_the_session_commits_with_its_record(
    portal_config: dict[str, Any], tmp_path: Any
) -> None:
    """``db=``: the receiver's grant and the vote's record commit together, once; a
    receiver failing after its flush takes its grant with the rollback, and the vote
    is announced again."""

    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)

    class Gold(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "gold"
        heart_id: Mapped[str] = mapped_column(sa.String(80), primary_key=True)
        username: Mapped[str] = mapped_column(sa.String(80))

    app = Flask(__name__)
    app.config.update({k: v for k, v in portal_config.items() if k != "MMOLOVE_DATABASE_URI"})
    app.config.update(
        SECRET_KEY="k",
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'portal.sqlite3'}",
        MMOLOVE_DELIVERY="worker",
        MMOLOVE_CALLBACK_SECRET=SECRET,
    )
    db.init_app(app)
    ext = MMOLove(app, db=db)
    with app.app_context():
        db.create_all()
    failures = {"left": 1}

    @heart_counted.connect_via(app)
    def grant(sender: Flask, username: str, heart_id: str, **kw: Any) -> None:
        db.session.add(Gold(heart_id=heart_id, username=username))
        db.session.flush()
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("the game server did not answer")

    try:
        body = _vote()
        assert _post(app, body).status_code == 200
        deliverer = app.extensions["mmolove"].deliverer
        assert deliverer.notify_hearts() == 0
        with app.app_context():
            assert db.session.scalars(sa.select(Gold)).all() == []
            db.session.execute(sa.text("UPDATE mmolove_hearts SET next_attempt_at = 0"))
            db.session.commit()
        assert deliverer.notify_hearts() == 1
        assert deliverer.notify_hearts() == 0
        with app.app_context():
            assert [(g.heart_id, g.username) for g in db.session.scalars(sa.select(Gold))] == [
                (json.loads(body)["heart_id"], "Aria")
            ]
    finally:
        ext.shutdown(app)
        with app.app_context():
            db.engine.dispose()


def test_status_counts_votes_received_announced_and_tests(portal: Flask) -> None:
    _post(portal, _vote())
    _post(portal, _vote())
    _post(portal, _vote(event="heart.test", username="test-user"))
    portal.extensions["mmolove"].deliverer.notify_hearts()
    output = portal.test_cli_runner().invoke(args=["mmolove", "status"]).output
    assert "votes:      2 received, 2 announced, 1 test callback(s)" in output
    assert SECRET not in output


def test_the_operator_view_counts_votes(portal: Flask) -> None:
    from flask_mmolove.dashboard import init_dashboard
    from flask_mmolove.dashboard.blueprint import DEFAULT_URL_PREFIX

    init_dashboard(portal, access_check=lambda: True)
    _post(portal, _vote())
    _post(portal, _vote(event="heart.test", username="test-user"))
    page = portal.test_client().get(DEFAULT_URL_PREFIX + "/").get_data(as_text=True)
    assert "Votes (reward callbacks)" in page
    assert '<span class="count">1</span> received' in page
    assert '<span class="count">1</span> test callback(s)' in page
    assert SECRET not in page


def test_a_worker_without_the_callback_secret_still_announces_kept_votes(
    portal: Flask, make_portal: Callable[..., Flask]
) -> None:
    # The web processes serve the endpoint; a `flask mmolove worker` started without
    # MMOLOVE_CALLBACK_SECRET in its environment must not leave their votes unpaid.
    worker = make_portal(MMOLOVE_DELIVERY="worker")
    _post(portal, _vote())
    heard: list[str] = []

    @heart_counted.connect_via(worker)
    def grant(sender: Flask, heart_id: str, **kw: Any) -> None:
        heard.append(heart_id)

    assert worker.extensions["mmolove"].deliverer.notify_hearts() == 1
    assert len(heard) == 1
