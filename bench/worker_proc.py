"""A delivery worker process for the benchmarks: ``flask mmolove worker --burst``, timed.

Run by the benchmarks, not by people. Configuration comes as JSON in
``BENCH_WORKER`` (the secret in ``BENCH_WORKER_SECRET``). It builds a portal app in
``worker`` mode, prints ``{"ready": ...}``, waits for ``go`` on stdin, delivers until
nothing is due (``run_worker(burst=True)``, the CLI's loop) and prints what it did:
events, wall and CPU time, and its resident memory sampled every ``sample_every``
delivered events. ``max_seconds`` bounds the run. It exits when stdin closes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from flask import Flask

from flask_mmolove import MMOLove
from flask_mmolove.delivery import PassReport, run_worker

from .processes import cpu_seconds, rss_mb


def build(config: dict[str, Any]) -> tuple[Flask, MMOLove]:
    app = Flask("bench_worker")
    app.config.update(
        MMOLOVE_SERVER_ID=config["server_id"],
        MMOLOVE_REFERRAL_SECRET=os.environ["BENCH_WORKER_SECRET"],
        MMOLOVE_ENDPOINT=config["endpoint"],
        MMOLOVE_DATABASE_URI=config["database"],
        MMOLOVE_TABLE_PREFIX=config.get("prefix", "mmolove_"),
        MMOLOVE_DELIVERY="worker",
        **{f"MMOLOVE_{key.upper()}": value for key, value in config.get("settings", {}).items()},
    )
    ext = MMOLove()
    ext.init_app(app)
    return app, ext


def main() -> int:
    config = json.loads(os.environ["BENCH_WORKER"])
    app, _ext = build(config)
    deliverer = app.extensions["mmolove"].deliverer
    sample_every = int(config.get("sample_every", 0))
    print(json.dumps({"ready": True, "rss_mb": rss_mb()}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return 0
    samples: list[tuple[int, float]] = [(0, rss_mb())]
    delivered = 0
    next_sample = sample_every

    def on_pass(report: PassReport) -> None:
        nonlocal delivered, next_sample
        delivered += report.delivered
        if sample_every and delivered >= next_sample:
            samples.append((delivered, rss_mb()))
            next_sample += sample_every

    limit = float(config.get("max_seconds", 0))
    deadline = time.monotonic() + limit if limit else None

    def should_stop() -> bool:
        return deadline is not None and time.monotonic() > deadline

    cpu0, started = cpu_seconds(), time.time()
    total = run_worker(deliverer, burst=True, on_pass=on_pass, should_stop=should_stop)
    finished = time.time()
    samples.append((delivered, rss_mb()))
    print(
        json.dumps(
            {
                "claimed": total.claimed,
                "delivered": total.delivered,
                "retried": total.retried,
                "dead": total.dead,
                "started": started,
                "finished": finished,
                "cpu_s": cpu_seconds() - cpu0,
                "rss": samples,
            }
        ),
        flush=True,
    )
    sys.stdin.read()
    _ext.shutdown(app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
