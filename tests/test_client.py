"""ReferralClient over real HTTP on 127.0.0.1: against the sandbox, and tiny local servers.

Nothing here patches requests: every request crosses a real socket. Compatibility with
MMOLove's own from-scratch Python client (tests/guide_client.py, the guide verbatim) is
checked both ways: the guide's requests pass our verifier, and ours pass the guide's
signing formula.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

import flask_mmolove
from flask_mmolove import ReferralClient, SendResult, TransportError
from flask_mmolove.protocol import (
    Action,
    BadSignatureError,
    Outcome,
    build_body,
    classify,
    parse_signature_header,
    sign_referral_body,
    verify_signature,
)
from flask_mmolove.sandbox import LogRecord, SandboxServer

SandboxFactory = Callable[..., SandboxServer]


def _load_guide() -> ModuleType:
    # By path, so it works whether or not tests/ is a package.
    path = Path(__file__).with_name("guide_client.py")
    spec = importlib.util.spec_from_file_location("mmolove_guide_client", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


guide = _load_guide()


def guide_signature(secret: str, raw: str, t: int) -> str:
    """The guide's signing lines, as written there, for a body and a t we choose."""
    mac = hmac.new(secret.encode(), f"{t}.{raw}".encode(), hashlib.sha256).hexdigest()
    return f"t={t},v1=sha256={mac}"


def last(sandbox: SandboxServer) -> LogRecord:
    events = sandbox.events
    assert events, "the sandbox received nothing"
    return events[-1]


def t_of(header: str | None) -> int:
    assert header is not None
    return parse_signature_header(header).t


# --- a tiny recording HTTP server, for what the sandbox does not show -------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int


@dataclass
class Tiny:
    """A threaded http.server on 127.0.0.1 that records requests and answers as told."""

    url: str
    seen: list[Seen] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return self.url + "/api/referral/events"


Answer = tuple[int, list[tuple[str, str]], bytes]


@contextmanager
def tiny_server(answer: Callable[[Seen, str], Answer]) -> Iterator[Tiny]:
    tiny = Tiny(url="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is visible

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            seen = Seen(
                method=self.command,
                path=self.path,
                headers={name.lower(): value for name, value in self.headers.items()},
                body=self.rfile.read(length),
                client_port=self.client_address[1],
            )
            tiny.seen.append(seen)
            status, headers, payload = answer(seen, tiny.url)
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)  # sent with the case given
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _handle

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tiny.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield tiny
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def ok_answer(seen: Seen, url: str) -> Answer:
    return 200, [("Content-Type", "application/json")], b'{"ok":true,"test":true}'


def closed_port() -> int:
    """A 127.0.0.1 port that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- each outcome, through the SDK-shaped methods -----------------------------------


def test_registered_then_qualified_advance(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token("friend")
    referral_id = mmolove_sandbox.referrals[token].referral_id

    result = mmolove_client.registered(token, referee_identity="7842", server_event_id="reg-7842")
    assert isinstance(result, SendResult)
    assert (result.status, result.ok, result.outcome) == (200, True, Outcome.ADVANCED)
    assert result.data == {"ok": True, "referral_id": referral_id, "state": "registered"}
    assert json.loads(result.body) == result.data
    assert result.elapsed > 0
    assert mmolove_sandbox.referrals[token].state == "registered"
    assert mmolove_sandbox.referrals[token].referee_identity == "7842"

    result = mmolove_client.qualified(token, server_event_id="qual-7842")
    assert (result.status, result.ok, result.outcome) == (200, True, Outcome.ADVANCED)
    assert result.data == {"ok": True, "referral_id": referral_id, "state": "qualified"}
    assert mmolove_sandbox.referrals[token].state == "qualified"
    assert mmolove_sandbox.accepted_count("registered") == 1
    assert mmolove_sandbox.accepted_count("qualified") == 1
    assert [r.verdict for r in mmolove_sandbox.events] == ["advanced", "advanced"]


def test_duplicate(mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient) -> None:
    token = mmolove_sandbox.mint_token()
    first = mmolove_client.registered(token, referee_identity="p-1", server_event_id="reg-1")
    again = mmolove_client.registered(token, referee_identity="p-1", server_event_id="reg-1")
    assert first.outcome is Outcome.ADVANCED
    assert (again.status, again.ok, again.outcome) == (200, True, Outcome.DUPLICATE)
    assert again.data == {"ok": True, "duplicate": True}
    assert mmolove_sandbox.accepted_count("registered") == 1
    assert mmolove_sandbox.accepted_posts(token, "registered") == 2


def test_first_touch_conflict(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    first = mmolove_sandbox.mint_token("alice")
    second = mmolove_sandbox.mint_token("bob")
    assert mmolove_client.registered(first, referee_identity="p-9", server_event_id="r1").ok
    result = mmolove_client.registered(second, referee_identity="p-9", server_event_id="r2")
    assert (result.status, result.ok, result.outcome) == (200, True, Outcome.FIRST_TOUCH_CONFLICT)
    assert result.data == {"ok": True, "ignored": "first_touch_conflict"}
    assert mmolove_sandbox.referrals[first].referee_identity == "p-9"
    assert mmolove_sandbox.referrals[second].state == "clicked"


def test_dry_run(mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient) -> None:
    token = mmolove_sandbox.mint_token()
    result = mmolove_client.registered(
        token, referee_identity="p-1", server_event_id="test-1", test=True
    )
    assert (result.status, result.ok, result.outcome) == (200, True, Outcome.TEST)
    assert result.data == {"ok": True, "test": True}
    assert json.loads(last(mmolove_sandbox).body)["test"] is True
    assert mmolove_sandbox.accepted_count() == 0
    assert mmolove_sandbox.referrals[token].state == "clicked"
    result = mmolove_client.qualified(token, server_event_id="test-2", test=True)
    assert result.outcome is Outcome.TEST


def test_undocumented_200_shape_is_accepted(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    mmolove_sandbox.fail_next(status=200, body={"ok": True, "something": "new"})
    result = mmolove_client.qualified(mmolove_sandbox.mint_token(), server_event_id="q-1")
    assert (result.status, result.ok, result.outcome) == (200, True, Outcome.ACCEPTED)
    assert result.data == {"ok": True, "something": "new"}


def test_send_with_extras_and_reversed(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    assert mmolove_client.registered(token, referee_identity="p", server_event_id="r").ok
    result = mmolove_client.send(
        "reversed", token, server_event_id="rev-1", ts=123, extra={"why": "x"}
    )
    assert (result.status, result.outcome) == (200, Outcome.ADVANCED)
    assert last(mmolove_sandbox).body == (
        b'{"event":"reversed","token":"'
        + token.encode()
        + b'","server_id":"'
        + mmolove_sandbox.server_id.encode()
        + b'","server_event_id":"rev-1","ts":123,"why":"x"}'
    )
    assert mmolove_sandbox.referrals[token].reversals == 1


# --- non-2xx answers are results, never exceptions ------------------------------------


def assert_not_ok(result: SendResult, status: int) -> None:
    assert isinstance(result, SendResult)
    assert result.status == status
    assert result.ok is False
    assert result.outcome is None


def test_qualified_first_is_422(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    result = mmolove_client.qualified(mmolove_sandbox.mint_token(), server_event_id="q-1")
    assert_not_ok(result, 422)
    assert result.data == {
        "error": "qualified before registered: send registered first",
        "state": "clicked",
    }
    assert classify(result.status).action is Action.DEAD


def test_unknown_token_is_404(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    result = mmolove_client.registered("not-a-token", referee_identity="p", server_event_id="r")
    assert_not_ok(result, 404)
    assert classify(result.status).reason == "not_found"


def test_token_of_another_server_is_404(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token("friend", server_id="someone-else")
    assert_not_ok(mmolove_client.registered(token, referee_identity="p", server_event_id="r"), 404)


def test_wrong_secret_is_401(mmolove_sandbox: SandboxServer) -> None:
    with ReferralClient(
        mmolove_sandbox.server_id, "not-the-secret", mmolove_sandbox.endpoint
    ) as wrong:
        result = wrong.registered(
            mmolove_sandbox.mint_token(), referee_identity="p", server_event_id="r"
        )
    assert_not_ok(result, 401)
    assert result.data is not None
    assert result.data["error"] == "bad_signature"
    assert last(mmolove_sandbox).verdict == "bad_signature"
    decision = classify(result.status)
    assert (decision.action, decision.slow) == (Action.RETRY, True)


def test_unknown_server_id_is_404(mmolove_sandbox: SandboxServer) -> None:
    with ReferralClient("other-server", mmolove_sandbox.secret, mmolove_sandbox.endpoint) as other:
        result = other.qualified(mmolove_sandbox.mint_token(), server_event_id="q")
    assert_not_ok(result, 404)


@pytest.mark.parametrize("status", [400, 500, 502, 503])
def test_server_errors_are_results_with_headers(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient, status: int
) -> None:
    mmolove_sandbox.fail_next(status=status, retry_after=7)
    result = mmolove_client.registered(
        mmolove_sandbox.mint_token(), referee_identity="p", server_event_id="r"
    )
    assert_not_ok(result, status)
    assert result.data == {"error": f"injected fault {status}"}
    assert result.headers["Retry-After"] == "7"
    decision = classify(result.status, retry_after=result.headers.get("Retry-After"))
    if status >= 500:
        assert (decision.action, decision.retry_after) == (Action.RETRY, 7.0)
    else:
        assert decision.action is Action.DEAD


def test_text_error_body(mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient) -> None:
    mmolove_sandbox.fail_next(status=503, body="upstream down")
    result = mmolove_client.qualified(mmolove_sandbox.mint_token(), server_event_id="q")
    assert_not_ok(result, 503)
    assert result.body == "upstream down"
    assert result.data is None


def test_headers_are_case_insensitive() -> None:
    # delivery reads result.headers.get("Retry-After"); servers may send any case.
    def answer(seen: Seen, url: str) -> Answer:
        return 503, [("retry-after", "7"), ("content-type", "application/json")], b"{}"

    with tiny_server(answer) as tiny, ReferralClient("srv", "s3cret-value", tiny.endpoint) as c:
        result = c.qualified("tok", server_event_id="q", ts=1)
    assert result.status == 503
    assert result.headers.get("Retry-After") == "7"
    assert result.headers.get("RETRY-AFTER") == "7"


# --- the bytes on the wire ------------------------------------------------------------


def test_recorded_body_is_the_built_body_and_verifies(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    body = mmolove_client.body(
        "registered",
        token,
        referee_identity="  Ünïcødé player 😀 ",
        server_event_id="reg-ü",
        extra={"portal": "Ψ", "level": 3},
    )
    result = mmolove_client.send_body(body)
    assert result.outcome is Outcome.ADVANCED
    record = last(mmolove_sandbox)
    assert record.body == body  # the very bytes built were signed and sent
    assert record.content_type == "application/json"
    assert record.signature is not None
    verify_signature(mmolove_sandbox.secret, record.body, record.signature)
    assert record.signature == sign_referral_body(
        mmolove_sandbox.secret, body, t_of(record.signature)
    )
    assert mmolove_sandbox.referrals[token].referee_identity == "Ünïcødé player 😀"
    with pytest.raises(BadSignatureError):
        verify_signature("another-secret", record.body, record.signature)


def test_registered_sends_exactly_build_body(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    before = int(time.time())
    mmolove_client.registered(token, referee_identity="p-1", server_event_id="reg-1")
    after = int(time.time())
    record = last(mmolove_sandbox)
    ts = json.loads(record.body)["ts"]
    assert before <= ts <= after
    assert before <= t_of(record.signature) <= after
    assert record.body == build_body(
        "registered",
        token=token,
        server_id=mmolove_sandbox.server_id,
        server_event_id="reg-1",
        referee_identity="p-1",
        ts=ts,
    )


def test_explicit_ts_is_sent(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    token = mmolove_sandbox.mint_token()
    mmolove_client.registered(token, referee_identity="p", server_event_id="r", ts=1_600_000_000)
    assert json.loads(last(mmolove_sandbox).body)["ts"] == 1_600_000_000
    # ts is the event's time, t the signing time: an old ts is not a stale signature.
    assert last(mmolove_sandbox).verdict == "advanced"


def test_key_id_travels_in_the_header(mmolove_sandbox: SandboxServer) -> None:
    with mmolove_sandbox.client(key_id="2024-01") as keyed:
        result = keyed.qualified(mmolove_sandbox.mint_token(), server_event_id="q", test=True)
    assert result.outcome is Outcome.TEST
    signature = last(mmolove_sandbox).signature
    assert signature is not None
    assert re.fullmatch(r"t=[0-9]+,v1=sha256=[0-9a-f]{64},kid=2024-01", signature)
    verify_signature({"2024-01": mmolove_sandbox.secret}, last(mmolove_sandbox).body, signature)


def test_each_send_is_signed_afresh_over_the_same_bytes(
    mmolove_sandbox: SandboxServer, mmolove_client: ReferralClient
) -> None:
    body = mmolove_client.body(
        "qualified", mmolove_sandbox.mint_token(), server_event_id="q", test=True
    )
    first = mmolove_client.send_body(body)
    start = int(time.time())
    while int(time.time()) == start:  # at most a second: t has one-second resolution
        time.sleep(0.02)
    second = mmolove_client.send_body(body)
    assert first.outcome is second.outcome is Outcome.TEST
    one, two = mmolove_sandbox.events[-2:]
    assert one.body == two.body == body
    assert one.signature != two.signature
    assert t_of(two.signature) > t_of(one.signature)
    for record in (one, two):
        assert record.signature is not None
        verify_signature(mmolove_sandbox.secret, record.body, record.signature)


def test_sign_is_pure_and_keyed(mmolove_sandbox: SandboxServer) -> None:
    body = b'{"event":"qualified"}'
    with mmolove_sandbox.client(key_id="k1") as keyed:
        assert keyed.sign(body, 1_700_000_000) == sign_referral_body(
            mmolove_sandbox.secret, body, 1_700_000_000, key_id="k1"
        )
    assert mmolove_sandbox.events == []


def test_user_agent_and_headers() -> None:
    with tiny_server(ok_answer) as tiny, ReferralClient("srv-1", "s3cret", tiny.endpoint) as c:
        body = c.body("qualified", "tok", server_event_id="q-1", ts=5)
        result = c.send_body(body)
    assert result.outcome is Outcome.TEST
    (seen,) = tiny.seen
    assert (seen.method, seen.path) == ("POST", "/api/referral/events")
    assert seen.headers["user-agent"] == f"flask-mmolove/{flask_mmolove.__version__}"
    assert re.fullmatch(r"flask-mmolove/[0-9]+\.[0-9]+\.[0-9]+\S*", seen.headers["user-agent"])
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["content-length"] == str(len(body))
    assert seen.body == body
    verify_signature("s3cret", seen.body, seen.headers["x-mmolove-signature"])


def test_redirects_are_not_followed() -> None:
    def answer(seen: Seen, url: str) -> Answer:
        if seen.path == "/api/referral/events":
            return 302, [("Location", url + "/elsewhere")], b""
        return 200, [("Content-Type", "application/json")], b'{"ok":true,"test":true}'

    with tiny_server(answer) as tiny, ReferralClient("srv", "s3cret", tiny.endpoint) as c:
        result = c.qualified("tok", server_event_id="q", ts=1)
    assert_not_ok(result, 302)
    assert result.headers["Location"] == tiny.url + "/elsewhere"
    assert [seen.path for seen in tiny.seen] == ["/api/referral/events"]
    decision = classify(result.status)
    assert (decision.action, decision.reason, decision.slow) == (Action.RETRY, "redirect", True)


# --- transport failures raise TransportError ----------------------------------------

SECRET = "whsec_do_not_leak_4f9a1c"


def assert_transport_error(exc: TransportError, endpoint: str) -> None:
    assert isinstance(exc, RuntimeError)
    assert isinstance(exc.__cause__, requests.RequestException)
    for text in (str(exc), repr(exc), str(exc.__cause__), repr(exc.__cause__)):
        assert SECRET not in text
    assert str(exc).startswith(f"could not reach MMOLove at {endpoint}: ")


def test_closed_port_raises_transport_error() -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}/api/referral/events"
    with ReferralClient("srv", SECRET, endpoint) as c, pytest.raises(TransportError) as info:
        c.qualified("tok", server_event_id="q")
    assert_transport_error(info.value, endpoint)
    assert "ConnectionError" in str(info.value)
    assert issubclass(TransportError, RuntimeError)


def test_dropped_connection_raises_transport_error(mmolove_sandbox_factory: SandboxFactory) -> None:
    sandbox = mmolove_sandbox_factory(secret=SECRET)
    sandbox.drop_next()
    token = sandbox.mint_token()
    with sandbox.client() as c:
        with pytest.raises(TransportError) as info:
            c.registered(token, referee_identity="p", server_event_id="reg-1")
        assert_transport_error(info.value, sandbox.endpoint)
        record = last(sandbox)
        assert (record.dropped, record.fault, record.committed) == (True, "drop", False)
        # The fault is spent: the same event goes through on retry.
        retried = c.registered(token, referee_identity="p", server_event_id="reg-1")
    assert retried.outcome is Outcome.ADVANCED
    assert sandbox.accepted_count("registered") == 1


def test_lost_answer_then_retry_is_duplicate(mmolove_sandbox: SandboxServer) -> None:
    mmolove_sandbox.drop_next(after_commit=True)
    token = mmolove_sandbox.mint_token()
    with mmolove_sandbox.client() as c:
        body = c.body("registered", token, referee_identity="p", server_event_id="reg-1")
        with pytest.raises(TransportError):
            c.send_body(body)
        assert last(mmolove_sandbox).committed is True
        retried = c.send_body(body)
    assert retried.outcome is Outcome.DUPLICATE
    assert mmolove_sandbox.accepted_count("registered") == 1


def test_read_timeout_raises_transport_error(mmolove_sandbox_factory: SandboxFactory) -> None:
    sandbox = mmolove_sandbox_factory(secret=SECRET)
    sandbox.delay_next(1, 5.0)
    with sandbox.client(timeout=(2.0, 0.3)) as c:
        started = time.monotonic()
        with pytest.raises(TransportError) as info:
            c.qualified(sandbox.mint_token(), server_event_id="q", test=True)
        waited = time.monotonic() - started
    sandbox.clear_faults()  # release the held request
    assert_transport_error(info.value, sandbox.endpoint)
    assert "ReadTimeout" in str(info.value)
    assert 0.25 <= waited < 3.0


# --- one pooled session ---------------------------------------------------------------


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


# --- compatibility with the guide's from-scratch client -------------------------------


def test_guide_client_is_accepted_by_the_sandbox(mmolove_sandbox: SandboxServer) -> None:
    token = mmolove_sandbox.mint_token()
    status, body = guide.mmolove_send_event(
        mmolove_sandbox.secret,
        mmolove_sandbox.server_id,
        "registered",
        {"token": token, "referee_identity": "7842", "server_event_id": "reg-7842"},
        endpoint=mmolove_sandbox.endpoint,
    )
    assert status == 200
    referral_id = mmolove_sandbox.referrals[token].referral_id
    assert json.loads(body) == {"ok": True, "referral_id": referral_id, "state": "registered"}
    record = last(mmolove_sandbox)
    assert record.verdict == "advanced"
    assert record.signature is not None
    verify_signature(mmolove_sandbox.secret, record.body, record.signature)
    # Our signer, given the guide's t and bytes, writes the guide's header exactly.
    t = t_of(record.signature)
    assert sign_referral_body(mmolove_sandbox.secret, record.body, t) == record.signature

    # The guide and our client then interoperate on one referral.
    with mmolove_sandbox.client() as c:
        again = c.registered(token, referee_identity="7842", server_event_id="reg-7842")
        qualified = c.qualified(token, server_event_id="qual-7842")
    assert again.outcome is Outcome.DUPLICATE
    assert qualified.data == {"ok": True, "referral_id": referral_id, "state": "qualified"}


@pytest.mark.parametrize(
    "secret", ["ünïcödé-秘密-🔑-secret", "00112233445566778899aabbccddeeff", "a b,c=d;e"]
)
def test_guide_and_ours_agree_on_awkward_secrets(
    mmolove_sandbox_factory: SandboxFactory, secret: str
) -> None:
    sandbox = mmolove_sandbox_factory(secret=secret)
    token = sandbox.mint_token()
    status, body = guide.mmolove_send_event(
        secret,
        sandbox.server_id,
        "registered",
        {"token": token, "referee_identity": "Zoë 😀", "server_event_id": "reg-ë"},
        endpoint=sandbox.endpoint,
    )
    assert (status, json.loads(body)["state"]) == (200, "registered")
    guide_record = last(sandbox)
    assert b"\\u00eb" in guide_record.body  # the guide's json.dumps escapes non-ASCII too

    with ReferralClient(sandbox.server_id, secret, sandbox.endpoint) as c:
        result = c.registered(token, referee_identity="Zoë 😀", server_event_id="reg-ë")
    assert result.outcome is Outcome.DUPLICATE  # same event, as MMOLove sees it
    ours = last(sandbox)
    for record in (guide_record, ours):
        assert record.signature is not None
        verify_signature(secret, record.body, record.signature)
    # Our bytes pass the guide's own signing formula, and the guide's pass ours.
    assert ours.signature == guide_signature(secret, ours.body.decode(), t_of(ours.signature))
    assert guide_record.signature == sign_referral_body(
        secret, guide_record.body, t_of(guide_record.signature)
    )


def test_guide_client_dry_run_and_errors(mmolove_sandbox: SandboxServer) -> None:
    token = mmolove_sandbox.mint_token()
    status, body = guide.mmolove_send_event(
        mmolove_sandbox.secret,
        mmolove_sandbox.server_id,
        "registered",
        {"token": token, "referee_identity": "p", "server_event_id": "test-1", "test": True},
        endpoint=mmolove_sandbox.endpoint,
    )
    assert (status, json.loads(body)) == (200, {"ok": True, "test": True})
    status, body = guide.mmolove_send_event(
        "wrong-secret",
        mmolove_sandbox.server_id,
        "qualified",
        {"token": token, "server_event_id": "q"},
        endpoint=mmolove_sandbox.endpoint,
    )
    assert status == 401
    assert json.loads(body)["error"] == "bad_signature"
    status, _ = guide.mmolove_send_event(
        "s", "srv", "qualified", {}, endpoint=f"http://127.0.0.1:{closed_port()}/x"
    )
    assert status == 0


text_field = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20).filter(
    lambda s: s.strip() != ""
)
json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.text(max_size=10)
)
extras = st.dictionaries(
    st.text(max_size=8).filter(
        lambda k: (
            k
            not in (
                "event",
                "token",
                "server_id",
                "referee_identity",
                "server_event_id",
                "ts",
                "test",
            )
        )
    ),
    st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3), max_leaves=5),
    max_size=3,
)


@settings(max_examples=200, deadline=None, database=None)
@given(
    event=st.sampled_from(["registered", "qualified", "reversed"]),
    token=text_field,
    server_id=text_field,
    server_event_id=text_field,
    referee_identity=text_field,
    ts=st.integers(1, 2**40),
    test=st.booleans(),
    extra=extras,
    secret=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20),
    t=st.integers(1, 2**40),
)
def test_property_our_body_is_what_the_guide_would_serialise(
    event: str,
    token: str,
    server_id: str,
    server_event_id: str,
    referee_identity: str,
    ts: int,
    test: bool,
    extra: dict[str, Any],
    secret: str,
    t: int,
) -> None:
    body = build_body(
        event,
        token=token,
        server_id=server_id,
        server_event_id=server_event_id,
        referee_identity=referee_identity,
        ts=ts,
        test=test,
        extra=extra,
    )
    # The guide's serialiser, run over the same fields in the same order, writes the
    # same bytes: same separators, same escaping of non-ASCII.
    raw = json.dumps(json.loads(body), separators=(",", ":"))
    assert raw.encode() == body
    assert sign_referral_body(secret, body, t) == guide_signature(secret, raw, t)


def test_truncated_answer_raises_transport_error() -> None:
    class Short(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"ok":tr')  # then the connection closes

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Short)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}/api/referral/events"
    try:
        with ReferralClient("srv", SECRET, endpoint) as c, pytest.raises(TransportError) as info:
            c.qualified("tok", server_event_id="q", ts=1)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert_transport_error(info.value, endpoint)


def test_answer_that_is_not_utf8_is_still_a_result() -> None:
    def answer(seen: Seen, url: str) -> Answer:
        return 200, [("Content-Type", "application/json")], b'{"ok":true,"x":"\xff"}'

    with tiny_server(answer) as tiny, ReferralClient("srv", "s3cret", tiny.endpoint) as c:
        result = c.qualified("tok", server_event_id="q", ts=1)
    assert (result.status, result.ok) == (200, True)
    assert result.body == '{"ok":true,"x":"\ufffd"}'
    assert result.outcome is Outcome.ACCEPTED


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
