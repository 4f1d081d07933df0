"""``@referral_registered``, ``set_referee`` and ``player_qualified``: every rule."""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

import pytest
from flask import Flask, request
from flask_login import LoginManager, UserMixin, login_user

from flask_mmolove import player_qualified, referral_registered, set_referee


def outbox_rows(app: Flask) -> list[Any]:
    return list(app.extensions["mmolove"].outbox.list_events(limit=100))


def test_client_error_response_enqueues_nothing(
    client: Any, app: Flask, mmolove_sandbox: Any
) -> None:
    token = mmolove_sandbox.mint_token()
    client.get(f"/page?mmref={token}")
    assert client.post("/register-rejected", data={"id": "7"}).status_code == 409
    assert client.post("/register", data={"name": ""}).status_code == 400
    assert outbox_rows(app) == []
    assert mmolove_sandbox.events == []
    # Still pending for the retry that succeeds.
    assert client.get("/page").json == {"mmref": token}


def test_exception_in_view_enqueues_nothing(client: Any, app: Flask, mmolove_sandbox: Any) -> None:
    app.config["PROPAGATE_EXCEPTIONS"] = False
    token = mmolove_sandbox.mint_token()
    client.get(f"/page?mmref={token}")
    assert client.post("/register", data={"name": "x", "explode": "1"}).status_code == 500
    assert outbox_rows(app) == []
    assert client.get("/page").json == {"mmref": token}


def test_no_identity_warns_and_keeps_token(
    client: Any, app: Flask, mmolove_sandbox: Any, caplog: pytest.LogCaptureFixture
) -> None:
    token = mmolove_sandbox.mint_token()
    client.get(f"/page?mmref={token}")
    assert client.post("/register-no-identity").status_code == 201
    assert "set_referee(user.id)" in caplog.text
    assert "identity=" in caplog.text
    assert outbox_rows(app) == []
    assert client.get("/page").json == {"mmref": token}


def test_without_token_nothing_happens(client: Any, app: Flask) -> None:
    assert client.post("/register", data={"name": "plain"}).status_code == 302
    assert outbox_rows(app) == []


def test_identity_is_bound_first_touch(client: Any, app: Flask, mmolove_sandbox: Any) -> None:
    first = mmolove_sandbox.mint_token("a")
    second = mmolove_sandbox.mint_token("b")
    client.get(f"/page?mmref={first}")
    client.post("/register-callable", data={"id": "42"})
    other = app.test_client()
    other.get(f"/page?mmref={second}")
    other.post("/register-callable", data={"id": "42"})
    with app.app_context():
        assert app.extensions["mmolove"].outbox.token_for("42") == first
    sent = [json.loads(r.body)["token"] for r in mmolove_sandbox.events]
    assert sent == [first]


def test_registration_is_idempotent_per_identity(
    client: Any, app: Flask, mmolove_sandbox: Any
) -> None:
    token = mmolove_sandbox.mint_token()
    client.get(f"/page?mmref={token}")
    client.post("/register-callable", data={"id": "5"})
    client.get(f"/page?mmref={token}")
    client.post("/register-callable", data={"id": "5"})
    assert len(outbox_rows(app)) == 1


def test_failed_request_discards_its_qualified_event(
    client: Any, app: Flask, mmolove_sandbox: Any
) -> None:
    client.get(f"/page?mmref={mmolove_sandbox.mint_token()}")
    client.post("/register", data={"name": "ayla"})
    assert client.post("/play/1000", data={"fail": "1"}).status_code == 500
    assert [r.event for r in outbox_rows(app)] == ["registered"]
    assert [r.event for r in mmolove_sandbox.events] == ["registered"]


def test_flask_login_current_user_is_the_fallback(make_portal: Any, mmolove_sandbox: Any) -> None:
    app = make_portal()
    manager = LoginManager(app)

    class User(UserMixin):
        def __init__(self, user_id: str) -> None:
            self.id = user_id

    manager.user_loader(User)

    @app.post("/signup")
    @referral_registered
    def signup() -> Any:
        login_user(User("u-31"))
        return "ok"

    client = app.test_client()
    client.get(f"/page?mmref={mmolove_sandbox.mint_token()}")
    client.post("/signup")
    [reg] = mmolove_sandbox.events
    assert json.loads(reg.body)["referee_identity"] == "u-31"


@pytest.mark.parametrize("bad", ["", "   ", None, "x" * 256, "a\nb"])
def test_set_referee_refuses_unusable_identities(app: Flask, bad: Any) -> None:
    with app.test_request_context(), pytest.raises(ValueError, match="stable id"):
        set_referee(bad)


def test_decorator_without_init_app_says_what_to_do() -> None:
    bare = Flask(__name__)

    @bare.route("/r")
    @referral_registered
    def r() -> str:
        return "x"

    bare.config["PROPAGATE_EXCEPTIONS"] = True
    with pytest.raises(RuntimeError, match=r"init_app\(app\)"):
        bare.test_client().get("/r")


def test_qualified_needs_an_identity(app: Flask) -> None:
    from flask_mmolove import player_qualified

    with app.app_context(), pytest.raises(TypeError, match="identity"):
        player_qualified.send(app)


def test_disabled_extension_captures_but_records_nothing(
    make_portal: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="flask_mmolove")
    app = make_portal(MMOLOVE_ENABLED=False, MMOLOVE_SERVER_ID=None, MMOLOVE_REFERRAL_SECRET=None)
    client = app.test_client()
    assert client.get("/page?mmref=tok").json == {"mmref": "tok"}
    assert client.post("/register", data={"name": "a"}).status_code == 302
    assert "MMOLOVE_ENABLED is false" in caplog.text


def test_a_lost_standalone_write_is_logged_with_the_command_that_writes_it_again(
    client: Any, app: Flask, mmolove_sandbox: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client.get(f"/page?mmref={mmolove_sandbox.mint_token()}")
    outbox = app.extensions["mmolove"].outbox
    outbox.drop_all()
    with caplog.at_level(logging.ERROR, logger="flask_mmolove"):
        # The portal's work is done: the response stands.
        assert client.post("/register", data={"name": "ayla"}).status_code == 302
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "could not write a referral event to the outbox" in message
    assert mmolove_sandbox.secret not in caplog.text
    command = message.rsplit("write it again with: ", 1)[1]
    assert command.startswith("flask mmolove enqueue registered --identity 1000 --token ")
    # Once the outbox works again, the operator's command sends it.
    outbox.create_all()
    result = app.test_cli_runner().invoke(args=command.split()[1:])
    assert result.exit_code == 0, result.output
    assert [(r.event, r.verdict) for r in mmolove_sandbox.events] == [("registered", "advanced")]
    # And again changes nothing: idempotent here and at MMOLove.
    assert app.test_cli_runner().invoke(args=command.split()[1:]).exit_code == 0
    assert mmolove_sandbox.accepted_count("registered") == 1


def test_enqueue_refuses_what_it_cannot_write(app: Flask) -> None:
    runner = app.test_cli_runner()
    result = runner.invoke(args=["mmolove", "enqueue", "registered", "--identity", "7"])
    assert result.exit_code == 2
    assert "needs --token" in result.output
    result = runner.invoke(args=["mmolove", "enqueue", "qualified", "--identity", "nobody"])
    assert result.exit_code == 1
    assert "not a referee of this portal" in result.output


def test_a_player_already_signed_in_is_not_a_referee(
    make_portal: Any, mmolove_sandbox: Any
) -> None:
    app = make_portal()
    manager = LoginManager(app)

    class User(UserMixin):
        def __init__(self, user_id: str) -> None:
            self.id = user_id

    manager.user_loader(User)

    @app.post("/login")
    def login() -> Any:
        login_user(User("veteran"))
        return "ok"

    @app.get("/signup")
    @referral_registered
    def signup() -> Any:
        return "already have an account"

    client = app.test_client()
    client.post("/login")
    client.get(f"/page?mmref={mmolove_sandbox.mint_token()}")
    assert client.get("/signup").status_code == 200
    assert mmolove_sandbox.events == []
    assert app.extensions["mmolove"].outbox.list_events() == []


def test_account_code_shared_with_a_job_may_call_set_referee_outside_a_request(
    make_portal: Any,
) -> None:
    # create_account() called from a CLI command or a job: no request, no token,
    # nothing to report, and no error. (Not pytest-flask's ``app``: it pushes a
    # request context.)
    app = make_portal()
    with app.app_context():
        set_referee(1234)
    assert app.extensions["mmolove"].outbox.list_events() == []


def test_a_decorated_view_called_as_a_function_outside_a_request_just_runs(
    make_portal: Any,
) -> None:
    app = make_portal()

    @referral_registered
    def create() -> tuple[str, int]:
        set_referee("77")
        return "created", 201

    with app.app_context():
        assert create() == ("created", 201)
    assert app.extensions["mmolove"].outbox.list_events() == []


def test_a_milestone_in_a_registration_view_named_by_identity_callable_counts(
    make_portal: Any, mmolove_sandbox: Any
) -> None:
    # The referee is named only when the view returns (identity=, or Flask-Login):
    # a milestone the view reached before that is recorded once the referee is.
    app = make_portal()

    @app.post("/register-and-play")
    @referral_registered(identity=lambda: request.form["id"])
    def register_and_play() -> Any:
        player_qualified.send(app, identity=request.form["id"])
        return "created", 201

    @app.post("/refused-and-play")
    @referral_registered(identity=lambda: request.form["id"])
    def refused_and_play() -> Any:
        player_qualified.send(app, identity=request.form["id"])
        return "name taken", 409

    client = app.test_client()
    client.get(f"/page?mmref={mmolove_sandbox.mint_token()}")
    assert client.post("/refused-and-play", data={"id": "41"}).status_code == 409
    assert app.extensions["mmolove"].outbox.list_events() == []
    assert client.post("/register-and-play", data={"id": "42"}).status_code == 201
    assert [(r.event, r.verdict) for r in mmolove_sandbox.events] == [
        ("registered", "advanced"),
        ("qualified", "advanced"),
    ]


def test_an_outbox_down_at_the_milestone_never_fails_play_and_the_event_comes_back(
    make_portal: Any, mmolove_sandbox: Any, caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    # Standalone: the level is the portal's, committed in its own database; the outbox
    # is locked by someone else at that moment. /play answers; the lost write is
    # logged with the command that writes it again.
    outbox_path = tmp_path / "outbox.sqlite3"
    app = make_portal(
        MMOLOVE_DATABASE_URI=f"sqlite:///{outbox_path}", MMOLOVE_REQUEST_LOCK_TIMEOUT=0.2
    )
    client = app.test_client()
    client.get(f"/page?mmref={mmolove_sandbox.mint_token()}")
    assert client.post("/register", data={"name": "ayla"}).status_code == 302
    holder = sqlite3.connect(outbox_path, isolation_level=None, timeout=5)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with caplog.at_level(logging.ERROR, logger="flask_mmolove"):
            assert client.post("/play/1000").status_code == 200
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    command = error.getMessage().rsplit("write it again with: ", 1)[1]
    assert command == "flask mmolove enqueue qualified --identity 1000"
    result = app.test_cli_runner().invoke(args=command.split()[1:])
    assert result.exit_code == 0, result.output
    assert [(r.event, r.verdict) for r in mmolove_sandbox.events] == [
        ("registered", "advanced"),
        ("qualified", "advanced"),
    ]
