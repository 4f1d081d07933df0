"""Non-2xx answers, redirects included, are results, never exceptions.

Each refusal of the sandbox (422, 404, 401, injected 4xx/5xx) comes back as a SendResult
with ``ok`` false, no outcome, its body and its headers, and classifies as delivery
expects; redirects are not followed.
"""

from __future__ import annotations

import pytest
from client_support import Answer, Seen, last, tiny_server

from flask_mmolove import ReferralClient, SendResult
from flask_mmolove.protocol import Action, classify
from flask_mmolove.sandbox import SandboxServer


def assert_not_ok(result: SendResult, status: int) -> None:
    assert isinstance(result, SendResult)
    assert result.status == status
    assert result.ok is False
    assert result.outcome is None


def test_qualified_first_is_422(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    result = mmolove_client.qualified(mmolove_sandbox.mint_token(), server_event_id="q-1")
    assert_not_ok(result, 422)
    assert result.data == {
        "error": "qualified before registered: send registered first",
        "state": "clicked",
    }
    assert classify(result.status).action is Action.DEAD


def test_unknown_token_is_404(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    result = mmolove_client.registered("not-a-token", referee_identity="p", server_event_id="r")
    assert_not_ok(result, 404)
    assert classify(result.status).reason == "not_found"


def test_token_of_another_server_is_404(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token("friend", server_id="someone-else")
    assert_not_ok(mmolove_client.registered(token, referee_identity="p", server_event_id="r"), 404)


def test_wrong_secret_is_401(mmolove_sandbox: SandboxServer) -> None:
    with ReferralClient(
        mmolove_sandbox.server_id, "not-the-secret", mmolove_sandbox.endpoint
    ) as wrong:
        result = wrong.registered(
            mmolove_sandbox.mint_token(), referee_identity="p", server_event_id="r"
        )
    assert_not_ok(result, 401)
    assert result.data is not None
    assert result.data["error"] == "bad_signature"
    assert last(mmolove_sandbox).verdict == "bad_signature"
    decision = classify(result.status)
    assert (decision.action, decision.slow) == (Action.RETRY, True)


def test_unknown_server_id_is_404(mmolove_sandbox: SandboxServer) -> None:
    with ReferralClient("other-server", mmolove_sandbox.secret, mmolove_sandbox.endpoint) as other:
        result = other.qualified(mmolove_sandbox.mint_token(), server_event_id="q")
    assert_not_ok(result, 404)


@pytest.mark.parametrize("status", [400, 500, 502, 503])
def test_server_errors_are_results_with_headers(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient, status: int
) -> None:
    mmolove_sandbox.fail_next(status=status, retry_after=7)
    result = mmolove_client.registered(
        mmolove_sandbox.mint_token(), referee_identity="p", server_event_id="r"
    )
    assert_not_ok(result, status)
    assert result.data == {"error": f"injected fault {status}"}
    assert result.headers["Retry-After"] == "7"
    decision = classify(result.status, retry_after=result.headers.get("Retry-After"))
    if status >= 500:
        assert (decision.action, decision.retry_after) == (Action.RETRY, 7.0)
    else:
        assert decision.action is Action.DEAD


def test_text_error_body(mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient) -> None:
    mmolove_sandbox.fail_next(status=503, body="upstream down")
    result = mmolove_client.qualified(mmolove_sandbox.mint_token(), server_event_id="q")
    assert_not_ok(result, 503)
    assert result.body == "upstream down"
    assert result.data is None


def test_headers_are_case_insensitive() -> None:
    # delivery reads result.headers.get("Retry-After"); servers may send any case.
    def answer(seen: Seen, url: str) -> Answer:
        return 503, [("retry-after", "7"), ("content-type", "application/json")], b"{}"

    with tiny_server(answer) as tiny, ReferralClient("srv", "s3cret-value", tiny.endpoint) as c:
        result = c.qualified("tok", server_event_id="q", ts=1)
    assert result.status == 503
    assert result.headers.get("Retry-After") == "7"
    assert result.headers.get("RETRY-AFTER") == "7"


def test_redirects_are_not_followed() -> None:
    def answer(seen: Seen, url: str) -> Answer:
        if seen.path == "/api/referral/events":
            return 302, [("Location", url + "/elsewhere")], b""
        return 200, [("Content-Type", "application/json")], b'{"ok":true,"test":true}'

    with tiny_server(answer) as tiny, ReferralClient("srv", "s3cret", tiny.endpoint) as c:
        result = c.qualified("tok", server_event_id="q", ts=1)
    assert_not_ok(result, 302)
    assert result.headers["Location"] == tiny.url + "/elsewhere"
    assert [seen.path for seen in tiny.seen] == ["/api/referral/events"]
    decision = classify(result.status)
    assert (decision.action, decision.reason, decision.slow) == (Action.RETRY, "redirect", True)
