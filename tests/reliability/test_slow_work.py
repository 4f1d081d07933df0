"""Slow work under a lease, with two real ``flask mmolove worker`` processes on one SQLite
outbox and default settings (issue 15, proofs 1 and 2).

1. Receivers of ``referrer_credited`` taking 1.5 s, 50 referees: 50 credits, none twice.
   Claimed many at a time under one lease, the tail of a batch outlived its lease and
   the other deliverer announced it again while the first was still at it.
2. MMOLove answering every request in 5.5 s, more events than one pass sends within the
   lease (batch 50, concurrency 4): everything delivered, each event accepted once, about
   one POST per event, in bounded time. Without renewal the two deliverers re-claimed
   each other's batches over and over and nothing was ever recorded.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from reliability_support import (
    assert_exactly_once,
    enqueue_pairs,
    journal,
    open_outbox,
    posts_per_key,
    process_env,
    record_figures,
    start_worker,
    stop_process,
)

from flask_mmolove.outbox import Outbox
from flask_mmolove.settings import DEFAULTS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

WORKERS = 2
#: The defaults these proofs run under: checked against flask_mmolove.settings, not set.
LEASE, BATCH, CONCURRENCY = 60.0, 50, 4

RECEIVER_SECONDS = 1.5
REFEREES = 50
#: Unannounced credits are announced within this many seconds of the workers starting.
CREDITS_BOUND = 150.0

MMOLOVE_SECONDS = 5.5
#: More than a batch: one worker claims a full batch, whose sends (BATCH / CONCURRENCY
#: rounds of MMOLOVE_SECONDS) take longer than the lease.
EVENTS = 60
#: Everything is delivered within this many seconds of the workers starting.
DELIVERY_BOUND = 110.0


def _poll(predicate: Callable[[], bool], timeout: float) -> float | None:
    """Wait until ``predicate()``, asking twice a second: the seconds it took, or None
    if ``timeout`` passed first (the figures are recorded either way, then asserted)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started >= timeout:
            return None
        time.sleep(0.5)
    return time.monotonic() - started


def _delivered_per_worker(outputs: list[str]) -> list[int]:
    return [
        int(m.group(1)) if (m := re.search(r"stopped: delivered (\d+)", out)) else -1
        for out in outputs
    ]


def test_the_defaults_these_proofs_run_under() -> None:
    assert (DEFAULTS["MMOLOVE_LEASE"], DEFAULTS["MMOLOVE_BATCH_SIZE"]) == (LEASE, BATCH)
    assert DEFAULTS["MMOLOVE_CONCURRENCY"] == CONCURRENCY
    # MMOLove's slow answer is still an answer, not a timeout.
    assert DEFAULTS["MMOLOVE_READ_TIMEOUT"] > MMOLOVE_SECONDS


def _duplicate_posts(sandbox: Any) -> int:
    return sum(n - 1 for n in posts_per_key(sandbox).values())


def _outbox(tmp_path: Path) -> tuple[str, Outbox]:
    uri = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    return uri, open_outbox(uri)


def test_slow_receivers_credit_each_referee_once(mmolove_sandbox: Any, tmp_path: Path) -> None:
    uri, outbox = _outbox(tmp_path)
    try:
        pairs = enqueue_pairs(outbox, mmolove_sandbox, REFEREES, prefix="s")
        env = process_env(
            mmolove_sandbox,
            tmp_path,
            MMOLOVE_DATABASE_URI=uri,
            RECEIVER_SECONDS=RECEIVER_SECONDS,
        )
        credited_lines = tmp_path / "journal.txt"

        def all_credits_recorded() -> bool:
            stats = outbox.stats()
            announced = {x[2] for x in journal(credited_lines) if x[1] == "credited"}
            return (
                stats.delivered == 2 * REFEREES
                and stats.credits_unnotified == 0
                and len(announced) == REFEREES
            )

        workers = [start_worker(env, tmp_path) for _ in range(WORKERS)]
        try:
            seconds = _poll(all_credits_recorded, CREDITS_BOUND)
            # A second announcement still under way ends within a receiver's time.
            time.sleep(2 * RECEIVER_SECONDS + 1)
        finally:
            outputs = [stop_process(worker) for worker in workers]
        per_identity = Counter(x[2] for x in journal(credited_lines) if x[1] == "credited")
        twice = sorted(identity for identity, n in per_identity.items() if n > 1)
        record_figures(
            "15.1 slow receivers",
            workers=WORKERS,
            receiver_s=RECEIVER_SECONDS,
            referees=REFEREES,
            credits=len(per_identity),
            credited_twice=len(twice),
            credit_signals=sum(per_identity.values()),
            posts=len(mmolove_sandbox.events),
            duplicate_posts=_duplicate_posts(mmolove_sandbox),
            seconds=seconds,
        )
        assert seconds is not None, f"credits not all announced within {CREDITS_BOUND} s"
        for worker, output in zip(workers, outputs, strict=True):
            assert worker.returncode == 0, output
        assert twice == [], f"{len(twice)} referees credited twice: {twice}"
        assert sorted(per_identity) == sorted(identity for identity, _ in pairs)
        duplicates = assert_exactly_once(mmolove_sandbox, pairs, ["registered", "qualified"])
        assert duplicates == 0
        assert sum(_delivered_per_worker(outputs)) == 2 * REFEREES
    finally:
        outbox.dispose()


def test_slow_mmolove_everything_delivered_about_one_post_each(
    mmolove_sandbox: Any, tmp_path: Path
) -> None:
    # Nothing in this proof would exceed the lease if a pass were shorter than it.
    assert -(-BATCH // CONCURRENCY) * MMOLOVE_SECONDS > LEASE
    uri, outbox = _outbox(tmp_path)
    try:
        # ``registered`` only: every event is due at once (a ``qualified`` waits for its
        # token's ``registered``), so the first worker to claim takes a full batch.
        pairs = enqueue_pairs(outbox, mmolove_sandbox, EVENTS, qualified=False, prefix="m")
        # Every request MMOLove receives in this test is answered 5.5 s late.
        mmolove_sandbox.delay_next(100 * EVENTS, MMOLOVE_SECONDS)
        env = process_env(mmolove_sandbox, tmp_path, MMOLOVE_DATABASE_URI=uri)

        def all_delivered() -> bool:
            return (
                mmolove_sandbox.accepted_count("registered") == EVENTS
                and outbox.stats().delivered == EVENTS
            )

        workers = [start_worker(env, tmp_path) for _ in range(WORKERS)]
        try:
            seconds = _poll(all_delivered, DELIVERY_BOUND)
            # Before the workers stop (a stopping worker records the answers it has).
            delivered_in_time = outbox.stats().delivered
            posts_in_time = len(mmolove_sandbox.events)
            time.sleep(1.0)  # a late duplicate POST would arrive now
        finally:
            outputs = [stop_process(worker) for worker in workers]
            mmolove_sandbox.clear_faults()
        posts = len(mmolove_sandbox.events)
        stats = outbox.stats()
        per_worker = _delivered_per_worker(outputs)
        record_figures(
            "15.2 slow MMOLove",
            workers=WORKERS,
            mmolove_s=MMOLOVE_SECONDS,
            events=EVENTS,
            delivered=delivered_in_time,
            posts=posts_in_time,
            duplicate_posts=_duplicate_posts(mmolove_sandbox),
            per_worker=str(sorted(per_worker)),
            seconds=seconds,
        )
        assert seconds is not None, (
            f"{delivered_in_time} of {EVENTS} delivered in {DELIVERY_BOUND} s"
        )
        for worker, output in zip(workers, outputs, strict=True):
            assert worker.returncode == 0, output
        assert_exactly_once(mmolove_sandbox, pairs, ["registered"])
        assert posts <= EVENTS * 1.1, f"{posts} POSTs for {EVENTS} events"
        assert (stats.delivered, stats.pending, stats.in_flight, stats.dead) == (EVENTS, 0, 0, 0)
        assert sum(per_worker) == EVENTS
        lines = journal(tmp_path / "journal.txt")
        registered = Counter(x[2] for x in lines if x[1] == "registered")
        assert sorted(registered) == sorted(identity for identity, _ in pairs)
        assert set(registered.values()) == {1}
    finally:
        outbox.dispose()
