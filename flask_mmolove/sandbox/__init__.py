"""An MMOLove-compatible sandbox: ingest endpoint, share links, delivery log, faults.

It verifies and answers referral events the way protocol.md describes MMOLove doing,
so a portal can be tested end to end over real HTTP without touching MMOLove.
"""

from __future__ import annotations

from .app import INGEST_PATH, create_sandbox_app, sandbox_state
from .command import main
from .faults import Fault
from .log import LogRecord
from .rules import Referral
from .server import SandboxServer
from .state import SandboxState
from .tokens import (
    TOKEN_LIFETIME,
    ExpiredTokenError,
    ForgedTokenError,
    TokenClaims,
    TokenError,
    TokenMinter,
    WrongServerTokenError,
    derive_token_key,
)

__all__ = [
    "INGEST_PATH",
    "TOKEN_LIFETIME",
    "ExpiredTokenError",
    "Fault",
    "ForgedTokenError",
    "LogRecord",
    "Referral",
    "SandboxServer",
    "SandboxState",
    "TokenClaims",
    "TokenError",
    "TokenMinter",
    "WrongServerTokenError",
    "create_sandbox_app",
    "derive_token_key",
    "main",
    "sandbox_state",
]
