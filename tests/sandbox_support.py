"""Helpers the sandbox tests (tests/sandbox/) share: valid request bodies to break one
field at a time, and POSTs signed as a portal signs them, or not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import requests

from flask_mmolove.protocol import SIGNATURE_HEADER, sign_referral_body
from flask_mmolove.sandbox import SandboxServer

#: The ``mmolove_sandbox_factory`` fixture: starts a sandbox with the options given.
Factory = Callable[..., SandboxServer]
#: Where the tests' FakeClock starts, and the ``ts`` of every body ``fields`` builds.
T0 = 1_700_000_000
#: A field value for ``fields`` (and the default of ``post``'s header): leave it out.
MISSING = object()


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
    """``data`` as compact JSON bytes, as a portal sends it."""
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
    """``post`` of ``data`` encoded."""
    return post(sandbox, encode(data), **kwargs)
