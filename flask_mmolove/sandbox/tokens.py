"""``mmref`` tokens as the sandbox mints them: signed, bound to a server, expiring.

MMOLove's token format is opaque to portals (protocol.md section 4), so nothing here is
a contract: a portal must treat these tokens as opaque strings too. They are real
HMAC-signed tokens all the same, so a forged, expired or misdirected token is caught
the way MMOLove would catch it, rather than by a lookup table a test could bypass.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from itsdangerous import BadSignature, Signer

#: MMOLove's tokens expire after 90 days (protocol.md section 4).
TOKEN_LIFETIME: Final = 90 * 24 * 60 * 60

_SALT: Final = b"flask-mmolove sandbox mmref token v1"
_KEY_LABEL: Final = b"flask-mmolove sandbox token key v1"


def derive_token_key(secret: str) -> str:
    """A token-signing key derived from the event secret.

    Derived rather than reused so a token, which travels in URLs and browser history,
    never carries a MAC made with the secret that authenticates events.
    """
    if not secret:
        raise ValueError("secret must be a non-empty string")
    return hmac.new(secret.encode("utf-8"), _KEY_LABEL, hashlib.sha256).hexdigest()


class TokenError(Exception):
    """A token does not name a live referral of this server. ``reason`` is a short id."""

    reason = "unknown_token"


class ForgedTokenError(TokenError):
    """The token was not minted with this key, or was altered."""

    reason = "unknown_token"


class ExpiredTokenError(TokenError):
    """The token's 90 days are over."""

    reason = "token_expired"


class WrongServerTokenError(TokenError):
    """The token was minted for another server's share link."""

    reason = "token_other_server"


@dataclass(frozen=True)
class TokenClaims:
    """What a token says once its MAC checks out."""

    server_id: str
    referrer: str
    issued_at: int
    expires_at: int
    #: Makes every click a distinct token, as each click is a distinct referral.
    nonce: str


def _b64encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _b64decode(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


class TokenMinter:
    """Mints and checks tokens with one key. Thread-safe: it holds no mutable state."""

    def __init__(
        self,
        key: str,
        *,
        clock: Callable[[], float] | None = None,
        lifetime: int = TOKEN_LIFETIME,
    ) -> None:
        if not key:
            raise ValueError("token key must be a non-empty string")
        if lifetime <= 0:
            raise ValueError("lifetime must be a positive number of seconds")
        # The plain Signer, not a TimedSerializer: the expiry is part of the signed
        # payload and compared with the injected clock, so tests can age a token
        # without sleeping or patching time.
        self._signer = Signer(key, salt=_SALT, digest_method=hashlib.sha256)
        self._clock = clock or time.time
        self.lifetime = lifetime

    def __repr__(self) -> str:
        return f"<TokenMinter lifetime={self.lifetime}>"

    def mint(self, server_id: str, referrer: str) -> str:
        """A fresh token for one click on ``server_id``'s share link by ``referrer``."""
        if not server_id or not referrer:
            raise ValueError("server_id and referrer must be non-empty strings")
        issued_at = int(self._clock())
        payload = {
            "s": server_id,
            "r": referrer,
            "i": issued_at,
            "e": issued_at + self.lifetime,
            "n": secrets.token_urlsafe(6),
        }
        raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        # base64url plus "." and the MAC: safe in a query string and a cookie as is.
        return self._signer.sign(_b64encode(raw)).decode("ascii")

    def verify(self, token: str, server_id: str) -> TokenClaims:
        """The claims of ``token`` if it is live and belongs to ``server_id``."""
        claims = self.decode(token)
        if int(self._clock()) >= claims.expires_at:
            raise ExpiredTokenError("the token has expired")
        if not hmac.compare_digest(claims.server_id.encode(), server_id.encode()):
            raise WrongServerTokenError("the token belongs to another server")
        return claims

    def decode(self, token: str) -> TokenClaims:
        """The claims of an authentic token, whatever its age or server."""
        try:
            raw = _b64decode(self._signer.unsign(token.encode("utf-8")))
            data = json.loads(raw)
        except (BadSignature, binascii.Error, ValueError, UnicodeError):
            raise ForgedTokenError("unknown token") from None
        if not isinstance(data, dict):
            raise ForgedTokenError("unknown token")
        server_id, referrer = data.get("s"), data.get("r")
        issued_at, expires_at, nonce = data.get("i"), data.get("e"), data.get("n")
        if not (
            isinstance(server_id, str)
            and isinstance(referrer, str)
            and isinstance(issued_at, int)
            and isinstance(expires_at, int)
            and isinstance(nonce, str)
        ):
            raise ForgedTokenError("unknown token")
        return TokenClaims(server_id, referrer, issued_at, expires_at, nonce)
