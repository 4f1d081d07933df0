"""The MMOLove referral event protocol: bodies, signatures and answers.

Pure functions and values: no I/O, no Flask. Everything that decides what a byte on
the wire looks like, or what an answer from MMOLove means, lives here and only here:
:mod:`.bodies` (the bytes sent), :mod:`.signatures` (made and checked),
:mod:`.answers` (what MMOLove's answer means: :func:`classify`); and the other
direction, MMOLove's signed reward callbacks (votes) to the portal, :mod:`.callbacks`.
"""

from .answers import (
    Action,
    Decision,
    Outcome,
    classify,
    outcome_of,
    parse_json_object,
    retry_after_seconds,
)
from .bodies import (
    DEFAULT_ENDPOINT,
    DEFAULT_TOLERANCE,
    EVENTS,
    FIELD_ORDER,
    SIGNATURE_HEADER,
    BodyError,
    build_body,
    with_server_id,
)
from .callbacks import (
    EVENT_HEADER,
    HEART_COUNTED,
    HEART_EVENTS,
    HEART_TEST,
    CallbackPayloadError,
    CallbackSignature,
    check_heart_callback,
    check_legacy_get,
    parse_callback_signature,
    sign_heart_callback,
    sign_legacy_get,
    verify_heart_callback,
    verify_legacy_get,
)
from .signatures import (
    KEY_ID_PATTERN,
    BadSignatureError,
    MalformedSignatureError,
    ParsedSignature,
    SignatureError,
    StaleSignatureError,
    check_endpoint,
    check_key_id,
    parse_signature_header,
    sign_referral_body,
    verify_signature,
)

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_TOLERANCE",
    "EVENTS",
    "EVENT_HEADER",
    "FIELD_ORDER",
    "HEART_COUNTED",
    "HEART_EVENTS",
    "HEART_TEST",
    "KEY_ID_PATTERN",
    "SIGNATURE_HEADER",
    "Action",
    "BadSignatureError",
    "BodyError",
    "CallbackPayloadError",
    "CallbackSignature",
    "Decision",
    "MalformedSignatureError",
    "Outcome",
    "ParsedSignature",
    "SignatureError",
    "StaleSignatureError",
    "build_body",
    "check_endpoint",
    "check_heart_callback",
    "check_key_id",
    "check_legacy_get",
    "classify",
    "outcome_of",
    "parse_callback_signature",
    "parse_json_object",
    "parse_signature_header",
    "retry_after_seconds",
    "sign_heart_callback",
    "sign_legacy_get",
    "sign_referral_body",
    "verify_heart_callback",
    "verify_legacy_get",
    "verify_signature",
    "with_server_id",
]
