"""Compatibility with MMOLove's own from-scratch Python client, both ways.

tests/guide_client.py is the guide's client verbatim: its requests pass our verifier
and the sandbox, ours pass the guide's signing formula, and our body is the bytes the
guide's serialiser would write for the same fields.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from client_support import SandboxFactory, closed_port, last, t_of
from hypothesis import given, settings
from hypothesis import strategies as st

from flask_mmolove import ReferralClient
from flask_mmolove.protocol import (
    Outcome,
    build_body,
    sign_referral_body,
    verify_signature,
)
from flask_mmolove.sandbox import SandboxServer


def _load_guide() -> ModuleType:
    # By path, so it works whether or not tests/ is a package; it lives in tests/, one
    # level up, where bench/portals.py loads it from too.
    path = Path(__file__).resolve().parent.parent / "guide_client.py"
    spec = importlib.util.spec_from_file_location("mmolove_guide_client", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


guide = _load_guide()


def guide_signature(secret: str, raw: str, t: int) -> str:
    """The guide's signing lines, as written there, for a body and a t we choose."""
    mac = hmac.new(secret.encode(), f"{t}.{raw}".encode(), hashlib.sha256).hexdigest()
    return f"t={t},v1=sha256={mac}"


def test_guide_client_is_accepted_by_the_sandbox(mmolove_sandbox: SandboxServer) -> None:
    token = mmolove_sandbox.mint_token()
    status, body = guide.mmolove_send_event(
        mmolove_sandbox.secret,
        mmolove_sandbox.server_id,
        "registered",
        {"token": token, "referee_identity": "7842", "server_event_id": "reg-7842"},
        endpoint=mmolove_sandbox.endpoint,
    )
    assert status == 200
    referral_id = mmolove_sandbox.referrals[token].referral_id
    assert json.loads(body) == {"ok": True, "referral_id": referral_id, "state": "registered"}
    record = last(mmolove_sandbox)
    assert record.verdict == "advanced"
    assert record.signature is not None
    verify_signature(mmolove_sandbox.secret, record.body, record.signature)
    # Our signer, given the guide's t and bytes, writes the guide's header exactly.
    t = t_of(record.signature)
    assert sign_referral_body(mmolove_sandbox.secret, record.body, t) == record.signature

    # The guide and our client then interoperate on one referral.
    with mmolove_sandbox.client() as c:
        again = c.registered(token, referee_identity="7842", server_event_id="reg-7842")
        qualified = c.qualified(token, server_event_id="qual-7842")
    assert again.outcome is Outcome.DUPLICATE
    assert qualified.data == {"ok": True, "referral_id": referral_id, "state": "qualified"}


@pytest.mark.parametrize(
    "secret", ["ünïcödé-秘密-🔑-secret", "00112233445566778899aabbccddeeff", "a b,c=d;e"]
)
def test_guide_and_ours_agree_on_awkward_secrets(
    mmolove_sandbox_factory: SandboxFactory, secret: str
) -> None:
    sandbox = mmolove_sandbox_factory(secret=secret)
    token = sandbox.mint_token()
    status, body = guide.mmolove_send_event(
        secret,
        sandbox.server_id,
        "registered",
        {"token": token, "referee_identity": "Zoë 😀", "server_event_id": "reg-ë"},
        endpoint=sandbox.endpoint,
    )
    assert (status, json.loads(body)["state"]) == (200, "registered")
    guide_record = last(sandbox)
    assert b"\\u00eb" in guide_record.body  # the guide's json.dumps escapes non-ASCII too

    with ReferralClient(sandbox.server_id, secret, sandbox.endpoint) as c:
        result = c.registered(token, referee_identity="Zoë 😀", server_event_id="reg-ë")
    assert result.outcome is Outcome.DUPLICATE  # same event, as MMOLove sees it
    ours = last(sandbox)
    for record in (guide_record, ours):
        assert record.signature is not None
        verify_signature(secret, record.body, record.signature)
    # Our bytes pass the guide's own signing formula, and the guide's pass ours.
    assert ours.signature == guide_signature(secret, ours.body.decode(), t_of(ours.signature))
    assert guide_record.signature == sign_referral_body(
        secret, guide_record.body, t_of(guide_record.signature)
    )


def test_guide_client_dry_run_and_errors(mmolove_sandbox: SandboxServer) -> None:
    token = mmolove_sandbox.mint_token()
    status, body = guide.mmolove_send_event(
        mmolove_sandbox.secret,
        mmolove_sandbox.server_id,
        "registered",
        {"token": token, "referee_identity": "p", "server_event_id": "test-1", "test": True},
        endpoint=mmolove_sandbox.endpoint,
    )
    assert (status, json.loads(body)) == (200, {"ok": True, "test": True})
    status, body = guide.mmolove_send_event(
        "wrong-secret",
        mmolove_sandbox.server_id,
        "qualified",
        {"token": token, "server_event_id": "q"},
        endpoint=mmolove_sandbox.endpoint,
    )
    assert status == 401
    assert json.loads(body)["error"] == "bad_signature"
    status, _ = guide.mmolove_send_event(
        "s", "srv", "qualified", {}, endpoint=f"http://127.0.0.1:{closed_port()}/x"
    )
    assert status == 0


text_field = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20).filter(
    lambda s: s.strip() != ""
)


json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.text(max_size=10)
)


extras = st.dictionaries(
    st.text(max_size=8).filter(
        lambda k: (
            k
            not in (
                "event",
                "token",
                "server_id",
                "referee_identity",
                "server_event_id",
                "ts",
                "test",
            )
        )
    ),
    st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3), max_leaves=5),
    max_size=3,
)


@settings(max_examples=200, deadline=None, database=None)
@given(
    event=st.sampled_from(["registered", "qualified", "reversed"]),
    token=text_field,
    server_id=text_field,
    server_event_id=text_field,
    referee_identity=text_field,
    ts=st.integers(1, 2**40),
    test=st.booleans(),
    extra=extras,
    secret=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20),
    t=st.integers(1, 2**40),
)
def test_property_our_body_is_what_the_guide_would_serialise(
    event: str,
    token: str,
    server_id: str,
    server_event_id: str,
    referee_identity: str,
    ts: int,
    test: bool,
    extra: dict[str, Any],
    secret: str,
    t: int,
) -> None:
    body = build_body(
        event,
        token=token,
        server_id=server_id,
        server_event_id=server_event_id,
        referee_identity=referee_identity,
        ts=ts,
        test=test,
        extra=extra,
    )
    # The guide's serialiser, run over the same fields in the same order, writes the
    # same bytes: same separators, same escaping of non-ASCII.
    raw = json.dumps(json.loads(body), separators=(",", ":"))
    assert raw.encode() == body
    assert sign_referral_body(secret, body, t) == guide_signature(secret, raw, t)
