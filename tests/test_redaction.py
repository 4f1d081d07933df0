"""The one redactor behind the deliverer, the operator view and the sandbox."""

from __future__ import annotations

from flask_mmolove.redaction import REDACTED, Redactor


def test_a_secret_inside_another_is_no_clue_to_the_longer_one() -> None:
    # Whichever order the secrets come in, nothing of the longer one is left.
    for secrets in (
        ("s3cret-value", "s3cret-value-token-key"),
        ("s3cret-value-token-key", "s3cret-value"),
    ):
        redact = Redactor(*secrets)
        assert redact("key=s3cret-value-token-key; secret=s3cret-value") == (
            f"key={REDACTED}; secret={REDACTED}"
        )


def test_json_escaped_forms_and_short_values() -> None:
    redact = Redactor('se"cret/1', "ab")
    assert redact('{"echo": "se\\"cret/1"} ab') == f'{{"echo": "{REDACTED}"}} ab'
    # The raw and the escaped form; "ab" is too short to scrub.
    assert repr(redact) == "<Redactor of 2 form(s)>"
