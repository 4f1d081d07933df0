"""When a request's events are written: with its final response, and only if it succeeded.

Each test states a guarantee a portal relies on, whatever the mechanism: events of a
request are written once its response is final and a success; a request that never gets
that far writes nothing and holds nothing up; a write where no response will come (after
the response, or with no request at all) happens at once.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from flask import Flask, request

from flask_mmolove import player_qualified, referral_registered, set_referee


def events(app: Flask) -> list[str]:
    """The outbox's events, oldest first."""
    rows = app.extensions["mmolove"].outbox.list_events(limit=100)
    return [row.event for row in sorted(rows, key=lambda row: row.id)]


def test_requests_with_nothing_to_write_write_nothing(app: Flask, mmolove_sandbox: Any) -> None:
    client = app.test_client()
    token = mmolove_sandbox.mint_token()
    client.get("/page")
    client.set_cookie("_ga", "GA1.2.3")
    client.get("/page?sort=new")
    client.get(f"/page?mmref={token}")  # landing: a cookie and the session, no event
    client.get("/page")  # pending visitor
    client.post("/register", data={"name": ""})  # refused: its event is discarded
    assert events(app) == []
    # And the token is still pending for the registration that succeeds.
    assert client.post("/register", data={"name": "ayla"}).status_code == 302
    assert events(app) == ["registered"]


def test_events_are_not_written_before_the_response_is_final(
    make_portal: Any, mmolove_sandbox: Any
) -> None:
    app = make_portal()
    seen: list[list[str]] = []

    @app.after_request
    def look(response: Any) -> Any:
        # A hook of the portal's: the response may still fail here.
        seen.append(events(app))
        return response

    client = app.test_client()
    client.get(f"/page?mmref={mmolove_sandbox.mint_token()}")
    assert client.post("/register", data={"name": "ayla"}).status_code == 302
    client.post("/play/1000")
    assert seen == [[], [], ["registered"]]
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
        if request.path == "/register-together":
            # Both requests have their events waiting for their responses at once.
            both_waiting.wait()
            if request.form["id"] == "2":
                # The other request finishes while this one's events still wait.
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


def test_a_request_flask_could_not_answer_writes_nothing_and_holds_nothing_up(
    make_portal: Any, mmolove_sandbox: Any
) -> None:
    # With PROPAGATE_EXCEPTIONS, a hook that raises after the view leaves Flask no
    # response at all: no after_request pass on an error page, no request_finished.
    app = make_portal(PROPAGATE_EXCEPTIONS=True)
    broken = {"on": True}

    @app.after_request
    def explode(response: Any) -> Any:
        if broken["on"] and request.path == "/register":
            raise RuntimeError("the portal's hook failed")
        return response

    client = app.test_client()
    client.get(f"/page?mmref={mmolove_sandbox.mint_token()}")
    with pytest.raises(RuntimeError, match="the portal's hook failed"):
        client.post("/register", data={"name": "ayla"})
    assert events(app) == []
    # Nothing of that request lingers: the next registration is written as usual.
    broken["on"] = False
    assert client.post("/register", data={"name": "ayla"}).status_code == 302
    assert events(app) == ["registered"]


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


def test_a_write_in_a_bare_request_context_happens_at_once(
    app: Flask, mmolove_sandbox: Any
) -> None:
    token = mmolove_sandbox.mint_token()
    client = app.test_client()
    client.get(f"/page?mmref={token}")
    client.post("/register", data={"name": "ayla"})
    # No response will ever close this context: the write cannot wait for one.
    with app.test_request_context("/job"):
        player_qualified.send(app, identity="1000")
        assert events(app) == ["registered", "qualified"]


def test_a_request_failed_by_a_later_hook_forgets_no_token(
    portal_config: dict[str, Any], mmolove_sandbox: Any
) -> None:
    # A hook registered before init_app runs after the extension's, and Flask runs the
    # hooks again on the error page it answers with. This one fails a success only (an
    # audit log that is down), so the error page goes through every hook.
    from flask_mmolove import MMOLove

    app = Flask(__name__)
    app.config.update(SECRET_KEY="later-hook", **portal_config)
    failing = {"on": False}

    @app.after_request
    def audit(response: Any) -> Any:
        if failing["on"] and response.status_code < 400:
            raise RuntimeError("the audit log is down")
        return response

    ext = MMOLove(app)

    @app.post("/signup")
    @referral_registered
    def signup() -> Any:
        set_referee(request.form["id"])
        return "created", 201

    app.add_url_rule("/page", "page", lambda: "landing")
    try:
        client = app.test_client()
        token = mmolove_sandbox.mint_token()
        client.get(f"/page?mmref={token}")
        failing["on"] = True
        response = client.post("/signup", data={"id": "9"})
        assert response.status_code == 500
        assert events(app) == []
        # Neither the session nor our cookie let go of the token.
        assert not any("mmref=;" in c for c in response.headers.getlist("Set-Cookie"))
        with client.session_transaction() as session:
            assert session.get("mmolove_mmref") == token
        failing["on"] = False
        assert client.post("/signup", data={"id": "9"}).status_code == 201
        assert events(app) == ["registered"]
    finally:
        ext.shutdown(app)
