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
