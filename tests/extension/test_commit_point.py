"""When a request's events are written: at ``request_finished``, listened to only then.

The receiver is connected while some request has events waiting for its response and
gone otherwise, so that a request with nothing to write pays nothing for it.
"""

from __future__ import annotations

import gc
import threading
from typing import Any

from flask import Flask, request, request_finished

from flask_mmolove import player_qualified, referral_registered, set_referee


def listening(app: Flask) -> bool:
    """Whether the app's commit point receives ``request_finished`` now."""
    point = app.extensions["mmolove"].commit_point
    return any(
        getattr(receiver, "__self__", None) is point
        for receiver in request_finished.receivers_for(app)
    )


def events(app: Flask) -> list[str]:
    """The outbox's events, oldest first."""
    rows = app.extensions["mmolove"].outbox.list_events(limit=100)
    return [row.event for row in sorted(rows, key=lambda row: row.id)]


def test_requests_with_nothing_to_write_leave_no_receiver(app: Flask, mmolove_sandbox: Any) -> None:
    client = app.test_client()
    token = mmolove_sandbox.mint_token()
    client.get("/page")
    client.get("/page?sort=new", headers={"Cookie": "_ga=1"})
    client.get(f"/page?mmref={token}")  # landing: a cookie and the session, no event
    client.get("/page")  # pending visitor
    client.post("/register", data={"name": ""})  # refused: its event is discarded
    assert not listening(app)
    assert events(app) == []


def test_connected_while_a_response_is_pending_and_gone_after(
    make_portal: Any, mmolove_sandbox: Any
) -> None:
    app = make_portal()
    seen: list[bool] = []

    @app.after_request
    def look(response: Any) -> Any:
        seen.append(listening(app))
        return response

    client = app.test_client()
    client.get(f"/page?mmref={mmolove_sandbox.mint_token()}")
    assert client.post("/register", data={"name": "ayla"}).status_code == 302
    client.post("/play/1000")
    # Landing: nothing to write; register and play: events waiting for the response.
    assert seen == [False, True, True]
    assert not listening(app)
    assert events(app) == ["registered", "qualified"]
    assert [r.event for r in mmolove_sandbox.events] == ["registered", "qualified"]


def test_overlapping_requests_each_write_their_events(
    make_portal: Any, mmolove_sandbox: Any
) -> None:
    app = make_portal(MMOLOVE_DELIVERY="worker")
    both_waiting = threading.Barrier(2, timeout=10)
    first_done = threading.Event()

    @app.post("/register-together")
    @referral_registered
    def register_together() -> Any:
        set_referee(request.form["id"])
        return "created", 201

    @app.after_request
    def hold(response: Any) -> Any:
        # Runs after the extension has put the request's events in waiting.
        if request.path == "/register-together":
            both_waiting.wait()
            if request.form["id"] == "2":
                # The other request finishes while this one's events still wait:
                # the receiver must stay for them.
                assert first_done.wait(10)
        return response

    statuses: dict[str, int] = {}

    def player(identity: str) -> None:
        client = app.test_client()
        client.get(f"/page?mmref={mmolove_sandbox.mint_token(identity)}")
        statuses[identity] = client.post("/register-together", data={"id": identity}).status_code
        if identity == "1":
            first_done.set()

    threads = [threading.Thread(target=player, args=(i,)) for i in ("1", "2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert statuses == {"1": 201, "2": 201}
    rows = app.extensions["mmolove"].outbox.list_events(limit=10)
    assert sorted(row.identity for row in rows) == ["1", "2"]
    assert not listening(app)


def test_a_request_that_never_finishes_does_not_keep_the_receiver(
    app: Flask, mmolove_sandbox: Any
) -> None:
    point = app.extensions["mmolove"].commit_point
    # As a request whose error Flask failed to answer: it waited, then vanished.
    with app.test_request_context("/lost"):
        point.expect(app, request._get_current_object())  # type: ignore[attr-defined]
    assert listening(app)
    gc.collect()
    client = app.test_client()
    client.get("/page")  # any request of the app now finds nobody waiting
    assert not listening(app)
    # And a later registration is still written.
    client.get(f"/page?mmref={mmolove_sandbox.mint_token()}")
    client.post("/register", data={"name": "ayla"})
    assert events(app) == ["registered"]
    assert not listening(app)


def test_a_write_in_a_context_the_test_client_keeps_happens_at_once(
    app: Flask, mmolove_sandbox: Any
) -> None:
    with app.test_client() as client:
        client.get(f"/page?mmref={mmolove_sandbox.mint_token()}")
        client.post("/register", data={"name": "ayla"})
        # The register request's context is still pushed, its response long gone: a
        # milestone recorded here must not wait for it.
        assert request.path == "/register"
        player_qualified.send(app, identity="1000")
        assert events(app) == ["registered", "qualified"]
    assert not listening(app)


def test_a_write_after_requests_that_shared_the_tests_app_context(
    app: Flask, mmolove_sandbox: Any
) -> None:
    # pytest-flask pushes a request context for every test that uses ``app``; a
    # client's requests reuse its app context, and so its ``g``.
    client = app.test_client()
    client.get(f"/page?mmref={mmolove_sandbox.mint_token()}")
    client.post("/register", data={"name": "ayla"})
    client.get("/page")
    assert request.path == "/"  # pytest-flask's context, not a request's
    player_qualified.send(app, identity="1000")
    assert events(app) == ["registered", "qualified"]
