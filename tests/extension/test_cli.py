"""``flask mmolove``: worker, status, retry, ping, sandbox; never the secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask


@pytest.fixture
def worker_app(make_portal: Callable[..., Flask]) -> Flask:
    return make_portal(MMOLOVE_DELIVERY="worker")


def run(app: Flask, *args: str) -> Any:
    result = app.test_cli_runner().invoke(args=["mmolove", *args])
    assert app.config["MMOLOVE_REFERRAL_SECRET"] not in result.output
    return result


def register(app: Flask, sandbox: Any, name: str) -> None:
    client = app.test_client()
    client.get(f"/register?mmref={sandbox.mint_token(name)}")
    client.post("/register", data={"name": name})


def test_status_counts_and_dead_letters(worker_app: Flask, mmolove_sandbox: Any) -> None:
    register(worker_app, mmolove_sandbox, "a")
    register(worker_app, mmolove_sandbox, "b")
    result = run(worker_app, "status")
    assert result.exit_code == 0, result.output
    assert "pending:    2" in result.output
    assert "delivered:  0" in result.output
    mmolove_sandbox.fail_next(1, status=404)
    run(worker_app, "worker", "--burst")
    result = run(worker_app, "status")
    assert "delivered:  1" in result.output
    assert "dead:       1" in result.output
    assert "dead #" in result.output
    assert "not_found" in result.output


def test_retry_by_id(worker_app: Flask, mmolove_sandbox: Any) -> None:
    register(worker_app, mmolove_sandbox, "a")
    mmolove_sandbox.fail_next(1, status=422)
    run(worker_app, "worker", "--burst")
    [event] = worker_app.extensions["mmolove"].outbox.list_events()
    assert event.state == "dead"
    assert "requeued 0" in run(worker_app, "retry", "99999").output
    assert "requeued 1" in run(worker_app, "retry", str(event.id)).output
    run(worker_app, "worker", "--burst")
    [event] = worker_app.extensions["mmolove"].outbox.list_events()
    assert event.state == "delivered"


def test_retry_needs_ids_or_all(worker_app: Flask) -> None:
    result = run(worker_app, "retry")
    assert result.exit_code == 2
    assert "--all" in result.output


def test_ping_reports_outcome_and_skew(worker_app: Flask, mmolove_sandbox: Any) -> None:
    result = run(worker_app, "ping")
    assert result.exit_code == 0, result.output
    assert "status:     200 (test)" in result.output
    assert "round trip:" in result.output
    [record] = mmolove_sandbox.events
    assert record.verdict == "test"


def test_ping_with_a_wrong_secret_says_what_to_fix(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    app = make_portal(MMOLOVE_DELIVERY="worker", MMOLOVE_REFERRAL_SECRET="wrong-secret-xyz")
    result = run(app, "ping")
    assert result.exit_code == 1
    assert "401" in result.output
    assert "MMOLOVE_REFERRAL_SECRET" in result.output


@pytest.mark.parametrize("status", [404, 500, 502])
def test_ping_redacts_a_secret_mmolove_echoes(
    worker_app: Flask, mmolove_sandbox: Any, status: int
) -> None:
    """An endpoint that echoes the secret (a debug page, a proxy) never puts it on screen."""
    secret = worker_app.config["MMOLOVE_REFERRAL_SECRET"]
    echo = json.dumps({"error": f"bad key {secret!r} \\ {secret}"})
    mmolove_sandbox.fail_next(1, status=status, body=f"{secret} {echo}")
    result = run(worker_app, "ping")
    assert result.exit_code == 1
    assert "MMOLove said:" in result.output
    assert "[redacted]" in result.output
    assert json.dumps(secret)[1:-1] not in result.output


def test_ping_when_mmolove_is_down(make_portal: Callable[..., Flask]) -> None:
    app = make_portal(
        MMOLOVE_DELIVERY="worker", MMOLOVE_ENDPOINT="http://127.0.0.1:9/api/referral/events"
    )
    result = run(app, "ping")
    assert result.exit_code == 1
    assert "could not reach MMOLove" in result.output


def test_worker_process_stops_on_sigterm(tmp_path: Path, mmolove_sandbox: Any) -> None:
    """A real `flask mmolove worker` process: delivers, then stops cleanly on SIGTERM."""
    app_file = tmp_path / "portalapp.py"
    app_file.write_text(
        "from flask import Flask\n"
        "from flask_mmolove import MMOLove\n"
        "app = Flask(__name__)\n"
        "app.config.from_prefixed_env('PORTAL')\n"
        "MMOLove(app)\n"
    )
    db = tmp_path / "outbox.sqlite3"
    env = {
        **os.environ,
        "FLASK_APP": str(app_file),
        "PORTAL_MMOLOVE_DELIVERY": '"worker"',
        "PORTAL_MMOLOVE_DATABASE_URI": f'"sqlite:///{db}"',
        "PORTAL_MMOLOVE_POLL_INTERVAL": "0.1",
        "MMOLOVE_ENDPOINT": mmolove_sandbox.endpoint,
        "MMOLOVE_SERVER_ID": mmolove_sandbox.server_id,
        "MMOLOVE_REFERRAL_SECRET": mmolove_sandbox.secret,
    }
    # Enqueue from this process through the same database, as a portal would.
    from flask_mmolove.outbox import Outbox, make_engine
    from flask_mmolove.protocol import build_body

    proc = subprocess.Popen(
        [sys.executable, "-m", "flask", "mmolove", "worker"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not db.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        engine = make_engine(f"sqlite:///{db}")
        outbox = Outbox(engine)
        outbox.create_all()
        token = mmolove_sandbox.mint_token()
        outbox.bind_and_enqueue(
            identity="7",
            token=token,
            event="registered",
            server_event_id="reg-7",
            body=build_body(
                "registered",
                token=token,
                server_id=mmolove_sandbox.server_id,
                server_event_id="reg-7",
                referee_identity="7",
            ),
        )
        engine.dispose()
        while mmolove_sandbox.accepted_count("registered") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mmolove_sandbox.accepted_count("registered") == 1
        proc.terminate()
        output, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    assert "stopped: delivered 1" in output
    assert mmolove_sandbox.secret not in output


def test_status_lists_events_waiting_to_retry(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    app = make_portal(MMOLOVE_DELIVERY="worker", MMOLOVE_REFERRAL_SECRET="wrong-secret-xyz")
    register(app, mmolove_sandbox, "a")
    run(app, "worker", "--burst")
    result = run(app, "status")
    [event] = app.extensions["mmolove"].outbox.list_events()
    assert f"retrying #{event.id} registered reg-1000" in result.output
    assert "bad_signature" in result.output
    assert "flask mmolove retry ID" in result.output


def test_retry_in_inline_mode_delivers_at_once(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    app = make_portal()  # inline
    mmolove_sandbox.fail_next(1, status=404)
    register(app, mmolove_sandbox, "a")
    [event] = app.extensions["mmolove"].outbox.list_events()
    assert event.state == "dead"
    assert "requeued 1" in run(app, "retry", "--all").output
    [event] = app.extensions["mmolove"].outbox.list_events()
    assert event.state == "delivered"
