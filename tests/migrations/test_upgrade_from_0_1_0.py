"""Proof 7: an outbox made by 0.1.0, with pending events, upgraded by a real
``flask mmolove db upgrade`` process: 0 lost, then delivered (SQLite and PostgreSQL).

The outbox is built with 0.1.0's own DDL (legacy_outbox.py); before the upgrade the
portal's worker refuses it, naming the command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from legacy_outbox import create_010, rows

from flask_mmolove.outbox import Outbox, make_engine
from flask_mmolove.protocol import build_body

PORTAL = (
    "from flask import Flask\n"
    "from flask_mmolove import MMOLove\n"
    "app = Flask(__name__)\n"
    "app.config.from_prefixed_env('PORTAL')\n"
    "MMOLove(app)\n"
)
EVENTS = 12


def flask(
    tmp_path: Path, url: str, sandbox: Any, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "FLASK_APP": "portal010:app",
        "PORTAL_MMOLOVE_DELIVERY": '"worker"',
        "PORTAL_MMOLOVE_DATABASE_URI": f'"{url}"',
        "MMOLOVE_ENDPOINT": sandbox.endpoint,
        "MMOLOVE_SERVER_ID": sandbox.server_id,
        "MMOLOVE_REFERRAL_SECRET": sandbox.secret,
    }
    return subprocess.run(
        [sys.executable, "-m", "flask", "mmolove", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_an_outbox_from_0_1_0_upgrades_with_0_lost_then_delivers(
    tmp_path: Path, database_url: str, mmolove_sandbox: Any
) -> None:
    (tmp_path / "portal010.py").write_text(PORTAL)
    engine = make_engine(database_url)
    create_010(engine)
    box = Outbox(engine)
    for i in range(EVENTS):
        token = mmolove_sandbox.mint_token(f"referrer-{i}")
        box.bind_and_enqueue(
            identity=str(i),
            token=token,
            event="registered",
            server_event_id=f"reg-{i}",
            body=build_body(
                "registered",
                token=token,
                server_id=mmolove_sandbox.server_id,
                server_event_id=f"reg-{i}",
                referee_identity=str(i),
            ),
        )
    before = rows(engine)

    refused = flask(tmp_path, database_url, mmolove_sandbox, "worker", "--burst")
    assert refused.returncode != 0
    assert "flask mmolove db upgrade" in refused.stdout + refused.stderr
    assert mmolove_sandbox.accepted_count("registered") == 0
    # A long-running worker is refused the same way, at once: not the refusal logged
    # every poll interval by a worker that looks alive to its supervisor.
    refused = flask(tmp_path, database_url, mmolove_sandbox, "worker", timeout=30)
    assert refused.returncode != 0
    assert "flask mmolove db upgrade" in refused.stdout + refused.stderr

    upgraded = flask(tmp_path, database_url, mmolove_sandbox, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert "schema upgraded from 0.1.0 (tables without a schema version) to 0003" in (
        upgraded.stdout
    )
    assert rows(engine) == before  # 0 lost, not a byte changed

    worker = flask(tmp_path, database_url, mmolove_sandbox, "worker", "--burst")
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert mmolove_sandbox.accepted_count("registered") == EVENTS
    assert Outbox(engine).stats().delivered == EVENTS
    output = upgraded.stdout + upgraded.stderr + worker.stdout + worker.stderr
    assert mmolove_sandbox.secret not in output
    engine.dispose()
