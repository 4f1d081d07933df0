"""The referral state machine the sandbox models: registered then qualified advances,
qualified first is 422 and remembered nowhere, the same event again is a duplicate, the
first referrer to touch a player wins, reversed is recorded without changing the state,
and concurrent copies of one event are written once.
"""

from __future__ import annotations

import threading
from typing import Any

from sandbox_support import encode, fields, post

from flask_mmolove import Action, Outcome, ReferralClient, classify
from flask_mmolove.sandbox import SandboxServer


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
