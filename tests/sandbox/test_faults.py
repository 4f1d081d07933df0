"""The sandbox's faults, planned in Python or over HTTP: the next answers fail with a
status (and Retry-After), arrive late, or are dropped before or after the event is
committed; faults queue in order, and a malformed fault plan is 400 and adds nothing.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests
from sandbox_support import fields, post_fields

from flask_mmolove import Action, Outcome, ReferralClient, TransportError, classify
from flask_mmolove.sandbox import SandboxServer


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
    held = mmolove_sandbox.events[-1]
    assert held.fault == "delay"
    # The log spans the wait: from arrival, before the delay, to the answer.
    assert held.received is not None
    assert held.time - held.received >= 0.4
    assert held.peer == "127.0.0.1"
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
