"""Capturing ``mmref``: query string, cookie, session, validation, first touch."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from flask import Flask, session


def cookie_header(response: Any, name: str = "mmref") -> str | None:
    for value in response.headers.getlist("Set-Cookie"):
        if value.startswith(f"{name}="):
            return str(value)
    return None


def test_query_token_goes_to_g_session_and_own_cookie(client: Any, app: Flask) -> None:
    response = client.get("/page?mmref=tok.abc-123_XYZ")
    assert response.json == {"mmref": "tok.abc-123_XYZ"}
    with client.session_transaction() as sess:
        assert sess["mmolove_mmref"] == "tok.abc-123_XYZ"
    header = cookie_header(response)
    assert header is not None
    assert header.startswith("mmref=tok.abc-123_XYZ;")
    assert "HttpOnly" in header
    assert "SameSite=Lax" in header
    assert f"Max-Age={90 * 24 * 3600}" in header
    assert "Secure" not in header


def test_cookie_is_secure_on_https(client: Any) -> None:
    response = client.get("/page?mmref=tok1", base_url="https://portal.example")
    header = cookie_header(response)
    assert header is not None
    assert "Secure" in header


def test_cookie_secure_forced_by_config(make_portal: Any) -> None:
    client = make_portal(MMOLOVE_COOKIE_SECURE=True).test_client()
    header = cookie_header(client.get("/page?mmref=tok1"))
    assert header is not None
    assert "Secure" in header


def test_no_token_no_cookie_no_session(client: Any) -> None:
    response = client.get("/page")
    assert response.json == {"mmref": None}
    assert response.headers.getlist("Set-Cookie") == []
    response = client.get("/page?other=1")
    assert response.headers.getlist("Set-Cookie") == []


def test_a_page_that_depends_on_no_cookie_stays_cacheable(client: Any) -> None:
    # Cookies of the portal's own (analytics, consent) and no session cookie: the
    # session is certainly empty, so looking for a token must not open it, which would
    # add "Vary: Cookie" and make a shared cache keep one copy per visitor.
    client.set_cookie("_ga", "GA1.2.3")
    client.set_cookie("mmref", "not a token")
    response = client.get("/page?sort=new")
    assert response.request.headers.get("Cookie")
    assert response.json == {"mmref": None}
    assert "Cookie" not in response.vary
    # With a session cookie the session is opened, and rightly varies.
    client.get("/page?mmref=tok1")
    assert "Cookie" in client.get("/page").vary


def test_token_survives_session_clear_through_the_cookie(client: Any, app: Flask) -> None:
    client.get("/page?mmref=tok-first")
    with client.session_transaction() as sess:
        sess.clear()
    # A login that clears the session, an OAuth round trip, another landing page:
    assert client.get("/page").json == {"mmref": "tok-first"}
    with client.session_transaction() as sess:
        assert sess["mmolove_mmref"] == "tok-first"


def test_mmolove_cookie_alone_is_a_fallback(client: Any) -> None:
    client.set_cookie("mmref", "from-mmolove-cookie")
    assert client.get("/page").json == {"mmref": "from-mmolove-cookie"}


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "has space",
        'quote"d',
        "<script>",
        "semi;colon",
        "x" * 513,
        "new\nline",
        "tab\there",
        "caf\u00e9",
        "back\\slash",
    ],
)
def test_invalid_tokens_are_ignored_never_stored_or_echoed(
    client: Any, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="flask_mmolove")
    response = client.get("/page", query_string={"mmref": bad})
    assert response.json == {"mmref": None}
    assert response.headers.getlist("Set-Cookie") == []
    with client.session_transaction() as sess:
        assert "mmolove_mmref" not in sess
    if bad:
        assert bad not in caplog.text
        assert bad not in response.get_data(as_text=True)


def test_invalid_cookie_is_ignored(client: Any) -> None:
    client.set_cookie("mmref", "bad<cookie>")
    assert client.get("/page").json == {"mmref": None}


def test_first_touch_keeps_the_pending_token(client: Any) -> None:
    client.get("/page?mmref=first")
    response = client.get("/page?mmref=second")
    assert response.json == {"mmref": "first"}
    assert cookie_header(response) is None


def test_last_touch_when_configured(make_portal: Any) -> None:
    client = make_portal(MMOLOVE_FIRST_TOUCH=False).test_client()
    client.get("/page?mmref=first")
    response = client.get("/page?mmref=second")
    assert response.json == {"mmref": "second"}
    header = cookie_header(response)
    assert header is not None
    assert header.startswith("mmref=second;")


def test_token_cleared_from_session_and_cookie_once_bound(
    client: Any, mmolove_sandbox: Any
) -> None:
    token = mmolove_sandbox.mint_token()
    client.get(f"/register?mmref={token}")
    response = client.post("/register", data={"name": "ayla"})
    header = cookie_header(response)
    assert header is not None
    assert header.startswith("mmref=;")
    assert "Max-Age=0" in header or "Expires=Thu, 01 Jan 1970" in header
    with client.session_transaction() as sess:
        assert "mmolove_mmref" not in sess
    assert client.get("/page").json == {"mmref": None}


def test_session_key_is_configurable(make_portal: Any) -> None:
    app = make_portal(MMOLOVE_SESSION_KEY="ref", MMOLOVE_COOKIE_NAME="portal_ref")
    client = app.test_client()
    response = client.get("/page?mmref=tok")
    assert cookie_header(response, "portal_ref") is not None
    with client.session_transaction() as sess:
        assert sess["ref"] == "tok"
    with app.test_request_context():
        assert "ref" not in session


def test_the_portals_hooks_see_our_cookie_on_the_response(make_portal: Any) -> None:
    # A portal's after_request hook (here, one that lets shared caches keep pages
    # without cookies) must see the response as the extension leaves it, wherever it
    # was registered: a landing page that sets our cookie is never made cacheable.
    app = make_portal()

    @app.after_request
    def cache_cookieless_pages(response: Any) -> Any:
        if not response.headers.getlist("Set-Cookie"):
            response.headers["Cache-Control"] = "public, max-age=600"
        return response

    response = app.test_client().get("/page?mmref=tok1")
    assert cookie_header(response) is not None
    assert "public" not in response.headers.get("Cache-Control", "")


def test_a_portal_without_secret_key_never_answers_500(
    make_portal: Any, mmolove_sandbox: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """No SECRET_KEY, so no session: capture keeps the token in our cookie alone, and
    the visitor arriving with ?mmref= gets the page, then registers as a referee."""
    app = make_portal(MMOLOVE_DELIVERY="worker")
    app.config["SECRET_KEY"] = None
    client = app.test_client()
    token = mmolove_sandbox.mint_token()
    with caplog.at_level(logging.WARNING, logger="flask_mmolove"):
        response = client.get(f"/register?mmref={token}")
        assert response.status_code == 200
        assert response.json == {"mmref": token}
        header = cookie_header(response)
        assert header is not None
        assert header.startswith(f"mmref={token};")
        assert client.get("/page").json == {"mmref": token}
        assert client.get(f"/page?mmref={token}").status_code == 200
        # A registration that fails keeps the token pending; one that succeeds binds it.
        assert client.post("/register-rejected", data={"id": "u0"}).status_code == 409
        assert client.get("/page").json == {"mmref": token}
        response = client.post("/register", data={"name": "ayla"})
        assert response.status_code == 302
        cleared = cookie_header(response)
        assert cleared is not None
        assert cleared.startswith("mmref=;")
        assert client.get("/page").json == {"mmref": None}
    warnings = [r for r in caplog.records if "SECRET_KEY" in r.getMessage()]
    assert len(warnings) == 1
    [event] = app.extensions["mmolove"].outbox.list_events()
    assert event.event == "registered"
    assert event.token == token


# A cookie planted under our name, by a sibling subdomain or over plain HTTP, for a
# longer path than ours ("/"): a browser sends it FIRST ("longer paths first", RFC 6265
# section 5.4), then ours. What request.cookies gives is the first one.


def raw_get(app: Flask, path: str, cookie: str) -> Any:
    """A request with exactly this Cookie header, as a browser sends it."""
    return app.test_client(use_cookies=False).get(path, environ_overrides={"HTTP_COOKIE": cookie})


def test_a_cookie_planted_for_a_longer_path_does_not_hide_ours(app: Flask) -> None:
    assert raw_get(app, "/page", "mmref=planted; mmref=ours").json == {"mmref": "ours"}
    assert raw_get(app, "/page", "mmref=planted; _ga=1; mmref=ours").json == {"mmref": "ours"}
    # Invalid values are skipped wherever they come.
    assert raw_get(app, "/page", "mmref=ours; mmref=bad<x>").json == {"mmref": "ours"}
    assert raw_get(app, "/page", "mmref=bad<x>; mmref=ours").json == {"mmref": "ours"}


def test_a_planted_cookie_replaces_no_pending_token(app: Flask) -> None:
    """Under first touch the player's token stays pending, in the session and after a
    login that cleared the session, whatever cookie was planted meanwhile."""
    client = app.test_client()
    client.get("/page?mmref=players")
    # The planted cookie is sent first (a longer path), ours after it. (Raw headers: the
    # test client's jar sends cookies in the order they were set, not as browsers do.)
    session_cookie = client.get_cookie("session")
    assert session_cookie is not None
    both = f"mmref=planted; session={session_cookie.value}; mmref=players"
    response = raw_get(app, "/page", both)
    assert response.json == {"mmref": "players"}
    # A login cleared the session: our cookie carries the token, not the planted one.
    assert raw_get(app, "/page", "mmref=planted; mmref=players").json == {"mmref": "players"}


def test_our_cookie_is_set_even_when_a_planted_one_is_there(app: Flask) -> None:
    client = app.test_client()
    client.get("/page?mmref=players")
    session_cookie = client.get_cookie("session")
    assert session_cookie is not None
    # The browser lost our cookie; a planted one is there. The player's link sets ours again.
    response = raw_get(app, "/page?mmref=players", f"mmref=planted; session={session_cookie.value}")
    assert response.json == {"mmref": "players"}
    header = cookie_header(response)
    assert header is not None
    assert header.startswith("mmref=players;")


def test_a_host_prefixed_cookie_name_works_on_https(make_portal: Any) -> None:
    # __Host-: Secure, Path=/, no Domain, so no other host or path can plant one.
    app = make_portal(MMOLOVE_COOKIE_NAME="__Host-mmref")
    client = app.test_client()
    base = "https://portal.example"
    header = cookie_header(client.get("/page?mmref=tok1", base_url=base), "__Host-mmref")
    assert header is not None
    assert "Secure" in header
    assert "Path=/" in header
    assert "Domain" not in header
    with client.session_transaction(base_url=base) as sess:
        sess.clear()
    assert client.get("/page", base_url=base).json == {"mmref": "tok1"}
