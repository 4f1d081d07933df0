"""Item 9: four ``flask mmolove worker`` processes on one database (PostgreSQL, and a
SQLite file), thousands of events written while they run: each accepted exactly once,
and no event POSTed twice."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from reliability_support import (
    assert_exactly_once,
    enqueue_pairs,
    journal,
    open_outbox,
    process_env,
    record_figures,
    start_worker,
    stop_process,
)
from support import wait_for

WORKERS = 4
REFEREES = 1000  # registered + qualified each: 2000 events per database


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_four_workers_one_database_each_event_once(
    mmolove_sandbox: Any, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    prefix = "mmolove_"
    if backend == "postgresql":
        uri = request.getfixturevalue("pg_uri")
        prefix = request.getfixturevalue("table_prefix")
    else:
        uri = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    outbox = open_outbox(uri, prefix)
    try:
        run_workers(mmolove_sandbox, tmp_path, backend, uri, prefix, outbox)
    finally:
        if backend == "postgresql":
            outbox.drop_all()
        outbox.dispose()


def run_workers(
    mmolove_sandbox: Any, tmp_path: Path, backend: str, uri: str, prefix: str, outbox: Any
) -> None:
    env = process_env(
        mmolove_sandbox,
        tmp_path,
        MMOLOVE_DATABASE_URI=uri,
        MMOLOVE_TABLE_PREFIX=prefix,
        MMOLOVE_POLL_INTERVAL=0.1,
        MMOLOVE_RETRY_BASE=0.05,
        MMOLOVE_RETRY_CAP=0.2,
    )
    workers = [start_worker(env, tmp_path) for _ in range(WORKERS)]
    outputs: list[str] = []
    try:
        started = time.monotonic()
        # Written while the workers claim: enqueue and claim contend for the database.
        pairs = enqueue_pairs(outbox, mmolove_sandbox, REFEREES, prefix="w")
        enqueued = time.monotonic() - started
        wait_for(
            lambda: mmolove_sandbox.accepted_count() >= 2 * REFEREES,
            120,
            "every event accepted",
        )
        elapsed = time.monotonic() - started
        wait_for(
            lambda: len(journal(tmp_path / "journal.txt")) >= 2 * REFEREES,
            30,
            "every signal",
        )
        time.sleep(0.5)  # a late duplicate would arrive now
    finally:
        outputs = [stop_process(worker) for worker in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output
    duplicates = assert_exactly_once(mmolove_sandbox, pairs, ["registered", "qualified"])
    posts = len(mmolove_sandbox.events)
    refused = [r for r in mmolove_sandbox.events if r.status != 200]
    assert refused == []
    assert duplicates == 0, f"{duplicates} duplicate POSTs"
    assert posts == 2 * REFEREES
    stats = outbox.stats()
    assert (stats.delivered, stats.pending, stats.in_flight, stats.dead) == (
        2 * REFEREES,
        0,
        0,
        0,
    )
    credited = [x[2] for x in journal(tmp_path / "journal.txt") if x[1] == "credited"]
    assert sorted(credited) == sorted(identity for identity, _ in pairs)
    per_worker = [
        int(m.group(1)) if (m := re.search(r"stopped: delivered (\d+)", out)) else -1
        for out in outputs
    ]
    # Every worker took part, and together they delivered each event once.
    assert sum(per_worker) == 2 * REFEREES
    assert min(per_worker) > 0
    record_figures(
        f"9 many workers ({backend})",
        workers=WORKERS,
        events=2 * REFEREES,
        posts=posts,
        duplicates=duplicates,
        per_worker=str(sorted(per_worker)),
        enqueue_s=enqueued,
        all_accepted_s=elapsed,
        events_per_s=2 * REFEREES / elapsed,
    )
