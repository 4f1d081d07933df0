"""ReferralClient's configuration: what it refuses, and its defaults."""

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
