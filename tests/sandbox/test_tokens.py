"""Servers, tokens and share links in the sandbox: an unknown server, a forged, expired
or other server's token is 404; the token key is derived from the secret, never the
secret itself; a share link mints a working token per click and keeps the portal's
registration URL as it was given.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from sandbox_support import Factory, fields, post_fields
from support import FakeClock

from flask_mmolove import Outcome
from flask_mmolove.sandbox import (
    TOKEN_LIFETIME,
    ForgedTokenError,
    SandboxServer,
    TokenMinter,
    create_sandbox_app,
    derive_token_key,
)

# --- server and token ---------------------------------------------------------------


def test_unknown_server_is_404(mmolove_sandbox: SandboxServer) -> None:
    response = post_fields(mmolove_sandbox, fields(mmolove_sandbox, server_id="someone-else"))
    assert response.status_code == 404
    assert mmolove_sandbox.events[-1].verdict == "unknown_server"


def test_forged_tokens_are_404(mmolove_sandbox: SandboxServer) -> None:
    real = mmolove_sandbox.mint_token()
    payload, mac = real.rsplit(".", 1)
    stranger = TokenMinter("another key").mint(mmolove_sandbox.server_id, "friend")
    for token in ["made-up", f"{payload}x.{mac}", f"{payload}.{mac[:-2]}AA", stranger]:
        response = post_fields(mmolove_sandbox, fields(mmolove_sandbox, token=token))
        assert response.status_code == 404, token
        assert mmolove_sandbox.events[-1].verdict == "unknown_token"


def test_token_expires_after_90_days_of_mmolove_time(
    clocked: SandboxServer, clock: FakeClock
) -> None:
    token = clocked.mint_token()
    clock.advance(TOKEN_LIFETIME - 1)
    data = fields(clocked, token=token, server_event_id="reg-a")
    assert post_fields(clocked, data, t=int(clock())).status_code == 200
    clock.advance(1)
    data = fields(clocked, "qualified", token=token)
    response = post_fields(clocked, data, t=int(clock()))
    assert response.status_code == 404
    assert clocked.events[-1].verdict == "token_expired"


def test_token_of_another_server_is_404(mmolove_sandbox: SandboxServer) -> None:
    token = mmolove_sandbox.mint_token(server_id="another-server")
    response = post_fields(mmolove_sandbox, fields(mmolove_sandbox, token=token))
    assert response.status_code == 404
    assert mmolove_sandbox.events[-1].verdict == "token_other_server"


def test_token_key_is_derived_not_the_secret() -> None:
    key = derive_token_key("s3cret-value")
    assert key != "s3cret-value"
    assert key == derive_token_key("s3cret-value")
    minter = TokenMinter(key)
    token = minter.mint("srv", "friend")
    assert "s3cret-value" not in token
    assert minter.verify(token, "srv").referrer == "friend"
    with pytest.raises(ForgedTokenError):
        TokenMinter(derive_token_key("other")).verify(token, "srv")


# --- share links --------------------------------------------------------------------


def test_share_link_mints_a_working_token_and_keeps_the_query(
    mmolove_sandbox_factory: Factory,
) -> None:
    sandbox = mmolove_sandbox_factory(
        registration_url="http://portal.test/join?src=mm%20love&x=1#form"
    )
    response = requests.get(sandbox.share_link("alice"), allow_redirects=False, timeout=10)
    assert response.status_code == 302
    location = urlsplit(response.headers["Location"])
    assert (location.scheme, location.netloc, location.path) == ("http", "portal.test", "/join")
    assert location.query.startswith("src=mm%20love&x=1&mmref=")
    assert location.fragment == "form"
    [token] = parse_qs(location.query)["mmref"]
    assert response.cookies["mmref"] == token
    assert sandbox.referrals[token].referrer == "alice"
    assert sandbox.referrals[token].state == "clicked"
    with sandbox.client() as client:
        result = client.registered(token, referee_identity="p", server_event_id="reg-p")
    assert result.outcome is Outcome.ADVANCED


def test_share_link_cookie_stays_on_the_share_link(mmolove_sandbox: SandboxServer) -> None:
    # MMOLove's cookie lives on MMOLove's domain; the sandbox shares a host with the
    # portal, so its cookie is kept to the share link's own path instead.
    response = requests.get(mmolove_sandbox.share_link(), allow_redirects=False, timeout=10)
    [cookie] = [c for c in response.cookies if c.name == "mmref"]
    assert cookie.path == f"/r/{mmolove_sandbox.server_id}"
    assert cookie.has_nonstandard_attr("HttpOnly")


def test_each_click_is_a_distinct_referral(mmolove_sandbox: SandboxServer) -> None:
    tokens = {
        parse_qs(urlsplit(r.headers["Location"]).query)["mmref"][0]
        for r in (
            requests.get(mmolove_sandbox.share_link(), allow_redirects=False, timeout=10)
            for _ in range(3)
        )
    }
    assert len(tokens) == 3
    assert mmolove_sandbox.state.clicks == 3


@pytest.mark.parametrize(
    ("path", "status"),
    [("/r/unknown-server?ref=alice", 404), ("/r/{sid}", 400), ("/r/{sid}?ref=%20", 400)],
)
def test_share_link_errors(mmolove_sandbox: SandboxServer, path: str, status: int) -> None:
    url = mmolove_sandbox.url + path.format(sid=mmolove_sandbox.server_id)
    response = requests.get(url, allow_redirects=False, timeout=10)
    assert response.status_code == status
    assert response.json()["error"]
    assert mmolove_sandbox.referrals == {}


def test_registration_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="registration_url"):
        create_sandbox_app(secret="s", server_id="x", registration_url="portal.example/join")
