"""The bytes on the wire: the client sends exactly the body it built, signed afresh.

What the sandbox and a tiny recording server received: the body, its signature (which
verifies, with its key id), the timestamps, the User-Agent and the other headers.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from client_support import last, ok_answer, t_of, tiny_server

import flask_mmolove
from flask_mmolove import ReferralClient
from flask_mmolove.protocol import (
    BadSignatureError,
    Outcome,
    build_body,
    sign_referral_body,
    verify_signature,
)
from flask_mmolove.sandbox import SandboxServer


def test_recorded_body_is_the_built_body_and_verifies(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    body = mmolove_client.body(
        "registered",
        token,
        referee_identity="  Ünïcødé player 😀 ",
        server_event_id="reg-ü",
        extra={"portal": "Ψ", "level": 3},
    )
    result = mmolove_client.send_body(body)
    assert result.outcome is Outcome.ADVANCED
    record = last(mmolove_sandbox)
    assert record.body == body  # the very bytes built were signed and sent
    assert record.content_type == "application/json"
    assert record.signature is not None
    verify_signature(mmolove_sandbox.secret, record.body, record.signature)
    assert record.signature == sign_referral_body(
        mmolove_sandbox.secret, body, t_of(record.signature)
    )
    assert mmolove_sandbox.referrals[token].referee_identity == "Ünïcødé player 😀"
    with pytest.raises(BadSignatureError):
        verify_signature("another-secret", record.body, record.signature)


def test_registered_sends_exactly_build_body(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    before = int(time.time())
    mmolove_client.registered(token, referee_identity="p-1", server_event_id="reg-1")
    after = int(time.time())
    record = last(mmolove_sandbox)
    ts = json.loads(record.body)["ts"]
    assert before <= ts <= after
    assert before <= t_of(record.signature) <= after
    assert record.body == build_body(
        "registered",
        token=token,
        server_id=mmolove_sandbox.server_id,
        server_event_id="reg-1",
        referee_identity="p-1",
        ts=ts,
    )


def test_explicit_ts_is_sent(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    mmolove_client.registered(token, referee_identity="p", server_event_id="r", ts=1_600_000_000)
    assert json.loads(last(mmolove_sandbox).body)["ts"] == 1_600_000_000
    # ts is the event's time, t the signing time: an old ts is not a stale signature.
    assert last(mmolove_sandbox).verdict == "advanced"


def test_key_id_travels_in_the_header(mmolove_sandbox: SandboxServer) -> None:
    with mmolove_sandbox.client(key_id="2024-01") as keyed:
        result = keyed.qualified(mmolove_sandbox.mint_token(), server_event_id="q", test=True)
    assert result.outcome is Outcome.TEST
    signature = last(mmolove_sandbox).signature
    assert signature is not None
    assert re.fullmatch(r"t=[0-9]+,v1=sha256=[0-9a-f]{64},kid=2024-01", signature)
    verify_signature({"2024-01": mmolove_sandbox.secret}, last(mmolove_sandbox).body, signature)


def test_each_send_is_signed_afresh_over_the_same_bytes(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    body = mmolove_client.body(
        "qualified", mmolove_sandbox.mint_token(), server_event_id="q", test=True
    )
    first = mmolove_client.send_body(body)
    start = int(time.time())
    while int(time.time()) == start:  # at most a second: t has one-second resolution
        time.sleep(0.02)
    second = mmolove_client.send_body(body)
    assert first.outcome is second.outcome is Outcome.TEST
    one, two = mmolove_sandbox.events[-2:]
    assert one.body == two.body == body
    assert one.signature != two.signature
    assert t_of(two.signature) > t_of(one.signature)
    for record in (one, two):
        assert record.signature is not None
        verify_signature(mmolove_sandbox.secret, record.body, record.signature)


def test_sign_is_pure_and_keyed(mmolove_sandbox: SandboxServer) -> None:
    body = b'{"event":"qualified"}'
    with mmolove_sandbox.client(key_id="k1") as keyed:
        assert keyed.sign(body, 1_700_000_000) == sign_referral_body(
            mmolove_sandbox.secret, body, 1_700_000_000, key_id="k1"
        )
    assert mmolove_sandbox.events == []


def test_user_agent_and_headers() -> None:
    with tiny_server(ok_answer) as tiny, ReferralClient("srv-1", "s3cret", tiny.endpoint) as c:
        body = c.body("qualified", "tok", server_event_id="q-1", ts=5)
        result = c.send_body(body)
    assert result.outcome is Outcome.TEST
    (seen,) = tiny.seen
    assert (seen.method, seen.path) == ("POST", "/api/referral/events")
    assert seen.headers["user-agent"] == f"flask-mmolove/{flask_mmolove.__version__}"
    assert re.fullmatch(r"flask-mmolove/[0-9]+\.[0-9]+\.[0-9]+\S*", seen.headers["user-agent"])
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["content-length"] == str(len(body))
    assert seen.body == body
    verify_signature("s3cret", seen.body, seen.headers["x-mmolove-signature"])
