"""The demo pays gold for a vote: its sandbox plays MMOLove's reward callback to the
demo's own endpoint, over real HTTP, and the voter is paid once per vote."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import requests
from sqlalchemy import select
from support import wait_for

from example_app.demo import DemoServer
from example_app.extensions import db
from example_app.models import User, VoteReward


def _gold(demo: DemoServer, username: str) -> int:
    assert demo.portal is not None
    with demo.portal.app_context():
        return int(
            db.session.execute(select(User.gold).where(User.username == username)).scalar_one()
        )


def _rewards(demo: DemoServer) -> list[tuple[str, int | None, int]]:
    assert demo.portal is not None
    with demo.portal.app_context():
        rows = db.session.scalars(select(VoteReward)).all()
        return sorted((r.username, r.player_id, r.gold) for r in rows)


def test_a_vote_in_the_demo_pays_the_voter_once(tmp_path: Path) -> None:
    demo = DemoServer(port=0, instance_path=str(tmp_path), quiet=True, environ={}).start()
    try:
        assert demo.portal is not None
        before = _gold(demo, "admin")
        hearts = f"{demo.url}/_mmolove/_hearts"
        heart_id = "0a1b2c3d-0000-4000-8000-000000000001"
        # The same vote twice (MMOLove retrying it) and a vote for a name nobody has.
        for body in (
            {"username": "admin", "heart_id": heart_id, "streak_day": 2},
            {"username": "admin", "heart_id": heart_id, "streak_day": 2},
            {"username": "nobody-here"},
        ):
            assert requests.post(hearts, json=body, timeout=5).status_code < 300
        wait_for(lambda: len(_rewards(demo)) == 2, timeout=15, what="two votes paid")
        reward = int(demo.portal.config["PORTAL_VOTE_REWARD"])
        assert _gold(demo, "admin") == before + reward
        assert [(name, gold) for name, _, gold in _rewards(demo)] == [
            ("admin", reward),
            ("nobody-here", 0),
        ]
    finally:
        demo.stop()


def test_the_walkthrough_shows_how_to_vote(tmp_path: Path) -> None:
    demo = DemoServer(port=0, instance_path=str(tmp_path), quiet=True, environ={}).start()
    try:
        [line] = [line for line in demo.walkthrough().splitlines() if "curl" in line]
        command = line.strip()
        # The command as printed runs, and pays the admin.
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["heart_id"]
        wait_for(lambda: _rewards(demo), timeout=15, what="the vote paid")
    finally:
        demo.stop()
