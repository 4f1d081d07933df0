"""One pooled requests.Session: connections reused, and a given session's headers,
mounted adapters and proxies used (read at each send), its invalid headers named without
their values.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests
from client_support import ok_answer, tiny_server

import flask_mmolove
from flask_mmolove import ReferralClient
from flask_mmolove.protocol import verify_signature
from flask_mmolove.sandbox import SandboxServer


def test_requests_reuse_one_connection() -> None:
    with tiny_server(ok_answer) as tiny, ReferralClient("srv", "s3cret", tiny.endpoint) as c:
        for n in range(3):
            assert c.qualified("tok", server_event_id=f"q-{n}", ts=1).ok
    assert len(tiny.seen) == 3
    assert len({seen.client_port for seen in tiny.seen}) == 1


def test_one_session_one_pool_against_the_sandbox(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    for n in range(3):
        assert mmolove_client.qualified(
            mmolove_sandbox.mint_token(), server_event_id=f"q{n}", test=True
        ).ok
    adapter = mmolove_client._session.get_adapter(mmolove_client.endpoint)
    # urllib3's RecentlyUsedContainer refuses plain iteration; keys() is its API.
    pool_keys = adapter.poolmanager.pools.keys()
    pools = [adapter.poolmanager.pools[key] for key in pool_keys]
    assert len(pools) == 1
    assert (pools[0].num_connections, pools[0].num_requests) == (1, 3)


def test_given_session_is_used_and_closed() -> None:
    session = requests.Session()
    with tiny_server(ok_answer) as tiny:
        c = ReferralClient("srv", "s3cret", tiny.endpoint, session=session)
        assert session.headers["User-Agent"] == f"flask-mmolove/{flask_mmolove.__version__}"
        assert c.qualified("tok", server_event_id="q", ts=1).ok
        adapter = session.get_adapter(tiny.endpoint)
        assert len(adapter.poolmanager.pools) == 1
        c.close()
        assert len(adapter.poolmanager.pools) == 0


def test_session_headers_and_mounted_adapters_are_used() -> None:
    sends: list[str] = []

    class Counting(requests.adapters.HTTPAdapter):
        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            sends.append(request.url)
            return super().send(request, *args, **kwargs)

    session = requests.Session()
    session.headers["X-Portal"] = "emberfall"
    session.mount("http://", Counting())
    with (
        tiny_server(ok_answer) as tiny,
        ReferralClient("srv", "s3cret", tiny.endpoint, session=session) as c,
    ):
        # Read at each send, not frozen at construction.
        session.headers["X-Portal-Region"] = "eu"
        assert c.qualified("tok", server_event_id="q", ts=1).ok
    (seen,) = tiny.seen
    assert seen.headers["x-portal"] == "emberfall"
    assert seen.headers["x-portal-region"] == "eu"
    assert seen.headers["user-agent"] == f"flask-mmolove/{flask_mmolove.__version__}"
    assert sends == [tiny.endpoint]


def test_a_proxy_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    endpoint = "http://mmolove.invalid/api/referral/events"
    with tiny_server(ok_answer) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        with ReferralClient("srv", "s3cret", endpoint) as c:
            assert c.qualified("tok", server_event_id="q", ts=1).ok
    (seen,) = proxy.seen
    # A forward proxy is asked for the absolute URL.
    assert seen.path == endpoint
    verify_signature("s3cret", seen.body, seen.headers["x-mmolove-signature"])


def test_an_invalid_session_header_is_named_and_its_value_not_shown() -> None:
    session = requests.Session()
    session.headers["X-Portal-Key"] = "k3y-value\r\nInjected: 1"
    client = ReferralClient(
        "srv", "s3cret", "http://127.0.0.1:9/api/referral/events", session=session
    )
    with pytest.raises(ValueError, match="invalid HTTP header 'X-Portal-Key'") as info:
        client.send_body(b"{}")
    assert "k3y-value" not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
