"""The whole referral journey, in each delivery mode, against a live sandbox."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask
from portal import Recorder
from support import FakeClock, wait_for

from flask_mmolove import MMOLove, Outcome, player_qualified


def accepted(sandbox: Any, event: str) -> list[Any]:
    return [r for r in sandbox.events if r.event == event and r.status == 200]


def register(client: Any, token: str, name: str = "ayla") -> Any:
    client.get(f"/register?mmref={token}")
    return client.post("/register", data={"name": name})


def test_inline_journey(client: Any, app: Flask, recorder: Recorder, mmolove_sandbox: Any) -> None:
    token = mmolove_sandbox.mint_token("friend-1")

    landing = client.get(f"/register?mmref={token}")
    assert landing.json == {"mmref": token}
    created = client.post("/register", data={"name": "ayla"})
    assert created.status_code == 302

    [reg] = accepted(mmolove_sandbox, "registered")
    body = json.loads(reg.body)
    assert body["token"] == token
    assert body["referee_identity"] == "1000"
    assert body["server_event_id"] == "reg-1000"
    assert body["server_id"] == mmolove_sandbox.server_id
    assert "test" not in body
    assert [r["identity"] for r in recorder.registered] == ["1000"]
    assert recorder.registered[0]["outcome"] is Outcome.ADVANCED
    # Bound: the token is no longer pending in this browser.
    assert client.get("/page").json == {"mmref": None}

    assert client.post("/play/1000").status_code == 200
    [qual] = accepted(mmolove_sandbox, "qualified")
    assert json.loads(qual.body)["server_event_id"] == "qual-1000"
    assert json.loads(qual.body)["token"] == token
    assert len(recorder.credited) == 1
    credit = recorder.credited[0]
    assert credit["identity"] == "1000"
    assert credit["token"] == token
    assert credit["outcome"] is Outcome.ADVANCED
    assert credit["result"].status == 200
    assert credit["result"].data["state"] == "qualified"


def test_thread_journey(make_portal: Any, mmolove_sandbox: Any) -> None:
    app = make_portal(MMOLOVE_DELIVERY="thread")
    recorder = Recorder(app)
    client = app.test_client()
    token = mmolove_sandbox.mint_token()
    assert register(client, token).status_code == 302
    wait_for(lambda: accepted(mmolove_sandbox, "registered"), what="registered")
    client.post("/play/1000")
    wait_for(lambda: recorder.credited, what="referrer_credited")
    assert len(accepted(mmolove_sandbox, "qualified")) == 1
    assert app.extensions["mmolove"].background.running
    recorder.disconnect()


def test_delivery_thread_restarts_on_the_next_request(
    make_portal: Any, mmolove_sandbox: Any
) -> None:
    ext = MMOLove()
    app = make_portal(ext, MMOLOVE_DELIVERY="thread")
    background = app.extensions["mmolove"].background
    client = app.test_client()
    client.get("/page")
    assert background.running
    ext.shutdown(app)
    assert not background.running
    register(client, mmolove_sandbox.mint_token())
    assert background.running
    wait_for(lambda: accepted(mmolove_sandbox, "registered"), what="registered")


def test_worker_journey(make_portal: Any, mmolove_sandbox: Any) -> None:
    app = make_portal(MMOLOVE_DELIVERY="worker")
    recorder = Recorder(app)
    client = app.test_client()
    token = mmolove_sandbox.mint_token()
    register(client, token)
    client.post("/play/1000")
    # The request only enqueued; nothing reached MMOLove yet.
    assert mmolove_sandbox.events == []
    result = app.test_cli_runner().invoke(args=["mmolove", "worker", "--burst"])
    assert result.exit_code == 0, result.output
    assert "delivered 2" in result.output
    assert [r.event for r in accepted(mmolove_sandbox, "registered")] == ["registered"]
    assert len(accepted(mmolove_sandbox, "qualified")) == 1
    assert len(recorder.credited) == 1
    recorder.disconnect()


def test_postgres_journey(make_portal: Any, mmolove_sandbox: Any, pg_uri: str) -> None:
    prefix = "t" + __import__("uuid").uuid4().hex[:10] + "_"
    app = make_portal(MMOLOVE_DATABASE_URI=pg_uri, MMOLOVE_TABLE_PREFIX=prefix)
    state = app.extensions["mmolove"]
    try:
        recorder = Recorder(app)
        client = app.test_client()
        register(client, mmolove_sandbox.mint_token())
        client.post("/play/1000")
        assert len(accepted(mmolove_sandbox, "registered")) == 1
        assert len(accepted(mmolove_sandbox, "qualified")) == 1
        assert len(recorder.credited) == 1
        assert state.outbox.stats().delivered == 2
        recorder.disconnect()
    finally:
        state.outbox.drop_all()


def test_qualified_for_unreferred_player_does_nothing(
    client: Any, app: Flask, mmolove_sandbox: Any, recorder: Recorder
) -> None:
    client.post("/register", data={"name": "no-token"})
    client.post("/play/1000")
    assert mmolove_sandbox.events == []
    assert recorder.credited == []
    assert app.extensions["mmolove"].outbox.stats().pending == 0


def test_credited_once_across_repeated_milestones(
    client: Any, app: Flask, mmolove_sandbox: Any, recorder: Recorder
) -> None:
    register(client, mmolove_sandbox.mint_token())
    client.post("/play/1000")
    client.post("/play/1000")
    with app.app_context():
        # Another server_event_id is another logical event: MMOLove sees it, the
        # referrer is still credited once.
        player_qualified.send(app, identity="1000", server_event_id="qual-1000-again")
    assert len(accepted(mmolove_sandbox, "qualified")) == 2
    assert len(recorder.credited) == 1


def test_method_qualify_matches_the_signal(
    client: Any, app: Flask, mmolove_sandbox: Any, recorder: Recorder
) -> None:
    register(client, mmolove_sandbox.mint_token())
    ext = app.extensions["mmolove"]
    assert ext is not None
    from flask_mmolove import MMOLove

    with app.app_context():
        assert MMOLove().qualify("1000") is True
        assert MMOLove().qualify("9999") is False
    assert len(recorder.credited) == 1


def test_test_mode_sends_dry_runs(make_portal: Any, mmolove_sandbox: Any) -> None:
    app = make_portal(MMOLOVE_TEST_MODE=True)
    recorder = Recorder(app)
    client = app.test_client()
    register(client, mmolove_sandbox.mint_token())
    client.post("/play/1000")
    bodies = [json.loads(r.body) for r in mmolove_sandbox.events]
    assert [b["test"] for b in bodies] == [True, True]
    assert [r.verdict for r in mmolove_sandbox.events] == ["test", "test"]
    assert recorder.registered[0]["outcome"] is Outcome.TEST
    assert [c["outcome"] for c in recorder.credited] == [Outcome.TEST]
    recorder.disconnect()


def test_two_apps_in_one_process(
    make_portal: Any, mmolove_sandbox: Any, mmolove_sandbox_factory: Any, tmp_path: Any
) -> None:
    other = mmolove_sandbox_factory()
    first = make_portal()
    second = make_portal(
        MMOLOVE_SERVER_ID=other.server_id,
        MMOLOVE_REFERRAL_SECRET=other.secret,
        MMOLOVE_ENDPOINT=other.endpoint,
        MMOLOVE_DATABASE_URI=f"sqlite:///{tmp_path / 'second.sqlite3'}",
    )
    first_rec, second_rec = Recorder(first), Recorder(second)
    register(first.test_client(), mmolove_sandbox.mint_token(), "one")
    register(second.test_client(), other.mint_token(), "two")
    first.test_client().post("/play/1000")
    assert [r.event for r in mmolove_sandbox.events] == ["registered", "qualified"]
    assert [r.event for r in other.events] == ["registered"]
    assert len(first_rec.credited) == 1
    assert second_rec.credited == []
    first_rec.disconnect()
    second_rec.disconnect()


@pytest.mark.parametrize("route", ["/register-async", "/register-callable"])
def test_identity_from_async_view_and_callable(
    client: Any, mmolove_sandbox: Any, route: str
) -> None:
    token = mmolove_sandbox.mint_token()
    client.get(f"/page?mmref={token}")
    assert client.post(route, data={"id": "p-77"}).status_code == 201
    [reg] = accepted(mmolove_sandbox, "registered")
    assert json.loads(reg.body)["referee_identity"] == "p-77"


def test_test_mode_uses_up_no_real_event_nor_credit(
    make_portal: Any, mmolove_sandbox: Any, tmp_path: Any
) -> None:
    outbox_uri = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    trying = make_portal(MMOLOVE_TEST_MODE=True, MMOLOVE_DATABASE_URI=outbox_uri)
    tried = Recorder(trying)
    client = trying.test_client()
    register(client, mmolove_sandbox.mint_token())
    client.post("/play/1000")
    assert [r.verdict for r in mmolove_sandbox.events] == ["test", "test"]
    assert [c["outcome"] for c in tried.credited] == [Outcome.TEST]
    assert mmolove_sandbox.accepted_count() == 0
    tried.disconnect()
    # Test mode off (a restart with MMOLOVE_TEST_MODE = False on the same outbox):
    # the real events go, in order, and the real credit is announced once.
    live = make_portal(MMOLOVE_DATABASE_URI=outbox_uri)
    recorder = Recorder(live)
    ext = live.extensions["mmolove"]
    while ext.deliverer.run_once().claimed:
        pass
    assert [(r.event, r.verdict) for r in mmolove_sandbox.events[2:]] == [
        ("registered", "advanced"),
        ("qualified", "advanced"),
    ]
    assert [json.loads(r.body).get("test") for r in mmolove_sandbox.events[2:]] == [None, None]
    assert [c["outcome"] for c in recorder.credited] == [Outcome.ADVANCED]
    # And once only.
    assert ext.deliverer.run_once().claimed == 0
    assert mmolove_sandbox.accepted_count() == 2
    assert len(recorder.credited) == 1
    recorder.disconnect()


@pytest.mark.parametrize(
    "body",
    ["<html><body>Checking your browser...</body></html>", '{"ok": false}'],
    ids=["html-challenge", "ok-false"],
)
def test_only_mmoloves_documented_acceptance_credits(
    app: Flask, mmolove_sandbox: Any, body: str
) -> None:
    recorder = Recorder(app)
    client = app.test_client()
    register(client, mmolove_sandbox.mint_token())
    # A proxy in front of MMOLove answers 200 with a page of its own: MMOLove recorded
    # nothing, and nothing is credited.
    mmolove_sandbox.fail_next(1, status=200, body=body)
    client.post("/play/1000")
    [qualified] = [
        e for e in app.extensions["mmolove"].outbox.list_events() if e.event == "qualified"
    ]
    assert qualified.state == "dead"
    assert qualified.last_reason == "unrecognised"
    assert recorder.credited == []
    status = app.test_cli_runner().invoke(args=["mmolove", "status"]).output
    assert f"dead #{qualified.id} qualified" in status
    # Once a person has looked, a requeue sends it for real: credited once.
    assert app.test_cli_runner().invoke(args=["mmolove", "retry", str(qualified.id)]).exit_code == 0
    assert [c["outcome"] for c in recorder.credited] == [Outcome.ADVANCED]
    recorder.disconnect()


def test_events_a_test_mode_process_holds_later_are_released_too(
    make_portal: Any, mmolove_sandbox: Any, tmp_path: Any
) -> None:
    # A rolling deploy: a process still in test mode holds a dry run after the live
    # deliverer's first pass; the live one releases it at a later pass, not only once.
    outbox_uri = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    clock = FakeClock()
    live_ext = MMOLove(clock=clock)
    live = make_portal(live_ext, MMOLOVE_DATABASE_URI=outbox_uri, MMOLOVE_POLL_INTERVAL=5.0)
    deliverer = live.extensions["mmolove"].deliverer
    assert deliverer.run_once().claimed == 0
    trying = make_portal(MMOLOVE_TEST_MODE=True, MMOLOVE_DATABASE_URI=outbox_uri)
    register(trying.test_client(), mmolove_sandbox.mint_token())
    assert [r.verdict for r in mmolove_sandbox.events] == ["test"]
    clock.advance(5.0)
    while deliverer.run_once().claimed:
        pass
    assert [(r.event, r.verdict) for r in mmolove_sandbox.events[1:]] == [
        ("registered", "advanced")
    ]
