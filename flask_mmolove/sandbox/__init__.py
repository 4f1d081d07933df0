"""An MMOLove-compatible sandbox: ingest endpoint, share links, delivery log, faults,
and MMOLove's reward callbacks (votes) to the portal.

It verifies and answers referral events the way protocol.md describes MMOLove doing,
and sends signed ``heart.counted`` callbacks on MMOLove's retry schedule, so a portal
can be tested end to end over real HTTP without touching MMOLove.
"""

from __future__ import annotations

from .app import INGEST_PATH, create_sandbox_app, sandbox_callbacks, sandbox_state
from .callback_values import (
    MAX_ATTEMPTS,
    RETRY_DELAYS,
    TEST_HEART_ID,
    CallbackAttempt,
    CallbackConfig,
)
from .callbacks import CallbackDelivery, CallbackSender
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
    "MAX_ATTEMPTS",
    "RETRY_DELAYS",
    "TEST_HEART_ID",
    "TOKEN_LIFETIME",
    "CallbackAttempt",
    "CallbackConfig",
    "CallbackDelivery",
    "CallbackSender",
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
    "sandbox_callbacks",
    "sandbox_state",
]
