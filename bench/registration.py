"""2. Registration latency while MMOLove is slow (the sandbox holds every event 300 ms).

The timed request is the player's ``POST /register``. Portals of the same shape:

- no referral code at all (the baseline);
- flask-mmolove in ``thread`` mode (the default) and ``worker`` mode: the request only
  writes the outbox; the delivery thread (or a worker process) posts afterwards;
- flask-mmolove in ``inline`` mode, for reference: it posts before answering;
- the guide's approach: ``mmolove_send_event`` called inline in the view.

A visitor arrives with a fresh token each round (``GET /register?mmref=...``, not
timed); the guide's portal gets the token in the POST's query string, as its capture
reads it. Rounds are interleaved; every event must reach the sandbox.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

from flask import Flask

from flask_mmolove import MMOLove

from .databases import postgres_url, sqlite_url, table_prefix
from .portals import guide_portal, plain_portal, referral_portal
from .results import Result
from .sandbox import Sandbox
from .stats import median, percentile
from .timing import interleaved

NAME = "registration"
TITLE = "Registration latency with a slow MMOLove"
DELAY = 0.3
GOAL_MS = 5.0


def _timed_post(client: Any, url: str) -> float:
    started = time.perf_counter()
    response = client.post(url, data={"name": "ayla"})
    elapsed = (time.perf_counter() - started) * 1e3
    if response.status_code != 302:
        raise RuntimeError(f"POST {url} answered {response.status_code}")
    return elapsed


def run(quick: bool) -> Result:
    rounds = 3 if quick else 30
    result = Result(NAME, TITLE, quick, params={"delay_s": DELAY, "rounds": rounds})
    with (
        tempfile.TemporaryDirectory(prefix="mmolove-bench-") as workdir,
        Sandbox(DELAY) as sandbox,
    ):
        made: dict[str, tuple[MMOLove, Flask]] = {}

        def ours(name: str, mode: str, database: str, **extra: Any) -> Flask:
            ext = MMOLove()
            config = {
                **sandbox.portal_config(),
                "MMOLOVE_DATABASE_URI": database,
                "MMOLOVE_DELIVERY": mode,
                **extra,
            }
            app = referral_portal(config, ext)
            made[name] = (ext, app)
            return app

        portals: dict[str, Flask] = {
            "none": plain_portal(),
            "thread": ours("thread", "thread", sqlite_url(workdir, "thread.sqlite3")),
            "worker": ours("worker", "worker", sqlite_url(workdir, "worker.sqlite3")),
            "inline": ours("inline", "inline", sqlite_url(workdir, "inline.sqlite3")),
            "guide": guide_portal(sandbox.secret, sandbox.server_id, sandbox.endpoint),
        }
        labels = {
            "none": "no referral code at all",
            "thread": "flask-mmolove, thread mode (default)",
            "worker": "flask-mmolove, worker mode",
            "inline": "flask-mmolove, inline mode (posts before answering)",
            "guide": "the guide: mmolove_send_event inline in the view",
        }
        pg = postgres_url()
        if pg is not None:
            portals["thread_pg"] = ours(
                "thread_pg", "thread", pg, MMOLOVE_TABLE_PREFIX=table_prefix()
            )
            labels["thread_pg"] = "flask-mmolove, thread mode, PostgreSQL outbox"
        else:
            result.notes.append("PostgreSQL not reachable: its row is missing")
        clients = {name: app.test_client() for name, app in portals.items()}

        def case(name: str) -> Callable[[], float]:
            client = clients[name]

            def run_one() -> float:
                token = sandbox.mint()
                if name in ("none", "guide"):
                    return _timed_post(client, f"/register?mmref={token}")
                client.get(f"/register?mmref={token}")
                return _timed_post(client, "/register")

            return run_one

        cases = {name: case(name) for name in portals}
        for run_one in cases.values():  # warm-up: imports, connections, the thread
            run_one()
        samples = interleaved(cases, rounds)
        # Every event reaches MMOLove: the worker's by a burst here, the rest already.
        worker_ext, worker_app = made["worker"]
        while worker_ext.deliver_now(worker_app):
            pass
        expected = (rounds + 1) * (len(portals) - 1)
        deadline = time.monotonic() + 30
        while sandbox.stats()["accepted"] < expected and time.monotonic() < deadline:
            time.sleep(0.1)
        accepted = sandbox.stats()["accepted"]
        for ext, app in made.values():
            ext.shutdown(app)
        if pg is not None:
            _drop(portals["thread_pg"])

    base = median(samples["none"])
    table = result.table(
        f"POST /register, ms (sandbox delay {DELAY * 1e3:.0f} ms; {rounds} interleaved rounds)",
        ["portal", "median", "p90", "max", "median - no code"],
    )
    for name, values in samples.items():
        med = median(values)
        table.add(labels[name], med, percentile(values, 0.9), max(values), med - base)
        result.metric(f"{name}.median_ms", med)
        result.metric(f"{name}.p90_ms", percentile(values, 0.9))
        result.metric(f"{name}.extra_ms", med - base)
    result.metric("events_accepted", accepted)
    worst = max(result.metrics["thread.extra_ms"], result.metrics["worker.extra_ms"])
    result.goal(
        f"thread and worker modes within a few ms ({GOAL_MS:g}) of no referral code",
        worst < GOAL_MS,
        f"thread +{result.metrics['thread.extra_ms']:.2f} ms, worker "
        f"+{result.metrics['worker.extra_ms']:.2f} ms; the guide "
        f"+{result.metrics['guide.extra_ms']:.0f} ms",
    )
    result.notes.append(
        f"{accepted} of {expected} referral events reached the sandbox (warm-up included)."
    )
    return result


def _drop(app: Flask) -> None:
    outbox = app.extensions["mmolove"].outbox
    outbox.drop_all()
    outbox.dispose()
