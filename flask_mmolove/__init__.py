"""flask-mmolove: the MMOLove Referral Kit for Flask portals."""

from __future__ import annotations

from ._version import __version__
from .client import ReferralClient, SendResult, TransportError
from .extension import MMOLove
from .outbox import OutboxError
from .protocol import (
    DEFAULT_ENDPOINT,
    Action,
    BadSignatureError,
    BodyError,
    CallbackPayloadError,
    Decision,
    MalformedSignatureError,
    Outcome,
    SignatureError,
    StaleSignatureError,
    build_body,
    check_heart_callback,
    check_legacy_get,
    classify,
    sign_referral_body,
    verify_heart_callback,
    verify_legacy_get,
    verify_signature,
)
from .referrals import referral_registered, set_referee
from .settings import ConfigurationError
from .signals import (
    heart_counted,
    player_qualified,
    referee_registered,
    referral_rejected,
    referrer_credited,
)

__all__ = [
    "DEFAULT_ENDPOINT",
    "Action",
    "BadSignatureError",
    "BodyError",
    "CallbackPayloadError",
    "ConfigurationError",
    "Decision",
    "MMOLove",
    "MalformedSignatureError",
    "OutboxError",
    "Outcome",
    "ReferralClient",
    "SendResult",
    "SignatureError",
    "StaleSignatureError",
    "TransportError",
    "__version__",
    "build_body",
    "check_heart_callback",
    "check_legacy_get",
    "classify",
    "heart_counted",
    "player_qualified",
    "referee_registered",
    "referral_registered",
    "referral_rejected",
    "referrer_credited",
    "set_referee",
    "sign_referral_body",
    "verify_heart_callback",
    "verify_legacy_get",
    "verify_signature",
]
