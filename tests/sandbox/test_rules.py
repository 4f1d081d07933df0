"""The sandbox over real HTTP checks a request as protocol.md says: the signature first
(header form, secret, exact bytes, a 300-second replay window either way), then the JSON
and every field of the body; a dry run (``test``) is checked the same way, its server
too (MMOLove picks the secret by it), and answers without looking up the token or
writing anything.
"""

from __future__ import annotations

import json

import pytest
from sandbox_support import MISSING, fields, post, post_fields
from support import FakeClock

from flask_mmolove import Outcome, ReferralClient
from flask_mmolove.protocol import SIGNATURE_HEADER, sign_referral_body
from flask_mmolove.sandbox import SandboxServer

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


def test_dry_run_does_not_look_up_the_token(mmolove_sandbox: SandboxServer) -> None:
    data = fields(mmolove_sandbox, token="not-a-real-token", test=True)
    assert post_fields(mmolove_sandbox, data).json() == {"ok": True, "test": True}


def test_dry_run_for_an_unknown_server_is_404(mmolove_sandbox: SandboxServer) -> None:
    # MMOLove picks the secret by server id: a dry run for an unknown server cannot
    # pass (protocol.md section 8), which is how `flask mmolove ping` catches a wrong id.
    data = fields(mmolove_sandbox, token="not-a-real-token", server_id="elsewhere", test=True)
    response = post_fields(mmolove_sandbox, data)
    assert (response.status_code, response.json()) == (404, {"error": "unknown server"})
    assert mmolove_sandbox.events[-1].verdict == "unknown_server"


def test_malformed_dry_run_is_still_400(mmolove_sandbox: SandboxServer) -> None:
    data = fields(mmolove_sandbox, referee_identity=MISSING, test=True)
    response = post_fields(mmolove_sandbox, data)
    assert response.status_code == 400
    assert response.json()["field"] == "referee_identity"


def test_badly_signed_dry_run_is_401(mmolove_sandbox: SandboxServer) -> None:
    data = fields(mmolove_sandbox, test=True)
    assert post_fields(mmolove_sandbox, data, secret="wrong").status_code == 401
