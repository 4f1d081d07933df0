"""Item 3: a ``flask mmolove worker`` is killed with SIGKILL while it holds claimed
events, some of them mid-send; another worker delivers them all once the lease has
expired, each accepted exactly once and each referrer credited once."""

from __future__ import annotations

import signal
import time
from collections import Counter
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

LEASE = 2.0


@pytest.mark.slow
def test_sigkilled_worker_events_are_delivered_after_the_lease(
    mmolove_sandbox: Any, tmp_path: Path
) -> None:
    referees = 8
    uri = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    outbox = open_outbox(uri)
    pairs = enqueue_pairs(outbox, mmolove_sandbox, referees)
    env = process_env(
        mmolove_sandbox,
        tmp_path,
        MMOLOVE_DATABASE_URI=uri,
        MMOLOVE_LEASE=LEASE,
        # An attempt's deadline (connect + read) must fit inside the lease.
        MMOLOVE_CONNECT_TIMEOUT=0.5,
        MMOLOVE_READ_TIMEOUT=1.0,
        MMOLOVE_CONCURRENCY=4,
        MMOLOVE_POLL_INTERVAL=0.1,
        MMOLOVE_RETRY_BASE=0.05,
        MMOLOVE_RETRY_CAP=0.2,
    )
    # MMOLove is slow: the first worker is mid-send on 4 events when it dies.
    mmolove_sandbox.delay_next(4, 60)
    first = start_worker(env, tmp_path)
    try:
        wait_for(lambda: not mmolove_sandbox.state.faults, 20, "4 sends held by MMOLove")
        held = outbox.stats()
        leases = [e.lease_until for e in outbox.list_events(limit=100) if e.lease_owner]
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed_at = time.time()
    finally:
        output = stop_process(first)
    assert first.returncode == -signal.SIGKILL, output
    # It died holding every registered (4 mid-send, 4 claimed and unsent); the
    # qualified events wait for their registered.
    assert held.in_flight == referees
    assert mmolove_sandbox.accepted_count() == 0
    lease_until = max(leases)
    # The requests it had sent reach MMOLove after all (and are written there).
    mmolove_sandbox.clear_faults()
    wait_for(lambda: mmolove_sandbox.accepted_count("registered") == 4, 10, "held sends")

    second = start_worker(env, tmp_path)
    try:
        wait_for(lambda: mmolove_sandbox.accepted_count() == 2 * referees, 30, "the second worker")
        recovered_at = time.time()
        wait_for(
            lambda: (
                len([x for x in journal(tmp_path / "journal.txt") if x[1] == "credited"])
                >= referees
            ),
            10,
            "every credit",
        )
        time.sleep(0.3)
    finally:
        output = stop_process(second)
    assert second.returncode == 0, output

    duplicates = assert_exactly_once(mmolove_sandbox, pairs, ["registered", "qualified"])
    # Only what was mid-send at the kill can have been sent twice.
    assert duplicates <= 4
    # Nothing was sent again before the dead worker's lease ran out.
    resent = [r for r in mmolove_sandbox.events if r.fault is None]
    assert min(r.time for r in resent) >= lease_until - 0.01
    stats = outbox.stats()
    assert (stats.delivered, stats.pending, stats.dead) == (2 * referees, 0, 0)
    credited = Counter(x[2] for x in journal(tmp_path / "journal.txt") if x[1] == "credited")
    assert credited == Counter({identity: 1 for identity, _ in pairs})
    outcomes = Counter(e.outcome for e in outbox.list_events(limit=100))
    record_figures(
        "3 crash (SIGKILL)",
        events=2 * referees,
        held_at_kill=held.in_flight,
        mid_send_at_kill=4,
        lease_s=LEASE,
        recovered_after_kill_s=recovered_at - killed_at,
        posts=len(mmolove_sandbox.events),
        duplicates=duplicates,
        outcome_duplicate=outcomes["duplicate"],
    )
    outbox.dispose()
