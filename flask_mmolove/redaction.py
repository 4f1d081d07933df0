"""Keeping secrets out of what people and logs see: one redactor for every surface."""

from __future__ import annotations

import json
from typing import Final

#: What stands for a secret in a text that contained it.
REDACTED: Final = "[redacted]"
#: Shorter values are left alone: replacing a two-letter string everywhere would garble
#: every text and protect nothing, since such a secret is guessable anyway.
MIN_REDACTED_LENGTH: Final = 6


class Redactor:
    """Replaces each secret in a text, as written and as it appears inside a JSON string.

    The JSON forms matter because answers are stored as MMOLove's raw JSON text, escapes
    and all. Apply it before any HTML or JSON encoding of your own, which would hide a
    secret with ``<``, ``&`` or ``"`` in it from the search.
    """

    def __init__(self, *secrets: str) -> None:
        forms = set()
        for secret in secrets:
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
