"""Each 2xx outcome, through ReferralClient's SDK-shaped methods, over real HTTP.

Advanced, duplicate, first-touch conflict, dry run, and answers of a shape the docs do
not list (accepted): every one a SendResult, read from what the sandbox answered.
"""

from __future__ import annotations

import json

from client_support import Answer, Seen, last, tiny_server

from flask_mmolove import ReferralClient, SendResult
from flask_mmolove.protocol import Outcome
from flask_mmolove.sandbox import SandboxServer


def test_registered_then_qualified_advance(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token("friend")
    referral_id = mmolove_sandbox.referrals[token].referral_id

    result = mmolove_client.registered(token, referee_identity="7842", server_event_id="reg-7842")
    assert isinstance(result, SendResult)
    assert (result.status, result.ok, result.outcome) == (200, True, Outcome.ADVANCED)
    assert result.data == {"ok": True, "referral_id": referral_id, "state": "registered"}
    assert json.loads(result.body) == result.data
    assert result.elapsed > 0
    assert mmolove_sandbox.referrals[token].state == "registered"
    assert mmolove_sandbox.referrals[token].referee_identity == "7842"

    result = mmolove_client.qualified(token, server_event_id="qual-7842")
    assert (result.status, result.ok, result.outcome) == (200, True, Outcome.ADVANCED)
    assert result.data == {"ok": True, "referral_id": referral_id, "state": "qualified"}
    assert mmolove_sandbox.referrals[token].state == "qualified"
    assert mmolove_sandbox.accepted_count("registered") == 1
    assert mmolove_sandbox.accepted_count("qualified") == 1
    assert [r.verdict for r in mmolove_sandbox.events] == ["advanced", "advanced"]


def test_duplicate(mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient) -> None:
    token = mmolove_sandbox.mint_token()
    first = mmolove_client.registered(token, referee_identity="p-1", server_event_id="reg-1")
    again = mmolove_client.registered(token, referee_identity="p-1", server_event_id="reg-1")
    assert first.outcome is Outcome.ADVANCED
    assert (again.status, again.ok, again.outcome) == (200, True, Outcome.DUPLICATE)
    assert again.data == {"ok": True, "duplicate": True}
    assert mmolove_sandbox.accepted_count("registered") == 1
    assert mmolove_sandbox.accepted_posts(token, "registered") == 2


def test_first_touch_conflict(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    first = mmolove_sandbox.mint_token("alice")
    second = mmolove_sandbox.mint_token("bob")
    assert mmolove_client.registered(first, referee_identity="p-9", server_event_id="r1").ok
    result = mmolove_client.registered(second, referee_identity="p-9", server_event_id="r2")
    assert (result.status, result.ok, result.outcome) == (200, True, Outcome.FIRST_TOUCH_CONFLICT)
    assert result.data == {"ok": True, "ignored": "first_touch_conflict"}
    assert mmolove_sandbox.referrals[first].referee_identity == "p-9"
    assert mmolove_sandbox.referrals[second].state == "clicked"


def test_dry_run(mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient) -> None:
    token = mmolove_sandbox.mint_token()
    result = mmolove_client.registered(
        token, referee_identity="p-1", server_event_id="test-1", test=True
    )
    assert (result.status, result.ok, result.outcome) == (200, True, Outcome.TEST)
    assert result.data == {"ok": True, "test": True}
    assert json.loads(last(mmolove_sandbox).body)["test"] is True
    assert mmolove_sandbox.accepted_count() == 0
    assert mmolove_sandbox.referrals[token].state == "clicked"
    result = mmolove_client.qualified(token, server_event_id="test-2", test=True)
    assert result.outcome is Outcome.TEST


def test_undocumented_200_shape_is_accepted(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    mmolove_sandbox.fail_next(status=200, body={"ok": True, "something": "new"})
    result = mmolove_client.qualified(mmolove_sandbox.mint_token(), server_event_id="q-1")
    assert (result.status, result.ok, result.outcome) == (200, True, Outcome.ACCEPTED)
    assert result.data == {"ok": True, "something": "new"}


def test_send_with_extras_and_reversed(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    assert mmolove_client.registered(token, referee_identity="p", server_event_id="r").ok
    result = mmolove_client.send(
        "reversed", token, server_event_id="rev-1", ts=123, extra={"why": "x"}
    )
    assert (result.status, result.outcome) == (200, Outcome.ADVANCED)
    assert last(mmolove_sandbox).body == (
        b'{"event":"reversed","token":"'
        + token.encode()
        + b'","server_id":"'
        + mmolove_sandbox.server_id.encode()
        + b'","server_event_id":"rev-1","ts":123,"why":"x"}'
    )
    assert mmolove_sandbox.referrals[token].reversals == 1


def test_answer_that_is_not_utf8_is_still_a_result() -> None:
    def answer(seen: Seen, url: str) -> Answer:
        return 200, [("Content-Type", "application/json")], b'{"ok":true,"x":"\xff"}'

    with tiny_server(answer) as tiny, ReferralClient("srv", "s3cret", tiny.endpoint) as c:
        result = c.qualified("tok", server_event_id="q", ts=1)
    assert (result.status, result.ok) == (200, True)
    assert result.body == '{"ok":true,"x":"\ufffd"}'
    assert result.outcome is Outcome.ACCEPTED
