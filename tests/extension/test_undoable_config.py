"""Configuration mistakes that can be undone (issue 14, section 3).

- The sandbox's share link plants no cookie a portal on the same host takes for its own.
- ``flask mmolove ping`` catches a wrong server id (and a wrong endpoint path).
- ``flask mmolove retry --all`` requeues every undelivered event not in flight.
- A body carries the server id in force when it is sent: a wrong id fixed, the dead
  letters retried, they are delivered (proof 9).
- No credentials: the portal still starts, its commands run, events are held, one
  ERROR says why; status says delivery is paused, worker and ping refuse in the same
  words; a restart with the credentials sends the held events (proof 8).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.cli import FlaskGroup
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from flask_mmolove.sandbox import create_sandbox_app
from flask_mmolove.settings import UNSET_SERVER_ID
from flask_mmolove.state import get_state

# --- the sandbox's share link on the portal's own origin ------------------------------


def test_sandbox_share_link_plants_no_cookie_the_portal_reads(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    # As the demo runs it: the sandbox mounted at /_mmolove/ on the portal's origin.
    app = make_portal()
    sandbox = create_sandbox_app(
        secret=mmolove_sandbox.secret,
        server_id=mmolove_sandbox.server_id,
        registration_url="http://localhost/register",
    )
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/_mmolove": sandbox})  # type: ignore[method-assign]
    client = app.test_client()
    share = f"/_mmolove/r/{mmolove_sandbox.server_id}"
    response = client.get(f"{share}?ref=friend")
    assert response.status_code == 302
    # MMOLove's cookie was set, on the share link only...
    cookie = client.get_cookie("mmref", path=share)
    assert cookie is not None
    assert client.get_cookie("mmref") is None
    # ...so a portal page without ?mmref= finds no pending token in it.
    assert client.get("/page").get_json() == {"mmref": None}
    # The redirect's ?mmref= is how the portal learns the token.
    location = response.headers["Location"]
    assert client.get(location).get_json() == {"mmref": cookie.value}


# --- a wrong server id: ping catches it -----------------------------------------------


def run(app: Flask, *args: str) -> Any:
    result = app.test_cli_runner().invoke(args=["mmolove", *args])
    secret = app.config.get("MMOLOVE_REFERRAL_SECRET")
    assert not secret or secret not in result.output
    return result


def test_ping_with_a_wrong_server_id_says_what_to_fix(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    # The right secret, a server id MMOLove does not know: the dry run is refused.
    app = make_portal(MMOLOVE_DELIVERY="worker", MMOLOVE_SERVER_ID="srv-typo")
    result = run(app, "ping")
    assert result.exit_code == 1, result.output
    assert "404" in result.output
    assert "MMOLOVE_SERVER_ID" in result.output
    assert "'srv-typo'" in result.output
    assert "MMOLOVE_ENDPOINT" in result.output
    assert mmolove_sandbox.events[-1].verdict == "unknown_server"


def test_ping_at_a_wrong_path_names_the_endpoint(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    wrong = mmolove_sandbox.endpoint.replace("/api/referral/events", "/api/referral/event")
    app = make_portal(MMOLOVE_DELIVERY="worker", MMOLOVE_ENDPOINT=wrong)
    result = run(app, "ping")
    assert result.exit_code == 1, result.output
    assert "404" in result.output
    assert "MMOLOVE_ENDPOINT" in result.output


# --- retry --all: every undelivered event ---------------------------------------------


def register(app: Flask, sandbox: Any, name: str) -> int:
    """Registers ``name`` through a share-link token; returns its event's id."""
    client = app.test_client()
    client.get(f"/register?mmref={sandbox.mint_token(name)}")
    client.post("/register", data={"name": name})
    return max(event.id for event in get_state(app).outbox.list_events())  # type: ignore[union-attr]


def test_retry_all_requeues_dead_backing_off_and_held_events(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    # Backoff long enough that nothing comes due by itself during the test.
    app = make_portal(MMOLOVE_DELIVERY="worker", MMOLOVE_RETRY_BASE=600, MMOLOVE_RETRY_CAP=600)
    outbox = get_state(app).outbox
    assert outbox is not None
    ids = {}
    for name, status in (("dead", 404), ("backoff", 503), ("held", 401)):
        ids[name] = register(app, mmolove_sandbox, name)
        mmolove_sandbox.fail_next(1, status=status)
        assert run(app, "worker", "--burst").exit_code == 0
    ids["in_flight"] = register(app, mmolove_sandbox, "in-flight")
    assert [e.id for e in outbox.claim("elsewhere", limit=1, lease=600)] == [ids["in_flight"]]
    ids["delivered"] = register(app, mmolove_sandbox, "delivered")
    run(app, "worker", "--burst")
    states = {name: outbox.get(i).state for name, i in ids.items()}  # type: ignore[union-attr]
    assert states == {
        "dead": "dead",
        "backoff": "pending",
        "held": "pending",
        "in_flight": "pending",
        "delivered": "delivered",
    }
    sent = len(mmolove_sandbox.events)

    result = run(app, "retry", "--all")
    assert result.exit_code == 0, result.output
    assert "requeued 3 event(s)" in result.output
    run(app, "worker", "--burst")
    states = {name: outbox.get(i).state for name, i in ids.items()}  # type: ignore[union-attr]
    assert states == {
        "dead": "delivered",
        "backoff": "delivered",
        "held": "delivered",
        "in_flight": "pending",  # its lease is another deliverer's
        "delivered": "delivered",
    }
    assert len(mmolove_sandbox.events) == sent + 3


def test_retry_help_says_what_all_covers(make_portal: Callable[..., Flask]) -> None:
    output = " ".join(run(make_portal(), "retry", "--help").output.split())
    assert "--all" in output
    for kind in ("dead letters", "waiting on backoff", "held after a 401"):
        assert kind in output


def test_retry_by_id_leaves_the_others_waiting(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    app = make_portal(MMOLOVE_DELIVERY="worker", MMOLOVE_RETRY_BASE=600, MMOLOVE_RETRY_CAP=600)
    first = register(app, mmolove_sandbox, "a")
    second = register(app, mmolove_sandbox, "b")
    mmolove_sandbox.fail_next(2, status=503)
    run(app, "worker", "--burst")
    assert "requeued 1 event(s)" in run(app, "retry", str(first)).output
    run(app, "worker", "--burst")
    outbox = get_state(app).outbox
    assert outbox is not None
    assert [outbox.get(i).state for i in (first, second)] == ["delivered", "pending"]  # type: ignore[union-attr]


# --- proof 9: a wrong server id, fixed, retry --all -----------------------------------


def test_proof_9_wrong_server_id_fixed_then_retry_all_delivers(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    wrong = make_portal(MMOLOVE_DELIVERY="worker", MMOLOVE_SERVER_ID="srv-typo")
    first = register(wrong, mmolove_sandbox, "a")
    second = register(wrong, mmolove_sandbox, "b")
    assert run(wrong, "worker", "--burst").exit_code == 0
    outbox = get_state(wrong).outbox
    assert outbox is not None
    dead = [outbox.get(i) for i in (first, second)]
    assert [(e.state, e.last_status) for e in dead] == [("dead", 404)] * 2  # type: ignore[union-attr]
    assert [r.verdict for r in mmolove_sandbox.events] == ["unknown_server"] * 2
    stored = {i: outbox.get(i).body for i in (first, second)}  # type: ignore[union-attr]

    # MMOLOVE_SERVER_ID fixed: a restart, the same outbox.
    fixed = make_portal(MMOLOVE_DELIVERY="worker")
    result = run(fixed, "retry", "--all")
    assert "requeued 2 event(s)" in result.output, result.output
    assert run(fixed, "worker", "--burst").exit_code == 0
    outbox = get_state(fixed).outbox
    assert outbox is not None
    assert [outbox.get(i).state for i in (first, second)] == ["delivered"] * 2  # type: ignore[union-attr]
    assert mmolove_sandbox.accepted_count("registered") == 2
    for record in mmolove_sandbox.events[2:]:
        # The bytes signed are the bytes MMOLove read (it verified them), and they
        # differ from the stored body only in the server id.
        assert record.verdict == "advanced"
        sent = json.loads(record.body)
        assert sent["server_id"] == mmolove_sandbox.server_id
        [was] = [json.loads(b) for b in stored.values() if json.loads(b)["token"] == sent["token"]]
        assert list(sent) == list(was)
        assert {**was, "server_id": mmolove_sandbox.server_id} == sent


def test_a_body_with_the_right_server_id_goes_as_stored(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    app = make_portal(MMOLOVE_DELIVERY="worker")
    event_id = register(app, mmolove_sandbox, "a")
    outbox = get_state(app).outbox
    assert outbox is not None
    stored = outbox.get(event_id).body  # type: ignore[union-attr]
    run(app, "worker", "--burst")
    [record] = mmolove_sandbox.events
    assert (record.verdict, record.body) == ("advanced", stored)


# --- no credentials: the portal starts, events are held -------------------------------

NO_CREDENTIALS: dict[str, Any] = {"MMOLOVE_SERVER_ID": None, "MMOLOVE_REFERRAL_SECRET": None}
PAUSED = (
    "delivery is paused: MMOLOVE_SERVER_ID and MMOLOVE_REFERRAL_SECRET are not set: copy "
    "them from MMOLove's Referrals tab into the environment and start again"
)


@pytest.fixture(autouse=True)
def _no_credentials_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The settings fall back to the environment: it must not fill in what a test omits.
    monkeypatch.delenv("MMOLOVE_SERVER_ID", raising=False)
    monkeypatch.delenv("MMOLOVE_REFERRAL_SECRET", raising=False)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("mode", ["thread", "inline", "worker"])
def test_without_credentials_the_portal_starts_and_holds_events(
    make_portal: Callable[..., Flask],
    mmolove_sandbox: Any,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="flask_mmolove")
    ext_app = make_portal(MMOLOVE_DELIVERY=mode, **NO_CREDENTIALS)
    # One ERROR at init_app, naming both keys and what to do.
    [error] = errors(caplog)
    assert "delivery is paused: MMOLOVE_SERVER_ID and MMOLOVE_REFERRAL_SECRET are not set" in (
        error
    )
    assert "Referrals tab" in error
    state = get_state(ext_app)
    assert state.deliverer is not None
    assert state.deliverer.client is None
    assert state.background is None  # no thread that wakes to send nothing
    event_id = register(ext_app, mmolove_sandbox, "a")
    qualified = ext_app.test_client().post("/play/1000")
    assert qualified.status_code == 200
    # Written, not sent: no attempt was spent on them.
    assert state.outbox is not None
    held = sorted(state.outbox.list_events(), key=lambda e: e.id)
    assert [(e.event, e.state, e.attempts) for e in held] == [
        ("registered", "pending", 0),
        ("qualified", "pending", 0),
    ]
    assert json.loads(held[0].body)["server_id"] == UNSET_SERVER_ID
    assert held[0].id == event_id
    from flask_mmolove import MMOLove

    assert MMOLove().deliver_now(ext_app) == 0
    time.sleep(0.3)  # a thread, had one started, would have sent by now
    assert mmolove_sandbox.events == []
    assert [e.attempts for e in state.outbox.list_events()] == [0, 0]
    assert len(errors(caplog)) == 1


def test_flask_commands_run_without_credentials(
    make_portal: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    # As `flask --help` and `flask routes` run them in an image build or CI.
    cli = FlaskGroup(create_app=lambda: make_portal(**NO_CREDENTIALS))
    for args in (["--help"], ["routes"], ["mmolove", "--help"]):
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, (args, result.output)
    assert "/register" in CliRunner().invoke(cli, ["routes"]).output
    assert all("delivery is paused" in e for e in errors(caplog))


def test_status_says_paused_and_worker_and_ping_refuse_in_the_same_words(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    app = make_portal(MMOLOVE_DELIVERY="worker", **NO_CREDENTIALS)
    register(app, mmolove_sandbox, "a")
    status = run(app, "status")
    assert status.exit_code == 0, status.output
    assert PAUSED in " ".join(status.output.split())
    assert "pending:    1" in status.output
    for command in (["worker"], ["worker", "--burst"], ["ping"]):
        result = run(app, *command)
        assert result.exit_code == 1, (command, result.output)
        assert PAUSED in " ".join(result.output.split()), result.output
    assert mmolove_sandbox.events == []


def test_one_missing_key_is_named_and_the_secret_is_never_shown(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_portal(MMOLOVE_DELIVERY="worker", MMOLOVE_SERVER_ID=None)
    secret = mmolove_sandbox.secret
    [error] = errors(caplog)
    assert "delivery is paused: MMOLOVE_SERVER_ID is not set" in error
    assert "MMOLOVE_REFERRAL_SECRET" not in error
    state = get_state(app)
    assert state.settings.paused == "delivery is paused: MMOLOVE_SERVER_ID is not set"
    result = run(app, "worker")
    assert "delivery is paused: MMOLOVE_SERVER_ID is not set: copy it from" in result.output
    for text in (error, result.output, run(app, "status").output, repr(state.settings)):
        assert secret not in text


def test_a_paused_deliverer_renews_nothing_after_a_fork(
    make_portal: Callable[..., Flask],
) -> None:
    deliverer = get_state(make_portal(**NO_CREDENTIALS)).deliverer
    assert deliverer is not None
    owner = deliverer.owner
    deliverer.after_fork()
    assert deliverer.client is None
    assert deliverer.owner != owner


def test_the_sandbox_command_does_not_take_the_stand_in_for_a_server_id(
    make_portal: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    given: list[list[str]] = []

    def main(args: list[str], env: Any = None) -> int:
        given.append(args)
        return 0

    monkeypatch.setattr("flask_mmolove.sandbox.command.main", main)
    app = make_portal(**NO_CREDENTIALS)
    result = app.test_cli_runner().invoke(args=["mmolove", "sandbox", "--port", "0"])
    assert result.exit_code == 0, result.output
    assert given == [["--port", "0"]]


def test_proof_8_held_without_credentials_delivered_once_they_are_set(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    cli = FlaskGroup(create_app=lambda: make_portal(**NO_CREDENTIALS))
    assert CliRunner().invoke(cli, ["routes"]).exit_code == 0
    held = make_portal(MMOLOVE_DELIVERY="thread", **NO_CREDENTIALS)
    event_id = register(held, mmolove_sandbox, "a")
    outbox = get_state(held).outbox
    assert outbox is not None
    assert outbox.get(event_id).state == "pending"  # type: ignore[union-attr]
    assert mmolove_sandbox.events == []

    # A restart with the credentials (the same outbox): the first request starts the
    # delivery thread, and the held event goes, with the server id in force now.
    restarted = make_portal(MMOLOVE_DELIVERY="thread")
    restarted.test_client().get("/page")
    deadline = time.monotonic() + 10
    while outbox.get(event_id).state != "delivered" and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.02)
    assert outbox.get(event_id).state == "delivered"  # type: ignore[union-attr]
    [record] = mmolove_sandbox.events
    assert record.verdict == "advanced"
    assert json.loads(record.body)["server_id"] == mmolove_sandbox.server_id
    assert mmolove_sandbox.accepted_count("registered") == 1
