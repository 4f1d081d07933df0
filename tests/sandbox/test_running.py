"""Running the sandbox: its server thread stops quickly, frees its port and leaves no
thread behind; it works as a context manager; the command line serves it without ever
printing the secret, and refuses to start without one; and the Flask app works in
process with the test client.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import requests
from sandbox_support import encode, post_fields

from flask_mmolove.protocol import SIGNATURE_HEADER, sign_referral_body
from flask_mmolove.sandbox import SandboxServer, create_sandbox_app, sandbox_state


def test_stop_is_quick_frees_the_port_and_leaves_no_thread() -> None:
    sandbox = SandboxServer().start()
    url = sandbox.url
    with sandbox.client() as client:
        client.registered(sandbox.mint_token(), referee_identity="p", server_event_id="reg-p")
    sandbox.delay_next(1, 30)

    def held_when_stopped() -> None:
        with pytest.raises(requests.ConnectionError):
            post_fields(sandbox, {})

    pending = threading.Thread(target=held_when_stopped)
    pending.start()
    while not sandbox.events and sandbox.state.faults:
        time.sleep(0.01)
    started = time.monotonic()
    sandbox.stop()
    sandbox.stop()
    assert time.monotonic() - started < 2
    pending.join(5)
    assert not pending.is_alive()
    assert not any(t.name.startswith("mmolove-sandbox") for t in threading.enumerate())
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/log", timeout=2)
    with pytest.raises(RuntimeError):
        _ = sandbox.url


def test_context_manager_and_repr() -> None:
    with SandboxServer(server_id="srv-1", secret="a-long-enough-secret") as sandbox:
        assert sandbox.running
        assert sandbox.endpoint == sandbox.url + "/api/referral/events"
        assert sandbox.url.startswith("http://127.0.0.1:")
        assert "srv-1" in repr(sandbox)
    assert not sandbox.running
    assert "stopped" in repr(sandbox)


def test_command_line_runs_and_never_prints_the_secret() -> None:
    secret = "cli-secret-" + os.urandom(8).hex()
    env = {**os.environ, "MMOLOVE_REFERRAL_SECRET": secret, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "flask_mmolove.sandbox", "--port", "0", "--server-id", "cli"]
    args += ["--registration-url", "http://portal.test/join"]
    with subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            lines = [process.stdout.readline() for _ in range(4)]
            urls = {
                line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in lines[1:]
            }
            assert urls["share link"].endswith("/r/cli?ref=friend")
            assert urls["endpoint"].endswith("/api/referral/events")
            page = requests.get(urls["log"], timeout=10)
            assert page.status_code == 200
            shared = requests.get(urls["share link"], allow_redirects=False, timeout=10)
            assert shared.headers["Location"].startswith("http://portal.test/join?mmref=")
        finally:
            process.terminate()
            out, err = process.communicate(timeout=10)
    assert secret not in "".join(lines) + out + err


def test_command_line_requires_a_secret(capsys: pytest.CaptureFixture[str]) -> None:
    from flask_mmolove.sandbox import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--server-id", "x", "--registration-url", "http://p.test/"], env={})
    assert exit_info.value.code == 2
    assert "MMOLOVE_REFERRAL_SECRET" in capsys.readouterr().err


def test_app_works_in_process_with_the_flask_test_client() -> None:
    app = create_sandbox_app(
        secret="in-process-secret", server_id="srv", registration_url="http://p.test/"
    )
    app.testing = True
    state = sandbox_state(app)
    body = encode(
        {
            "event": "qualified",
            "token": state.mint_token(),
            "server_id": "srv",
            "server_event_id": "q",
        }
    )
    headers = {SIGNATURE_HEADER: sign_referral_body("in-process-secret", body)}
    client = app.test_client()
    assert client.post("/api/referral/events", data=body, headers=headers).status_code == 422
    assert client.get("/").headers["Location"] == "/log"
    # Without a socket there is no connection to drop: the request fails loudly instead.
    state.drop_next(1)
    with pytest.raises(ConnectionAbortedError):
        client.post("/api/referral/events", data=body, headers=headers)
