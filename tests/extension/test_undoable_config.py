"""Configuration mistakes that can be undone (issue 14, section 3).

- The sandbox's share link plants no cookie a portal on the same host takes for its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from flask_mmolove.sandbox import create_sandbox_app

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
