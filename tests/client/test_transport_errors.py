"""Transport failures raise TransportError, and never show the secret.

A closed port, a dropped connection, a lost answer (then a retry, which MMOLove sees
as a duplicate), a read timeout and a truncated answer, each over a real socket.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from client_support import SandboxFactory, closed_port, last

from flask_mmolove import ReferralClient, TransportError
from flask_mmolove.protocol import Outcome
from flask_mmolove.sandbox import SandboxServer

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
