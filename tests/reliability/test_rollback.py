"""Item 4: an event written in a request that fails is never sent.

"Fails": the view raises (with and without PROPAGATE_EXCEPTIONS), it answers 4xx or
5xx, or it aborts. Inline delivery, so anything written would go out at once; a
worker pass afterwards, so anything merely stored would go out too. Each failing
route has a succeeding twin, which must send: the test cannot pass by sending nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask, abort, request
from reliability_support import outbox_of, record_figures, register, state

from flask_mmolove import player_qualified, referral_registered, set_referee

FAILURES = ["raise", "400", "403-abort", "409", "500", "503-abort"]


def add_routes(app: Flask) -> None:
    def fail(how: str) -> Any:
        if how == "raise":
            raise RuntimeError("the portal's own bug, after the account was created")
        if how.endswith("-abort"):
            abort(int(how.split("-")[0]))
        if how != "ok":
            return "failed", int(how)
        return "ok", 201

    @app.post("/signup/<how>")
    @referral_registered
    def signup(how: str) -> Any:
        set_referee(request.form["id"])
        return fail(how)

    @app.post("/milestone/<identity>/<how>")
    def milestone(identity: str, how: str) -> Any:
        player_qualified.send(app, identity=identity)
        return fail(how)


@pytest.fixture(params=[False, True], ids=["production", "propagate-exceptions"])
def portal(make_portal: Callable[..., Flask], request: pytest.FixtureRequest) -> Flask:
    app = make_portal(MMOLOVE_DELIVERY="inline")
    app.config["PROPAGATE_EXCEPTIONS"] = request.param
    add_routes(app)
    return app


def post(app: Flask, client: Any, path: str, **data: str) -> int:
    try:
        return int(client.post(path, data=data).status_code)
    except RuntimeError:
        assert app.config["PROPAGATE_EXCEPTIONS"]
        return 500


@pytest.mark.parametrize("how", FAILURES)
def test_failed_registration_sends_nothing(portal: Flask, mmolove_sandbox: Any, how: str) -> None:
    client = portal.test_client()
    token = mmolove_sandbox.mint_token()
    client.get(f"/page?mmref={token}")
    assert post(portal, client, f"/signup/{how}", id="7") >= 400
    state(portal).deliverer.run_once()
    assert outbox_of(portal).list_events() == []
    assert mmolove_sandbox.events == []
    # The token is still pending, and the twin request that succeeds does send.
    assert client.get("/page").json == {"mmref": token}
    assert post(portal, client, "/signup/ok", id="7") == 201
    assert [(r.event, r.verdict) for r in mmolove_sandbox.events] == [("registered", "advanced")]


@pytest.mark.parametrize("how", FAILURES)
def test_failed_milestone_sends_nothing(portal: Flask, mmolove_sandbox: Any, how: str) -> None:
    register(portal, mmolove_sandbox.mint_token(), "8")
    client = portal.test_client()
    assert post(portal, client, f"/milestone/8/{how}") >= 400
    state(portal).deliverer.run_once()
    assert [e.event for e in outbox_of(portal).list_events()] == ["registered"]
    assert [r.event for r in mmolove_sandbox.events] == ["registered"]
    assert post(portal, client, "/milestone/8/ok") == 201
    assert [r.event for r in mmolove_sandbox.events] == ["registered", "qualified"]


def test_rollback_figures(portal: Flask, mmolove_sandbox: Any) -> None:
    """Many failed requests, then as many successful ones: only the latter are sent."""
    client = portal.test_client()
    failed = 0
    for n, how in enumerate(FAILURES * 5):
        client.get(f"/page?mmref={mmolove_sandbox.mint_token()}")
        failed += post(portal, client, f"/signup/{how}", id=f"f{n}") >= 400
        failed += post(portal, client, f"/milestone/f{n}/{how}") >= 400
    state(portal).deliverer.run_once()
    assert mmolove_sandbox.events == []
    assert outbox_of(portal).list_events() == []
    if not portal.config["PROPAGATE_EXCEPTIONS"]:
        record_figures("4 rollback", failed_requests=failed, events_sent=0, events_stored=0)


@pytest.mark.parametrize("late", ["after_request hook", "session save"])
def test_request_failing_after_the_view_sends_nothing(
    portal_config: dict[str, Any], mmolove_sandbox: Any, late: str
) -> None:
    """The view succeeded, but the request still fails later: in an ``after_request``
    hook that runs after the extension's (one registered before ``init_app``), or in
    saving the session. The player got a 500; the event must not go out."""
    from flask.sessions import SecureCookieSessionInterface

    app = Flask(__name__)
    app.config.update(SECRET_KEY="rollback", **{**portal_config, "MMOLOVE_DELIVERY": "inline"})
    failing = {"on": False}

    if late == "after_request hook":

        @app.after_request
        def audit(response: Any) -> Any:
            if failing["on"]:
                raise RuntimeError("the audit log is down")
            return response

    else:

        class FlakySessions(SecureCookieSessionInterface):
            def save_session(self, app: Flask, session: Any, response: Any) -> None:
                if failing["on"]:
                    raise RuntimeError("the session store is down")
                super().save_session(app, session, response)

        app.session_interface = FlakySessions()

    from flask_mmolove import MMOLove

    ext = MMOLove()
    ext.init_app(app)
    add_routes(app)
    app.add_url_rule("/page", "page", lambda: "landing")
    try:
        client = app.test_client()
        client.get(f"/page?mmref={mmolove_sandbox.mint_token()}")
        failing["on"] = True
        assert client.post("/signup/ok", data={"id": "9"}).status_code == 500
        state(app).deliverer.run_once()
        assert mmolove_sandbox.events == []
        assert outbox_of(app).list_events() == []
        # Once the hook works again, the retried request sends it.
        failing["on"] = False
        assert client.post("/signup/ok", data={"id": "9"}).status_code == 201
        assert [(r.event, r.verdict) for r in mmolove_sandbox.events] == [
            ("registered", "advanced")
        ]
    finally:
        ext.shutdown(app)
