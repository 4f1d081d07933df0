"""flask-mmolove: the MMOLove Referral Kit for Flask portals."""

from __future__ import annotations

__version__ = "0.1.0"

from .client import ReferralClient, SendResult, TransportError
from .protocol import (
    DEFAULT_ENDPOINT,
    Action,
    BadSignatureError,
    BodyError,
    Decision,
    MalformedSignatureError,
    Outcome,
    SignatureError,
    StaleSignatureError,
    build_body,
    classify,
    sign_referral_body,
    verify_signature,
)

__all__ = [
    "DEFAULT_ENDPOINT",
    "Action",
    "BadSignatureError",
    "BodyError",
    "Decision",
    "MalformedSignatureError",
    "Outcome",
    "ReferralClient",
    "SendResult",
    "SignatureError",
    "StaleSignatureError",
    "TransportError",
    "__version__",
    "build_body",
    "classify",
    "sign_referral_body",
    "verify_signature",
]
