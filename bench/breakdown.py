"""5. Where the time of one delivery goes, and what the floor is.

One delivery is: claim (a batch of 50, one transaction), sign, POST, read and classify
the answer, record it (one transaction per event). Each part is timed on its own, in
this process, against the sandbox in its own process at 0 ms; then a whole pass
(``Deliverer.run_once``, one send at a time so that everything runs in this thread)
is timed and profiled, and the profile's own time is grouped by library.

The sandbox is served with keep-alive (gunicorn) when gunicorn is installed. The floor:
what the sandbox itself spends per event (its CPU time), one durable SQLite commit done
with the bare driver, and an HTTP round trip with the bare ``http.client`` on one kept
connection.
"""

from __future__ import annotations

import cProfile
import http.client
import pstats
import sqlite3
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from flask import Flask

from flask_mmolove import MMOLove
from flask_mmolove.protocol import (
    SIGNATURE_HEADER,
    build_body,
    classify,
    outcome_of,
    parse_json_object,
    sign_referral_body,
)

from .databases import sqlite_url
from .events import fill, registered_events
from .portals import guide_send_event
from .results import Result
from .sandbox import Sandbox, have_gunicorn
from .stats import median
from .timing import interleaved, per_call

NAME = "profile"
TITLE = "Where the time of one delivery goes"

CATEGORIES = (
    ("JSON", ("json/", "json\\")),
    ("signing", ("hmac", "hashlib", "_hashlib", "protocol/signatures.py:")),
    ("database", ("sqlalchemy", "sqlite3", "psycopg", "flask_mmolove/outbox/")),
    ("HTTP", ("requests", "urllib3", "http/client", "socket", "ssl", "email/", "selectors")),
    ("threads and locks", ("threading", "queue", "_thread")),
    ("flask-mmolove", ("flask_mmolove",)),
)


def _category(key: tuple[str, int, str]) -> str:
    filename, _line, function = key
    where = f"{filename}:{function}"
    if filename == "~":  # built-ins: classify by what they are
        if any(word in function for word in ("sqlite3", "psycopg")):
            return "database"
        if any(word in function for word in ("socket", "recv", "send", "connect", "select")):
            return "HTTP"
        if any(word in function for word in ("hmac", "hashlib", "openssl", "digest")):
            return "signing"
        if "json" in function:
            return "JSON"
        if "lock" in function or "acquire" in function:
            return "threads and locks"
        return "other"
    for name, needles in CATEGORIES:
        if any(needle in where for needle in needles):
            return name
    return "other"


def cpu_us(func: Callable[[], object], n: int) -> float:
    started = time.thread_time()
    for _ in range(n):
        func()
    return (time.thread_time() - started) / n * 1e6


def wall_us(func: Callable[[], object], n: int) -> float:
    return per_call(func, n) * 1e6


def run(quick: bool) -> Result:
    n = 100 if quick else 1000
    rounds = 2 if quick else 5
    result = Result(NAME, TITLE, quick, params={"events": n, "rounds": rounds})
    keep_alive = have_gunicorn()
    with (
        Sandbox(keep_alive=keep_alive) as sandbox,
        tempfile.TemporaryDirectory(prefix="mmolove-bench-") as tmp,
    ):
        secret, server_id = sandbox.secret, sandbox.server_id
        events = registered_events(
            n * (rounds + 4) + 200, server_id, lambda i: sandbox.mint(f"p{i}")
        )
        body = events[0].body
        answer = '{"ok":true,"referral_id":"ref_0123456789abcdef","state":"registered"}'

        # --- the parts, on their own --------------------------------------------
        parts = result.table(
            f"The parts of one delivery, µs per event (median of {rounds} rounds of {n})",
            ["part", "µs", "how it was timed"],
        )
        build = median(
            [
                cpu_us(
                    lambda: build_body(
                        "registered",
                        token=events[1].token,
                        server_id=server_id,
                        server_event_id="reg-player-1",
                        referee_identity="player-1",
                    ),
                    n * 10,
                )
                for _ in range(rounds)
            ]
        )
        sign = median(
            [cpu_us(lambda: sign_referral_body(secret, body), n * 10) for _ in range(rounds)]
        )
        parse = median(
            [
                cpu_us(lambda: (outcome_of(parse_json_object(answer)), classify(200)), n * 10)
                for _ in range(rounds)
            ]
        )
        parts.add("build the body (JSON, at enqueue)", build, "CPU, build_body")
        parts.add("sign", sign, "CPU, sign_referral_body")
        parts.add("read the answer (JSON) and classify", parse, "CPU")

        app = Flask("bench_profile")
        app.config.update(
            sandbox.portal_config(),
            MMOLOVE_DATABASE_URI=sqlite_url(tmp, "profile.sqlite3"),
            MMOLOVE_DELIVERY="worker",
            MMOLOVE_CONCURRENCY=1,
        )
        ext = MMOLove()
        ext.init_app(app)
        state = app.extensions["mmolove"]
        outbox, deliverer, client = state.outbox, state.deliverer, state.deliverer.client
        fill(outbox, events)
        cursor = iter(events[1:])

        claim_us, complete_us = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            claimed = []
            while len(claimed) < n:
                claimed += outbox.claim(deliverer.owner, limit=50, lease=60.0)
            claim_us.append((time.perf_counter() - started) / len(claimed) * 1e6)
            started = time.perf_counter()
            for event in claimed:
                outbox.complete(
                    event.id,
                    deliverer.owner,
                    status=200,
                    response=answer,
                    outcome="advanced",
                    credit=False,
                )
            complete_us.append((time.perf_counter() - started) / len(claimed) * 1e6)
        parts.add("claim (batches of 50)", median(claim_us), "wall, SQLite, per event")
        parts.add("record the answer", median(complete_us), "wall, SQLite, one commit")

        # --- round trips to the sandbox -------------------------------------------
        guide = guide_send_event()

        def ours_once() -> None:
            event = next(cursor)
            if client.send_body(event.body).status != 200:
                raise RuntimeError("the sandbox refused an event")

        def guide_once() -> None:
            event = next(cursor)
            status, _ = guide(
                secret,
                server_id,
                "registered",
                {
                    "token": event.token,
                    "referee_identity": event.identity,
                    "server_event_id": event.server_event_id,
                },
                sandbox.endpoint,
            )
            if status != 200:
                raise RuntimeError("the sandbox refused the guide's event")

        # One connection, kept open when the server allows (http.client reopens it
        # when the server closed it).
        bare_conn = http.client.HTTPConnection("127.0.0.1", sandbox.port, timeout=10)

        def bare_once() -> None:
            event = next(cursor)
            bare_conn.request(
                "POST",
                "/api/referral/events",
                body=event.body,
                headers={
                    "Content-Type": "application/json",
                    SIGNATURE_HEADER: sign_referral_body(secret, event.body),
                },
            )
            answer = bare_conn.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError("the sandbox refused an event")

        per_trip = max(10, n // 5)
        trips = interleaved(
            {
                "bare": lambda: wall_us(bare_once, per_trip),
                "guide": lambda: wall_us(guide_once, per_trip),
                "ours": lambda: wall_us(ours_once, per_trip),
            },
            rounds,
        )
        # CPU time is counted in clock ticks (10 ms): a long run for a fine figure.
        floor_trips = per_trip * 5
        sandbox_cpu0 = sandbox.cpu_seconds()
        sandbox_wall = wall_us(bare_once, floor_trips)
        sandbox_us = (sandbox.cpu_seconds() - sandbox_cpu0) / floor_trips * 1e6
        trip = result.table(
            f"One POST to the sandbox (0 ms), µs wall per event (median of {rounds} "
            f"interleaved rounds of {per_trip}, one at a time)",
            ["client", "µs", "over the bare client"],
        )
        bare = median(trips["bare"])
        for key, label in (
            ("bare", "bare http.client, pre-signed, connection kept (a client's floor)"),
            ("guide", "the guide's mmolove_send_event (urllib)"),
            ("ours", "flask-mmolove's ReferralClient.send_body (requests)"),
        ):
            value = median(trips[key])
            trip.add(label, value, value - bare)
            result.metric(f"trip.{key}_us", value)
        parts.add(
            "POST and answer (ReferralClient, sandbox at 0 ms)",
            median(trips["ours"]),
            "wall, includes the sandbox's work",
        )

        # --- a whole pass, timed and profiled ---------------------------------------
        delivered_before = 0
        passes: list[float] = []
        for _ in range(rounds):
            started = time.perf_counter()
            delivered = 0
            while delivered < per_trip:
                delivered += deliverer.run_once().delivered
            passes.append((time.perf_counter() - started) / delivered * 1e6)
            delivered_before += delivered
        whole = median(passes)
        parts.add("whole delivery (run_once, one send at a time)", whole, "wall, per event")
        profile = cProfile.Profile()
        profile.enable()
        profiled = 0
        while profiled < per_trip:
            profiled += deliverer.run_once().delivered
        profile.disable()
        ext.shutdown(app)
        bare_conn.close()

        for label, value in (
            ("build", build),
            ("sign", sign),
            ("parse", parse),
            ("claim", median(claim_us)),
            ("complete", median(complete_us)),
            ("whole", whole),
        ):
            result.metric(f"part.{label}_us", value)

        stats = pstats.Stats(profile)
        totals: dict[str, float] = defaultdict(float)
        for key, (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            totals[_category(key)] += tottime
        everything = sum(totals.values())
        shares = result.table(
            f"Profile of run_once over {profiled} events (cProfile, own time by library; "
            "time waiting for the sandbox counts as HTTP)",
            ["library", "share", "µs per event (profiled)"],
        )
        for name, seconds in sorted(totals.items(), key=lambda item: -item[1]):
            shares.add(name, f"{seconds / everything:.0%}", seconds / profiled * 1e6)
            result.metric(f"profile.{name.replace(' ', '_')}_share_ratio", seconds / everything)

        # --- the floor ------------------------------------------------------------------
        commit = bare_sqlite_commit_us(Path(tmp) / "floor.sqlite3", n)
        floor = result.table(
            "The floor, µs per event",
            ["what", "µs"],
        )
        floor.add("the sandbox's own CPU per event (its server, checks, log)", sandbox_us)
        floor.add("one bare HTTP round trip to the sandbox", sandbox_wall)
        floor.add("one durable SQLite commit, bare driver (WAL, synchronous=FULL)", commit)
        result.metric("floor.sandbox_cpu_us", sandbox_us)
        result.metric("floor.sqlite_commit_us", commit)
        result.metric("floor.bare_trip_us", sandbox_wall)
    result.notes.append(
        "At 0 ms the sandbox's own work dominates a round trip; with one send at a time a "
        "delivery costs the round trip plus claim and record. Several sends at a time and "
        "several workers overlap the round trips (see throughput)."
    )
    return result


def bare_sqlite_commit_us(path: Path, n: int) -> float:
    """One ``UPDATE`` in its own ``BEGIN IMMEDIATE`` transaction, with the bare driver."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, state TEXT, at REAL)")
        conn.executemany("INSERT INTO t (state, at) VALUES ('pending', 0)", [()] * 100)
        started = time.perf_counter()
        for i in range(n):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "UPDATE t SET state = 'delivered', at = ? WHERE id = ?", (time.time(), i % 100 + 1)
            )
            conn.execute("COMMIT")
        return (time.perf_counter() - started) / n * 1e6
    finally:
        conn.close()
