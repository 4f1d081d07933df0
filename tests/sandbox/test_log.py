"""What the sandbox shows of what it received: /log.json keeps every request with its raw
body and signature, /log lists them escaped, /_state counts them and /_reset forgets
them, and the secret never appears in any of these pages or in a repr.
"""

from __future__ import annotations

import requests
from sandbox_support import fields, post, post_fields

from flask_mmolove import Outcome, ReferralClient
from flask_mmolove.sandbox import SandboxServer


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
