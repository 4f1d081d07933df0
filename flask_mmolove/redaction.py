"""Keeping secrets out of what people and logs see: one redactor for every surface."""

from __future__ import annotations

import hmac
import json
from typing import Final

#: What stands for a secret in a text that contained it.
REDACTED: Final = "[redacted]"
#: Shorter values are left alone: replacing a two-letter string everywhere would garble
#: every text and protect nothing, since such a secret is guessable anyway.
MIN_REDACTED_LENGTH: Final = 6


class Secret:
    """A credential that never shows itself: its ``repr`` and ``str`` are ``[redacted]``.

    Held this way from the moment it is read, so a traceback tool that shows frame
    locals and the reprs of what they hold (``pytest -l``, Sentry, the Werkzeug
    debugger) finds no plain secret to show. :meth:`reveal` gives the value, for the
    moment of signing only. It equals another ``Secret`` or a ``str`` of the same
    value (compared in constant time), so ``settings.secret == "..."`` still works.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a Secret holds a str, not {type(value).__name__}")
        self._value = value

    @classmethod
    def of(cls, value: object) -> Secret | None:
        """``value`` as a Secret if it can be one (a non-empty ``str``, or a Secret), else None.

        Never raises: the caller lets its plain argument go, then says what is wrong.
        """
        if isinstance(value, Secret):
            return value if value else None
        return cls(value) if isinstance(value, str) and value else None

    def reveal(self) -> str:
        """The plain value: for signing, at the call, and nowhere else."""
        return self._value

    def __repr__(self) -> str:
        return REDACTED

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            other = other._value
        if not isinstance(other, str):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other.encode())

    def __hash__(self) -> int:
        return hash(self._value)


class Redactor:
    """Replaces each secret in a text, as written and as it appears inside a JSON string.

    The JSON forms matter because answers are stored as MMOLove's raw JSON text, escapes
    and all. Apply it before any HTML or JSON encoding of your own, which would hide a
    secret with ``<``, ``&`` or ``"`` in it from the search.
    """

    def __init__(self, *secrets: str | Secret) -> None:
        forms = set()
        for held in secrets:
            secret = held.reveal() if isinstance(held, Secret) else held
            forms |= {
                secret,
                json.dumps(secret)[1:-1],
                json.dumps(secret, ensure_ascii=False)[1:-1],
            }
        # Longest first: a secret inside another (a key that embeds it) must not
        # leave the rest of the longer one showing.
        self._forms = tuple(
            sorted((form for form in forms if len(form) >= MIN_REDACTED_LENGTH), key=len)[::-1]
        )

    def __repr__(self) -> str:
        return f"<Redactor of {len(self._forms)} form(s)>"

    def __call__(self, text: str) -> str:
        for form in self._forms:
            text = text.replace(form, REDACTED)
        return text
