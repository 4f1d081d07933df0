"""The referral commits with the account (``db=``): a portal SIGKILLed at the worst moment
loses nothing, and a grant made in ``referrer_credited`` happens exactly once.

Each journey is a real process (tests/dbportal.py) that registers a player, or levels
one up, through the portal's views and kills itself right after its commit, before it
answers. A restarted ``flask mmolove worker --burst`` then delivers what the dead
processes committed. The control runs the same journeys with the outbox beside the
portal (standalone), where the event is written when the request finishes: every one
is lost. SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from reliability_support import HERE, record_figures

JOURNEYS = 12


def _env(sandbox: Any, database_uri: str, **portal: Any) -> dict[str, str]:
    env = {
        **os.environ,
        "FLASK_APP": str(HERE / "dbportal.py"),
        "MMOLOVE_ENDPOINT": sandbox.endpoint,
        "MMOLOVE_SERVER_ID": sandbox.server_id,
        "MMOLOVE_REFERRAL_SECRET": sandbox.secret,
        "PYTHONUNBUFFERED": "1",
        "PORTAL_SQLALCHEMY_DATABASE_URI": json.dumps(database_uri),
        "PORTAL_MMOLOVE_DELIVERY": json.dumps("worker"),
        "PORTAL_MMOLOVE_LEASE": json.dumps(1.0),
        # An attempt's deadline (connect + read) must fit inside the lease.
        "PORTAL_MMOLOVE_CONNECT_TIMEOUT": json.dumps(0.3),
        "PORTAL_MMOLOVE_READ_TIMEOUT": json.dumps(0.5),
        "PORTAL_MMOLOVE_RETRY_BASE": json.dumps(0.05),
        "PORTAL_MMOLOVE_RETRY_CAP": json.dumps(0.2),
    }
    for key, value in portal.items():
        env[f"PORTAL_{key}"] = json.dumps(value)
    return env


def _dying(env: dict[str, str], moment: str) -> dict[str, str]:
    """``env`` for a process that SIGKILLs itself at ``moment`` (see dbportal.py)."""
    return {**env, "PORTAL_DIE_AFTER": json.dumps(moment)}


def _run(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HERE / "dbportal.py"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _burst(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flask", "mmolove", "worker", "--burst"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _count(database_uri: str, sql: str) -> int:
    engine = sa.create_engine(database_uri)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(sql)).scalar_one())
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'portal.sqlite3'}"
    uri = str(request.getfixturevalue("pg_uri"))
    engine = sa.create_engine(uri)
    with engine.begin() as conn:
        for table in ("grants", "players", "mmolove_events", "mmolove_bindings", "mmolove_credits"):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()
    return uri


@pytest.mark.slow
def test_a_portal_killed_right_after_its_commit_loses_no_referral(
    mmolove_sandbox: Any, database_uri: str, tmp_path: Path
) -> None:
    env = _env(mmolove_sandbox, database_uri)
    assert _run(env, tmp_path, "create").returncode == 0
    for n in range(JOURNEYS):
        token = mmolove_sandbox.mint_token(f"friend{n}")
        died = _run(
            {**env, "PORTAL_DIE_AFTER": '"register-commit"'}, tmp_path, "register", token, str(n)
        )
        assert died.returncode == -signal.SIGKILL, died.stderr
    assert _count(database_uri, "SELECT count(*) FROM players") == JOURNEYS
    for n in range(JOURNEYS):
        died = _run(_dying(env, "play-commit"), tmp_path, "play", str(n))
        assert died.returncode == -signal.SIGKILL, died.stderr
    assert mmolove_sandbox.accepted_count() == 0
    # Restarted: the worker finds everything the dead processes committed.
    worker = _burst(env, tmp_path)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert mmolove_sandbox.accepted_count("registered") == JOURNEYS
    assert mmolove_sandbox.accepted_count("qualified") == JOURNEYS
    assert _count(database_uri, "SELECT count(*) FROM grants") == JOURNEYS
    record_figures(
        "14.1 killed after commit (db=)",
        database=database_uri.split(":", 1)[0],
        journeys=JOURNEYS,
        registered_delivered=mmolove_sandbox.accepted_count("registered"),
        qualified_delivered=mmolove_sandbox.accepted_count("qualified"),
        lost=0,
    )


@pytest.mark.slow
def test_control_the_standalone_outbox_loses_what_a_kill_interrupts(
    mmolove_sandbox: Any, tmp_path: Path
) -> None:
    # What the db= mode fixes: standalone, the event is written when the request
    # finishes, which a process killed after the portal's commit never reaches.
    database_uri = f"sqlite:///{tmp_path / 'portal.sqlite3'}"
    env = _env(
        mmolove_sandbox,
        database_uri,
        STANDALONE=True,
        MMOLOVE_DATABASE_URI=f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
    )
    assert _run(env, tmp_path, "create").returncode == 0
    journeys = 4
    for n in range(journeys):
        token = mmolove_sandbox.mint_token(f"friend{n}")
        died = _run(
            {**env, "PORTAL_DIE_AFTER": '"register-commit"'}, tmp_path, "register", token, str(n)
        )
        assert died.returncode == -signal.SIGKILL, died.stderr
    assert _count(database_uri, "SELECT count(*) FROM players") == journeys
    assert _burst(env, tmp_path).returncode == 0
    lost = journeys - mmolove_sandbox.accepted_count("registered")
    assert lost == journeys
    record_figures("14.1 control: standalone, killed after commit", journeys=journeys, lost=lost)


@pytest.mark.slow
def test_a_grant_interrupted_before_its_commit_is_made_exactly_once(
    mmolove_sandbox: Any, database_uri: str, tmp_path: Path
) -> None:
    env = _env(mmolove_sandbox, database_uri)
    assert _run(env, tmp_path, "create").returncode == 0
    referees = 3
    for n in range(referees):
        assert (
            _run(env, tmp_path, "register", mmolove_sandbox.mint_token(f"f{n}"), str(n)).returncode
            == 0
        )
        assert _run(env, tmp_path, "play", str(n)).returncode == 0
    # The worker delivers, then dies in the first grant, after its flush.
    dying = _burst(_dying(env, "grant-flush"), tmp_path)
    assert dying.returncode == -signal.SIGKILL, dying.stdout + dying.stderr
    assert mmolove_sandbox.accepted_count("qualified") == referees
    assert _count(database_uri, "SELECT count(*) FROM grants") == 0
    # Restarted after the lease: every credit announced again, each granted once.
    time.sleep(1.2)
    worker = _burst(env, tmp_path)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert _count(database_uri, "SELECT count(*) FROM grants") == referees
    assert _count(database_uri, "SELECT count(DISTINCT referee) FROM grants") == referees
    assert (
        _count(database_uri, "SELECT count(*) FROM mmolove_credits WHERE notified_at IS NULL") == 0
    )
    record_figures(
        "14.5 killed in a grant (db=)",
        database=database_uri.split(":", 1)[0],
        referees=referees,
        grants=referees,
    )
