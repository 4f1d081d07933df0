"""4. Scaling: cost per event with a backlog of 1k, 10k and 100k events; worker memory.

For each database (SQLite, and PostgreSQL when one answers) a backlog of pending
``registered`` events is stored in bulk, growing 1k -> 10k -> 100k. At each size:

- enqueue: ``Outbox.enqueue`` one event at a time (one transaction each, as a request
  writes it), timed per call;
- delivery: ``Deliverer.run_once`` (claim a batch, send, record each answer, credits)
  with a transport that signs the body and answers 200 at once, so that only what can
  grow with the backlog is timed; one send at a time.

As many events are enqueued as delivered, so the backlog stays at its size. Then one
worker process (``run_worker(burst=True)``, the real HTTP client) delivers 100k events
to a minimal HTTP sink while its resident memory is sampled.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask

from flask_mmolove import MMOLove
from flask_mmolove.client import SendResult
from flask_mmolove.protocol import Outcome, sign_referral_body

from .databases import postgres_url, sqlite_url, table_prefix
from .events import fill, fresh_outbox, registered_events
from .processes import Child, python_env
from .results import Result
from .stats import median, percentile

NAME = "scaling"
TITLE = "Scaling with the backlog"
ANSWER = '{"ok":true,"referral_id":"ref_0","state":"registered"}'


class InstantClient:
    """Signs like the real client, answers like MMOLove, sends nothing."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def send_body(self, body: bytes, *, until: float | None = None) -> SendResult:
        sign_referral_body(self.secret, body)
        return SendResult(status=200, body=ANSWER, outcome=Outcome.ADVANCED)

    def close(self) -> None:
        return None


@contextmanager
def portal(url: str, prefix: str) -> Iterator[tuple[Flask, MMOLove]]:
    app = Flask("bench_scaling")
    app.config.update(
        MMOLOVE_SERVER_ID="bench",
        MMOLOVE_REFERRAL_SECRET="bench-secret",
        MMOLOVE_ENDPOINT="http://127.0.0.1:9/api/referral/events",
        MMOLOVE_DATABASE_URI=url,
        MMOLOVE_TABLE_PREFIX=prefix,
        MMOLOVE_DELIVERY="worker",
        MMOLOVE_CONCURRENCY=1,
    )
    ext = MMOLove()
    ext.init_app(app)
    try:
        yield app, ext
    finally:
        ext.shutdown(app)


def _token(i: int) -> str:
    return f"tok{i:08d}.bench-token-padding-to-a-realistic-length-0123456789abcdef"


def measure_costs(
    result: Result, backend: str, url: str, sizes: list[int], per_size: int, rounds: int
) -> None:
    table = result.table(
        f"{backend}: µs per event with a backlog (median of {rounds} rounds of {per_size} events)",
        ["backlog", "enqueue", "delivery (DB + signing)", "enqueue p90", "delivery per pass"],
    )
    prefix = table_prefix()
    with fresh_outbox(url, prefix) as outbox, portal(url, prefix) as (app, _ext):
        deliverer = app.extensions["mmolove"].deliverer
        deliverer.client = InstantClient("bench-secret")
        stored = 0
        serial = 10_000_000
        for size in sizes:
            while stored < size:
                n = min(20_000, size - stored)
                fill(outbox, registered_events(n, "bench", _token, start=stored))
                stored += n
            enqueue_us: list[float] = []
            enqueue_p90: list[float] = []
            deliver_us: list[float] = []
            pass_ms: list[float] = []
            for _ in range(rounds):
                fresh = registered_events(per_size, "bench", _token, start=serial)
                serial += per_size
                calls = []
                for e in fresh:
                    started = time.perf_counter()
                    outbox.enqueue(
                        event="registered",
                        token=e.token,
                        identity=e.identity,
                        server_event_id=e.server_event_id,
                        body=e.body,
                    )
                    calls.append((time.perf_counter() - started) * 1e6)
                enqueue_us.append(sum(calls) / len(calls))
                enqueue_p90.append(percentile(calls, 0.9))
                delivered = passes = 0
                started = time.perf_counter()
                while delivered < per_size:
                    report = deliverer.run_once()
                    if not report.delivered:
                        raise RuntimeError(f"nothing delivered from a backlog of {size}")
                    delivered += report.delivered
                    passes += 1
                elapsed = time.perf_counter() - started
                deliver_us.append(elapsed / delivered * 1e6)
                pass_ms.append(elapsed / passes * 1e3)
            row = {
                "enqueue_us": median(enqueue_us),
                "delivery_us": median(deliver_us),
            }
            table.add(
                f"{size:,}",
                row["enqueue_us"],
                row["delivery_us"],
                median(enqueue_p90),
                f"{median(pass_ms):.1f} ms",
            )
            for key, value in row.items():
                result.metric(f"{backend}.{size}.{key}", value)
    first, last = sizes[0], sizes[-1]
    for key in ("enqueue_us", "delivery_us"):
        ratio = (
            result.metrics[f"{backend}.{last}.{key}"] / result.metrics[f"{backend}.{first}.{key}"]
        )
        result.metric(f"{backend}.{key.removesuffix('_us')}_growth_ratio", ratio)


def measure_memory(result: Result, backend: str, url: str, events: int, max_seconds: float) -> None:
    prefix = table_prefix()
    with Child.module("bench.sink_proc") as sink, fresh_outbox(url, prefix) as outbox:
        endpoint = f"http://127.0.0.1:{sink.read()['port']}/api/referral/events"
        stored = 0
        while stored < events:
            n = min(20_000, events - stored)
            fill(outbox, registered_events(n, "bench", _token, start=stored))
            stored += n
        config: dict[str, Any] = {
            "server_id": "bench",
            "endpoint": endpoint,
            "database": url,
            "prefix": prefix,
            "sample_every": max(1, events // 20),
            "max_seconds": max_seconds,
        }
        env = python_env(BENCH_WORKER=json.dumps(config), BENCH_WORKER_SECRET="bench-secret")
        with Child.module("bench.worker_proc", env=env) as worker:
            ready = worker.read()
            worker.send("go")
            report = worker.read(timeout=max_seconds + 120)
    delivered = int(report["delivered"])
    if delivered == 0:
        raise RuntimeError("the worker delivered nothing")
    if delivered < events:
        result.notes.append(
            f"{backend}: the worker delivered {delivered:,} of {events:,} events within the "
            f"{max_seconds:g} s this part may take."
        )
    samples: list[tuple[int, float]] = [tuple(s) for s in report["rss"]]  # type: ignore[misc]

    def at(fraction: float) -> float:
        target = delivered * fraction
        return min(samples, key=lambda s: abs(s[0] - target))[1]

    early, middle, end = at(0.1), at(0.5), at(1.0)
    rate = delivered / (report["finished"] - report["started"])
    result.table(
        f"{backend}: resident memory of one worker delivering {delivered:,} events to a "
        f"minimal HTTP sink ({rate:,.0f} events/s)",
        ["ready", "after 10%", "after 50%", "after 100%", "growth 10% → 100%"],
    ).add(
        f"{ready['rss_mb']:.1f} MiB",
        f"{early:.1f} MiB",
        f"{middle:.1f} MiB",
        f"{end:.1f} MiB",
        f"{end - early:+.1f} MiB",
    )
    result.metric(f"{backend}.memory.ready_mb", ready["rss_mb"])
    result.metric(f"{backend}.memory.early_mb", early)
    result.metric(f"{backend}.memory.end_mb", end)
    result.metric(f"{backend}.memory.growth_mb", end - early)
    result.metric(f"{backend}.memory.events_per_s", rate)
    result.metric(f"{backend}.memory.delivered", delivered)


def run(quick: bool) -> Result:
    sizes = [200, 1000] if quick else [1_000, 10_000, 100_000]
    per_size, rounds = (50, 2) if quick else (300, 3)
    memory_events, memory_seconds = (2_000, 60.0) if quick else (100_000, 150.0)
    result = Result(
        NAME,
        TITLE,
        quick,
        params={"sizes": sizes, "per_size": per_size, "rounds": rounds, "memory": memory_events},
    )
    backends: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="mmolove-bench-") as workdir:
        backends["sqlite"] = sqlite_url(workdir)
        pg = postgres_url()
        if pg is not None:
            backends["postgresql"] = pg
        else:
            result.notes.append("PostgreSQL not reachable: its rows are missing")
        for backend, url in backends.items():
            measure_costs(result, backend, url, sizes, per_size, rounds)
        for backend, url in backends.items():
            memory_url = url if backend != "sqlite" else sqlite_url(workdir, "memory.sqlite3")
            measure_memory(result, backend, memory_url, memory_events, memory_seconds)
    m = result.metrics
    growth = max(m[f"{b}.{k}_growth_ratio"] for b in backends for k in ("enqueue", "delivery"))
    result.goal(
        f"cost per event flat from {sizes[0]:,} to {sizes[-1]:,} events of backlog",
        growth < 1.5,
        ", ".join(
            f"{b}: enqueue x{m[f'{b}.enqueue_growth_ratio']:.2f}, delivery "
            f"x{m[f'{b}.delivery_growth_ratio']:.2f}"
            for b in backends
        ),
    )
    memory = max(m[f"{b}.memory.growth_mb"] for b in backends)
    delivered = min(int(m[f"{b}.memory.delivered"]) for b in backends)
    result.goal(
        f"worker memory flat over {memory_events:,} events",
        memory < 10 and delivered == memory_events,
        ", ".join(
            f"{b}: {m[f'{b}.memory.growth_mb']:+.1f} MiB over "
            f"{int(m[f'{b}.memory.delivered']):,} events"
            for b in backends
        ),
    )
    return result
