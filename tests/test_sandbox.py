"""The sandbox over real HTTP on 127.0.0.1: every rule of protocol.md it models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from support import FakeClock

from flask_mmolove import Action, Outcome, ReferralClient, TransportError, classify
from flask_mmolove.protocol import SIGNATURE_HEADER, sign_referral_body
from flask_mmolove.sandbox import (
    TOKEN_LIFETIME,
    ForgedTokenError,
    SandboxServer,
    TokenMinter,
    create_sandbox_app,
    derive_token_key,
    sandbox_state,
)

Factory = Callable[..., SandboxServer]
T0 = 1_700_000_000
MISSING = object()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def clocked(mmolove_sandbox_factory: Factory, clock: FakeClock) -> SandboxServer:
    return mmolove_sandbox_factory(clock=clock)


def fields(sandbox: SandboxServer, kind: str = "registered", /, **overrides: Any) -> dict[str, Any]:
    """A valid body of ``kind`` as a dict; ``overrides`` replace fields, MISSING drops one."""
    body: dict[str, Any] = {
        "event": kind,
        "token": overrides.pop("token") if "token" in overrides else sandbox.mint_token(),
        "server_id": sandbox.server_id,
        "referee_identity": "player-1",
        "server_event_id": f"{kind[:3]}-player-1",
        "ts": T0,
    }
    if kind != "registered":
        del body["referee_identity"]
    body.update(overrides)
    return {key: value for key, value in body.items() if value is not MISSING}


def encode(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def post(
    sandbox: SandboxServer,
    body: bytes,
    *,
    t: int | None = None,
    secret: str | None = None,
    header: str | object | None = MISSING,
) -> requests.Response:
    """POST raw bytes, signed now (or at ``t``) unless ``header`` says otherwise."""
    headers = {"Content-Type": "application/json"}
    if header is MISSING:
        headers[SIGNATURE_HEADER] = sign_referral_body(secret or sandbox.secret, body, t)
    elif isinstance(header, str):
        headers[SIGNATURE_HEADER] = header
    return requests.post(sandbox.endpoint, data=body, headers=headers, timeout=10)


def post_fields(sandbox: SandboxServer, data: Any, **kwargs: Any) -> requests.Response:
    return post(sandbox, encode(data), **kwargs)


# --- signature ----------------------------------------------------------------------


def test_missing_signature_header_is_400(mmolove_sandbox: SandboxServer) -> None:
    response = post_fields(mmolove_sandbox, fields(mmolove_sandbox), header=None)
    assert response.status_code == 400
    assert SIGNATURE_HEADER in response.json()["error"]
    assert mmolove_sandbox.events[-1].verdict == "malformed_signature"


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        "t=abc,v1=sha256=" + "0" * 64,
        "t=1700000000,v1=" + "0" * 64,  # the reward-callback form
        "t=1700000000, v1=sha256=" + "0" * 64,
        "v1=sha256=" + "0" * 64,
    ],
)
def test_malformed_signature_header_is_400(mmolove_sandbox: SandboxServer, header: str) -> None:
    response = post_fields(mmolove_sandbox, fields(mmolove_sandbox), header=header)
    assert response.status_code == 400
    assert response.json()["error"]
    assert mmolove_sandbox.accepted_count() == 0


def test_wrong_secret_is_401_bad_signature(mmolove_sandbox: SandboxServer) -> None:
    response = post_fields(mmolove_sandbox, fields(mmolove_sandbox), secret="not-the-secret")
    assert response.status_code == 401
    assert response.json()["error"] == "bad_signature"
    assert mmolove_sandbox.events[-1].verdict == "bad_signature"


def test_body_reserialised_after_signing_is_401(mmolove_sandbox: SandboxServer) -> None:
    data = fields(mmolove_sandbox)
    signed = json.dumps(data, separators=(",", ":")).encode()
    sent = json.dumps(data).encode()  # same JSON, other bytes: the classic bug
    header = sign_referral_body(mmolove_sandbox.secret, signed)
    response = post(mmolove_sandbox, sent, header=header)
    assert response.status_code == 401
    assert response.json()["error"] == "bad_signature"


@pytest.mark.parametrize(
    ("offset", "status"), [(-300, 200), (300, 200), (-301, 401), (301, 401), (-86_400, 401)]
)
def test_replay_window_is_300_seconds_either_way(
    clocked: SandboxServer, clock: FakeClock, offset: int, status: int
) -> None:
    data = fields(clocked, test=True)
    response = post_fields(clocked, data, t=int(clock()) + offset)
    assert response.status_code == status
    if status == 401:
        assert response.json()["error"] == "bad_signature"
        assert "window" in response.json()["detail"]
        assert clocked.events[-1].verdict == "stale_signature"


def test_signature_is_checked_before_json(mmolove_sandbox: SandboxServer) -> None:
    response = post(mmolove_sandbox, b"{not json", secret="wrong")
    assert response.status_code == 401


# --- JSON and fields ----------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe{}", b'{"a":NaN}', b"NaN"])
def test_invalid_json_is_400(mmolove_sandbox: SandboxServer, body: bytes) -> None:
    response = post(mmolove_sandbox, body)
    assert response.status_code == 400
    assert response.json() == {"error": "body is not valid JSON"}
    assert mmolove_sandbox.events[-1].verdict == "invalid_json"


@pytest.mark.parametrize("body", [b"[]", b'"registered"', b"null", b"42"])
def test_json_that_is_not_an_object_is_400(mmolove_sandbox: SandboxServer, body: bytes) -> None:
    response = post(mmolove_sandbox, body)
    assert response.status_code == 400
    assert "object" in response.json()["error"]


@pytest.mark.parametrize(
    "name", ["event", "token", "server_id", "server_event_id", "referee_identity"]
)
@pytest.mark.parametrize(
    ("value", "why"),
    [(MISSING, "required"), (None, "required"), ("", "required"), ("   ", "blank"), (7, "string")],
)
def test_each_required_field_missing_blank_or_not_a_string_is_400(
    mmolove_sandbox: SandboxServer, name: str, value: object, why: str
) -> None:
    data = fields(mmolove_sandbox, "registered", **{name: value})
    if value is MISSING:
        assert name not in data
    response = post_fields(mmolove_sandbox, data)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == name
    assert why in response.json()["error"]
    assert mmolove_sandbox.accepted_count() == 0


@pytest.mark.parametrize("event", ["signup", "Registered", "qualify"])
def test_unknown_event_is_400(mmolove_sandbox: SandboxServer, event: str) -> None:
    response = post_fields(mmolove_sandbox, fields(mmolove_sandbox, event=event))
    assert response.status_code == 400
    assert response.json()["field"] == "event"


@pytest.mark.parametrize(
    ("name", "value"), [("ts", "yesterday"), ("ts", True), ("ts", -5), ("test", "true")]
)
def test_optional_fields_of_the_wrong_type_are_400(
    mmolove_sandbox: SandboxServer, name: str, value: object
) -> None:
    response = post_fields(mmolove_sandbox, fields(mmolove_sandbox, **{name: value}))
    assert response.status_code == 400
    assert response.json()["field"] == name


def test_strings_are_trimmed_and_extra_fields_accepted(mmolove_sandbox: SandboxServer) -> None:
    token = mmolove_sandbox.mint_token()
    data = fields(
        mmolove_sandbox,
        token=f"  {token}\n",
        server_id=f" {mmolove_sandbox.server_id} ",
        referee_identity=" player-1 ",
        portal_version="2.4",
        nested={"anything": [1, 2]},
    )
    response = post_fields(mmolove_sandbox, data)
    assert response.status_code == 200, response.text
    referral = mmolove_sandbox.referrals[token]
    assert (referral.state, referral.referee_identity) == ("registered", "player-1")
    assert mmolove_sandbox.events[-1].token == token


def test_referee_identity_is_not_needed_after_registered(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    mmolove_client.registered(token, referee_identity="player-1", server_event_id="reg-1")
    response = post_fields(mmolove_sandbox, fields(mmolove_sandbox, "qualified", token=token))
    assert response.json()["state"] == "qualified"


# --- dry runs -----------------------------------------------------------------------


def test_dry_run_answers_test_and_writes_nothing(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    result = mmolove_client.registered(
        token, referee_identity="player-1", server_event_id="reg-1", test=True
    )
    assert (result.status, result.data) == (200, {"ok": True, "test": True})
    assert result.outcome is Outcome.TEST
    assert mmolove_sandbox.accepted_count() == 0
    assert mmolove_sandbox.accepted_posts(token, "registered") == 0
    assert mmolove_sandbox.referrals[token].state == "clicked"
    # Nothing was remembered either: the same key, sent for real, is not a duplicate.
    real = mmolove_client.registered(token, referee_identity="player-1", server_event_id="reg-1")
    assert real.outcome is Outcome.ADVANCED


def test_dry_run_does_not_look_up_the_token_or_server(mmolove_sandbox: SandboxServer) -> None:
    data = fields(mmolove_sandbox, token="not-a-real-token", server_id="elsewhere", test=True)
    assert post_fields(mmolove_sandbox, data).json() == {"ok": True, "test": True}


def test_malformed_dry_run_is_still_400(mmolove_sandbox: SandboxServer) -> None:
    data = fields(mmolove_sandbox, referee_identity=MISSING, test=True)
    response = post_fields(mmolove_sandbox, data)
    assert response.status_code == 400
    assert response.json()["field"] == "referee_identity"


def test_badly_signed_dry_run_is_401(mmolove_sandbox: SandboxServer) -> None:
    data = fields(mmolove_sandbox, test=True)
    assert post_fields(mmolove_sandbox, data, secret="wrong").status_code == 401


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


# --- the state machine --------------------------------------------------------------


def test_registered_then_qualified_advances(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token("alice")
    reg = mmolove_client.registered(
        token, referee_identity="player-1", server_event_id="reg-player-1"
    )
    assert reg.status == 200
    assert reg.outcome is Outcome.ADVANCED
    assert reg.data is not None
    assert reg.data["state"] == "registered"
    qual = mmolove_client.qualified(token, server_event_id="qual-player-1")
    assert qual.outcome is Outcome.ADVANCED
    assert qual.data == {"ok": True, "referral_id": reg.data["referral_id"], "state": "qualified"}
    referral = mmolove_sandbox.referrals[token]
    assert (referral.referrer, referral.state, referral.referee_identity) == (
        "alice",
        "qualified",
        "player-1",
    )
    assert referral.referral_id == reg.data["referral_id"]
    assert mmolove_sandbox.accepted_count() == 2
    assert [e.verdict for e in mmolove_sandbox.events] == ["advanced", "advanced"]


def test_qualified_before_registered_is_422_and_not_remembered(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    early = mmolove_client.qualified(token, server_event_id="qual-1")
    assert early.status == 422
    assert early.outcome is None
    assert early.data is not None
    assert "registered" in early.data["error"]
    assert classify(early.status).action is Action.DEAD
    mmolove_client.registered(token, referee_identity="player-1", server_event_id="reg-1")
    # The 422 wrote nothing, so the same key now advances instead of being a duplicate.
    assert mmolove_client.qualified(token, server_event_id="qual-1").data == {
        "ok": True,
        "referral_id": mmolove_sandbox.referrals[token].referral_id,
        "state": "qualified",
    }


def test_same_event_again_is_a_duplicate(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    first = mmolove_client.registered(token, referee_identity="player-1", server_event_id="reg-1")
    again = mmolove_client.registered(token, referee_identity="player-1", server_event_id="reg-1")
    assert first.outcome is Outcome.ADVANCED
    assert again.outcome is Outcome.DUPLICATE
    assert again.data == {"ok": True, "duplicate": True}
    assert mmolove_sandbox.accepted_count("registered") == 1
    assert mmolove_sandbox.accepted_posts(token, "registered") == 2
    assert mmolove_sandbox.events[-1].verdict == "duplicate"


def test_new_key_for_a_state_already_reached_reports_that_state(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    mmolove_client.registered(token, referee_identity="player-1", server_event_id="reg-1")
    again = mmolove_client.registered(token, referee_identity="player-1", server_event_id="reg-2")
    assert again.outcome is Outcome.ADVANCED
    assert again.data is not None
    assert again.data["state"] == "registered"
    mmolove_client.qualified(token, server_event_id="qual-1")
    late = mmolove_client.registered(token, referee_identity="player-1", server_event_id="reg-3")
    assert late.data is not None
    assert late.data["state"] == "qualified"
    assert mmolove_sandbox.events[-1].verdict == "unchanged"


def test_first_touch_wins_and_the_loser_is_ignored(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    first = mmolove_sandbox.mint_token("alice")
    second = mmolove_sandbox.mint_token("bob")
    mmolove_client.registered(first, referee_identity="player-1", server_event_id="reg-player-1")
    lost = mmolove_client.registered(
        second, referee_identity="player-1", server_event_id="reg-player-1"
    )
    assert lost.status == 200
    assert lost.data == {"ok": True, "ignored": "first_touch_conflict"}
    assert lost.outcome is Outcome.FIRST_TOUCH_CONFLICT
    assert mmolove_sandbox.referrals[second].state == "clicked"
    assert mmolove_sandbox.referrals[first].referee_identity == "player-1"
    # Qualifying the referee through the losing token is the same harmless no-op.
    qual = mmolove_client.qualified(second, server_event_id="qual-player-1")
    assert qual.outcome is Outcome.FIRST_TOUCH_CONFLICT
    assert mmolove_sandbox.referrals[first].state == "registered"


def test_reversed_is_accepted_and_recorded_but_changes_nothing(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    mmolove_client.registered(token, referee_identity="player-1", server_event_id="reg-1")
    result = mmolove_client.send("reversed", token, server_event_id="rev-1")
    assert result.outcome is Outcome.ADVANCED
    assert result.data is not None
    assert result.data["state"] == "registered"
    assert mmolove_sandbox.referrals[token].reversals == 1
    assert mmolove_sandbox.events[-1].verdict == "recorded"


def test_concurrent_copies_of_one_event_are_written_once(
    mmolove_sandbox: SandboxServer,
) -> None:
    token = mmolove_sandbox.mint_token()
    body = encode(fields(mmolove_sandbox, token=token))
    answers: list[dict[str, Any]] = []
    barrier = threading.Barrier(8)

    def send() -> None:
        barrier.wait()
        answers.append(post(mmolove_sandbox, body).json())

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(1 for a in answers if a.get("state") == "registered") == 1
    assert sum(1 for a in answers if a.get("duplicate")) == 7
    assert mmolove_sandbox.accepted_count("registered") == 1
    assert mmolove_sandbox.accepted_posts(token, "registered") == 8


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


# --- the delivery log ---------------------------------------------------------------


def test_log_json_has_every_request_with_raw_body_and_signature(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    body = mmolove_client.body("registered", token, referee_identity="p", server_event_id="reg-p")
    mmolove_client.send_body(body)
    post(mmolove_sandbox, b"{oops", secret="wrong")
    log = requests.get(mmolove_sandbox.url + "/log.json", timeout=10).json()
    assert [entry["verdict"] for entry in log] == ["advanced", "bad_signature"]
    first = log[0]
    assert first["body"] == body.decode()
    assert first["signature"].startswith("t=")
    assert first["status"] == 200
    assert first["response"]["state"] == "registered"
    assert (first["event"], first["token"], first["server_event_id"]) == (
        "registered",
        token,
        "reg-p",
    )
    assert log[1]["status"] == 401
    assert log[1]["body"] == "{oops"
    record = mmolove_sandbox.events[0]
    assert record.body == body
    assert record.signature == first["signature"]
    assert record.response == first["response"]


def test_log_page_lists_requests_escaped(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    mmolove_client.registered(
        token, referee_identity="p", server_event_id="<script>alert(1)</script>"
    )
    page = requests.get(mmolove_sandbox.url + "/log", timeout=10)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "<script>alert" not in page.text
    assert "registered" in page.text
    assert "advanced" in page.text
    assert token[:10] in page.text
    assert mmolove_sandbox.server_id in page.text


def test_secret_never_appears_in_log_state_or_reprs(mmolove_sandbox: SandboxServer) -> None:
    secret = mmolove_sandbox.secret
    token = mmolove_sandbox.mint_token()
    # Even a portal that leaks its secret into a body must not see it echoed back.
    data = fields(mmolove_sandbox, token=token, debug={"secret": secret})
    assert post_fields(mmolove_sandbox, data).status_code == 200
    post_fields(mmolove_sandbox, data, secret="wrong")
    mmolove_sandbox.fail_next(1, 503, body={"echo": secret})
    post_fields(mmolove_sandbox, data)
    for path in ("/log", "/log.json", "/_state", "/_faults"):
        text = requests.get(mmolove_sandbox.url + path, timeout=10).text
        assert secret not in text, path
    assert "[redacted]" in requests.get(mmolove_sandbox.url + "/log.json", timeout=10).text
    for obj in (mmolove_sandbox, mmolove_sandbox.state, mmolove_sandbox.state.tokens):
        assert secret not in repr(obj)
    assert secret not in repr(mmolove_sandbox.app.config)


def test_state_endpoint_and_reset(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token("alice")
    mmolove_client.registered(token, referee_identity="p", server_event_id="reg-p")
    mmolove_client.registered(token, referee_identity="p", server_event_id="reg-p")
    state = requests.get(mmolove_sandbox.url + "/_state", timeout=10).json()
    assert state["accepted"] == {"registered": 1}
    [referral] = state["referrals"]
    assert referral["accepted_posts"] == {"registered": 2}
    assert referral["referrer"] == "alice"
    assert requests.post(mmolove_sandbox.url + "/_reset", timeout=10).json() == {"ok": True}
    assert mmolove_sandbox.events == []
    assert mmolove_sandbox.referrals == {}
    # The token is still authentic after a reset: its referral is simply new.
    again = mmolove_client.registered(token, referee_identity="p", server_event_id="reg-p")
    assert again.outcome is Outcome.ADVANCED


# --- faults -------------------------------------------------------------------------


def test_fail_next_answers_the_status_with_retry_after(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    mmolove_sandbox.fail_next(2, status=503, retry_after=7)
    for _ in range(2):
        result = mmolove_client.registered(token, referee_identity="p", server_event_id="reg-p")
        assert result.status == 503
        assert result.headers["Retry-After"] == "7"
        decision = classify(result.status, retry_after=result.headers["Retry-After"])
        assert (decision.action, decision.retry_after) == (Action.RETRY, 7.0)
    result = mmolove_client.registered(token, referee_identity="p", server_event_id="reg-p")
    assert result.outcome is Outcome.ADVANCED
    assert [e.status for e in mmolove_sandbox.events] == [503, 503, 200]
    assert [e.fault for e in mmolove_sandbox.events] == ["status", "status", None]
    assert mmolove_sandbox.accepted_count() == 1


def test_fail_next_with_a_custom_body(mmolove_sandbox: SandboxServer) -> None:
    mmolove_sandbox.fail_next(1, status=429, body="slow down")
    response = post_fields(mmolove_sandbox, fields(mmolove_sandbox))
    assert (response.status_code, response.text) == (429, "slow down")
    assert "Retry-After" not in response.headers


def test_delay_next_holds_the_answer(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    mmolove_sandbox.delay_next(1, 0.4)
    started = time.monotonic()
    result = mmolove_client.registered(token, referee_identity="p", server_event_id="reg-p")
    assert time.monotonic() - started >= 0.4
    assert result.outcome is Outcome.ADVANCED
    assert mmolove_sandbox.events[-1].fault == "delay"
    started = time.monotonic()
    mmolove_client.qualified(token, server_event_id="qual-p")
    assert time.monotonic() - started < 0.4


def test_delay_longer_than_the_client_timeout_is_a_transport_failure(
    mmolove_sandbox: SandboxServer,
) -> None:
    token = mmolove_sandbox.mint_token()
    mmolove_sandbox.delay_next(1, 1.0)
    with mmolove_sandbox.client(timeout=(2.0, 0.2)) as client, pytest.raises(TransportError):
        client.registered(token, referee_identity="p", server_event_id="reg-p")
    mmolove_sandbox.clear_faults()


def test_drop_before_commit_writes_nothing(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    mmolove_sandbox.drop_next(1)
    with pytest.raises(requests.ConnectionError):
        post_fields(mmolove_sandbox, fields(mmolove_sandbox, token=token))
    assert mmolove_sandbox.accepted_count() == 0
    [record] = mmolove_sandbox.events
    assert (record.status, record.verdict, record.fault) == (None, "dropped", "drop")
    mmolove_sandbox.drop_next(1)
    with pytest.raises(TransportError):
        mmolove_client.registered(
            token, referee_identity="player-1", server_event_id="reg-player-1"
        )
    retry = mmolove_client.registered(
        token, referee_identity="player-1", server_event_id="reg-player-1"
    )
    assert retry.outcome is Outcome.ADVANCED


def test_drop_after_commit_loses_the_answer_but_keeps_the_event(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    mmolove_client.registered(token, referee_identity="p", server_event_id="reg-p")
    mmolove_sandbox.drop_next(1, after_commit=True)
    data = fields(mmolove_sandbox, "qualified", token=token, server_event_id="qual-p")
    with pytest.raises(requests.ConnectionError):
        post_fields(mmolove_sandbox, data)
    assert mmolove_sandbox.referrals[token].state == "qualified"
    assert mmolove_sandbox.accepted_count("qualified") == 1
    lost = mmolove_sandbox.events[-1]
    assert (lost.status, lost.verdict, lost.fault, lost.committed) == (
        None,
        "advanced",
        "drop_after_commit",
        True,
    )
    assert lost.response is not None
    assert lost.response["state"] == "qualified"
    retry = mmolove_client.qualified(token, server_event_id="qual-p")
    assert retry.outcome is Outcome.DUPLICATE
    assert mmolove_sandbox.accepted_count("qualified") == 1
    assert mmolove_sandbox.accepted_posts(token, "qualified") == 2


def test_faults_queue_in_order(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    mmolove_sandbox.fail_next(1, status=502)
    mmolove_sandbox.drop_next(1)
    mmolove_sandbox.fail_next(1, status=500)
    statuses: list[int | None] = []
    for _ in range(4):
        try:
            result = mmolove_client.registered(token, referee_identity="p", server_event_id="reg-p")
            statuses.append(result.status)
        except TransportError:
            statuses.append(None)
    assert statuses == [502, None, 500, 200]


def test_faults_over_http(mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient) -> None:
    url = mmolove_sandbox.url + "/_faults"
    plan = {
        "faults": [
            {"kind": "status", "count": 1, "status": 503, "retry_after": "3"},
            {"kind": "drop", "after_commit": True},
            {"kind": "delay", "seconds": 0.01},
        ]
    }
    answer = requests.post(url, json=plan, timeout=10).json()
    assert [f["kind"] for f in answer["faults"]] == ["status", "drop", "delay"]
    token = mmolove_sandbox.mint_token()
    first = mmolove_client.registered(token, referee_identity="p", server_event_id="reg-p")
    assert (first.status, first.headers["Retry-After"]) == (503, "3")
    with pytest.raises(TransportError):
        mmolove_client.registered(token, referee_identity="p", server_event_id="reg-p")
    third = mmolove_client.registered(token, referee_identity="p", server_event_id="reg-p")
    assert third.outcome is Outcome.DUPLICATE
    assert requests.get(url, timeout=10).json()["faults"] == []
    requests.post(url, json={"kind": "drop", "count": 5}, timeout=10)
    assert requests.delete(url, timeout=10).json() == {"ok": True, "faults": []}
    assert mmolove_sandbox.state.faults == []


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "explode"},
        {"kind": "status", "status": 99},
        {"kind": "status", "count": 0},
        {"kind": "delay"},
        {"kind": "drop", "after_commit": "yes"},
        [{"kind": "drop"}, {"kind": "status", "status": "500"}],
        "drop",
    ],
)
def test_malformed_fault_plans_are_400_and_add_nothing(
    mmolove_sandbox: SandboxServer, spec: Any
) -> None:
    response = requests.post(mmolove_sandbox.url + "/_faults", json=spec, timeout=10)
    assert response.status_code == 400
    assert mmolove_sandbox.state.faults == []


# --- running it ---------------------------------------------------------------------


def test_stop_is_quick_frees_the_port_and_leaves_no_thread() -> None:
    sandbox = SandboxServer().start()
    url = sandbox.url
    with sandbox.client() as client:
        client.registered(sandbox.mint_token(), referee_identity="p", server_event_id="reg-p")
    sandbox.delay_next(1, 30)

    def held_when_stopped() -> None:
        with pytest.raises(requests.ConnectionError):
            post_fields(sandbox, {})

    pending = threading.Thread(target=held_when_stopped)
    pending.start()
    while not sandbox.events and sandbox.state.faults:
        time.sleep(0.01)
    started = time.monotonic()
    sandbox.stop()
    sandbox.stop()
    assert time.monotonic() - started < 2
    pending.join(5)
    assert not pending.is_alive()
    assert not any(t.name.startswith("mmolove-sandbox") for t in threading.enumerate())
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/log", timeout=2)
    with pytest.raises(RuntimeError):
        _ = sandbox.url


def test_context_manager_and_repr() -> None:
    with SandboxServer(server_id="srv-1", secret="a-long-enough-secret") as sandbox:
        assert sandbox.running
        assert sandbox.endpoint == sandbox.url + "/api/referral/events"
        assert sandbox.url.startswith("http://127.0.0.1:")
        assert "srv-1" in repr(sandbox)
    assert not sandbox.running
    assert "stopped" in repr(sandbox)


def test_command_line_runs_and_never_prints_the_secret() -> None:
    secret = "cli-secret-" + os.urandom(8).hex()
    env = {**os.environ, "MMOLOVE_REFERRAL_SECRET": secret, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "flask_mmolove.sandbox", "--port", "0", "--server-id", "cli"]
    args += ["--registration-url", "http://portal.test/join"]
    with subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            lines = [process.stdout.readline() for _ in range(4)]
            urls = {
                line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in lines[1:]
            }
            assert urls["share link"].endswith("/r/cli?ref=friend")
            assert urls["endpoint"].endswith("/api/referral/events")
            page = requests.get(urls["log"], timeout=10)
            assert page.status_code == 200
            shared = requests.get(urls["share link"], allow_redirects=False, timeout=10)
            assert shared.headers["Location"].startswith("http://portal.test/join?mmref=")
        finally:
            process.terminate()
            out, err = process.communicate(timeout=10)
    assert secret not in "".join(lines) + out + err


def test_command_line_requires_a_secret(capsys: pytest.CaptureFixture[str]) -> None:
    from flask_mmolove.sandbox import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--server-id", "x", "--registration-url", "http://p.test/"], env={})
    assert exit_info.value.code == 2
    assert "MMOLOVE_REFERRAL_SECRET" in capsys.readouterr().err


def test_app_works_in_process_with_the_flask_test_client() -> None:
    app = create_sandbox_app(
        secret="in-process-secret", server_id="srv", registration_url="http://p.test/"
    )
    app.testing = True
    state = sandbox_state(app)
    body = encode(
        {
            "event": "qualified",
            "token": state.mint_token(),
            "server_id": "srv",
            "server_event_id": "q",
        }
    )
    headers = {SIGNATURE_HEADER: sign_referral_body("in-process-secret", body)}
    client = app.test_client()
    assert client.post("/api/referral/events", data=body, headers=headers).status_code == 422
    assert client.get("/").headers["Location"] == "/log"
    # Without a socket there is no connection to drop: the request fails loudly instead.
    state.drop_next(1)
    with pytest.raises(ConnectionAbortedError):
        client.post("/api/referral/events", data=body, headers=headers)
