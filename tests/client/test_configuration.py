"""ReferralClient's configuration: what it refuses, its defaults, and a repr that never
shows the secret.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from flask_mmolove import ReferralClient


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("", "s"), {}, "server_id is required"),
        (("  ", "s"), {}, "server_id is required"),
        (("srv", ""), {}, "secret is required"),
        (("srv", "s", "ftp://mmolove.com/api/referral/events"), {}, "endpoint must be"),
        (("srv", "s", "mmolove.com/api/referral/events"), {}, "endpoint must be"),
        (("srv", "s", "https://"), {}, "endpoint must be"),
        (("srv", "s"), {"key_id": "has space"}, "key_id must be"),
    ],
)
def test_client_validates_configuration(
    args: tuple[str, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ReferralClient(*args, **kwargs)


def test_client_defaults() -> None:
    with ReferralClient(" srv-1 ", "s") as c:
        assert c.server_id == "srv-1"
        assert c.endpoint == "https://mmolove.com/api/referral/events"
        assert c.timeout == (5.0, 10.0)
        assert c.key_id is None
        assert json.loads(c.body("qualified", "tok", server_event_id="q", ts=1))["server_id"] == (
            "srv-1"
        )


def test_client_repr_and_str_hide_the_secret() -> None:
    secret = "whsec_SUPER_secret_value_123"
    client = ReferralClient("srv-1", secret, "http://127.0.0.1:9/api/referral/events", key_id="k1")
    try:
        for text in (repr(client), str(client), f"{client}", f"{client!r}"):
            assert secret not in text
            assert "srv-1" in text
        assert repr(client) == (
            "<ReferralClient server_id='srv-1' endpoint='http://127.0.0.1:9/api/referral/events'>"
        )
    finally:
        client.close()
