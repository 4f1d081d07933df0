"""Hosts with clocks 90 s apart on one PostgreSQL outbox (issue 15, proof 3): two real
``flask mmolove worker`` processes, default settings (lease 60 s), one on a host whose
wall clock is 90 s behind (``skewed``: the wall clock shifted, the monotonic clock left
true), the other on the true clock, which is also the database's. No event is ever in
MMOLove's hands twice at once, each is accepted once, and no referee is credited twice.

Why this arrangement: with leases written by each host's own clock, the host *behind*
is the one that breaks them. It writes ``lease_until`` = its now + 60 s, already 30 s in
the past on the other host's clock, which takes the work over while the first is still
at it. (The host ahead writes leases the one behind respects for longer than it
should: harmless.) So in each test the host behind starts first and holds the work,
and the other starts while it does:

- events: MMOLove answers slowly, so the host behind is many seconds into sending its
  claimed events when the other starts;
- credits: the host behind alone delivers and announces (a receiver takes 2 s each);
  the other, whose receivers are instant, starts meanwhile, announces every credit
  nobody holds at once, and is left with only the one the host behind is announcing.
  (Credits are claimed one at a time, oldest due first: a host takes a live credit of
  another only when nothing older is free, so the event race above never shows it.)

Due times stay the hosts' own (see ``Outbox._lease``): an event the test wrote at true
time would be due for the host behind only 90 s later, and the host on the true clock
would take all the work. So the events are written by an outbox whose clock is shifted
like the behind host's, as if that host's portal had written them: due for both hosts.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from reliability_support import (
    assert_exactly_once,
    concurrent_posts,
    enqueue_pairs,
    journal,
    open_outbox,
    posts_per_key,
    process_env,
    record_figures,
    skewed,
    start_worker,
    stop_process,
)
from support import missing

from flask_mmolove.outbox import PENDING, Outbox, make_engine
from flask_mmolove.settings import DEFAULTS

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(180)]

#: The host behind is this many seconds behind the true clock (and the database's).
SKEW = 90.0
#: The default lease, checked against flask_mmolove.settings, not set: shorter than SKEW.
LEASE = 60.0

#: Events: MMOLove's answer to every request takes this long, so a pass of the host
#: behind lasts REFEREES / concurrency rounds of it.
REFEREES = 24
MMOLOVE_SECONDS = 3.0
RECEIVER_SECONDS = 1.0
#: Credits: the host behind announces CREDITS one after another, each taking this long.
CREDITS = 8
SLOW_RECEIVER_SECONDS = 2.0
#: Everything is delivered and announced within this many seconds of the first worker
#: starting.
BOUND = 100.0


def test_the_defaults_this_proof_runs_under() -> None:
    assert DEFAULTS["MMOLOVE_LEASE"] == LEASE < SKEW
    # MMOLove's slow answer is still an answer, not a timeout.
    assert DEFAULTS["MMOLOVE_READ_TIMEOUT"] > MMOLOVE_SECONDS


@dataclass
class Hosts:
    """The outbox as the test reads it, the behind host's portal writing to it, and
    the two hosts' worker environments."""

    outbox: Outbox
    writer: Outbox
    true_env: dict[str, str]
    behind_env: dict[str, str]
    journal: Path


@pytest.fixture
def hosts(mmolove_sandbox: Any, pg_schema_uri: str, tmp_path: Path) -> Iterator[Hosts]:
    env = process_env(mmolove_sandbox, tmp_path, MMOLOVE_DATABASE_URI=pg_schema_uri)
    try:
        behind_env = skewed(env, -SKEW)
    except RuntimeError as exc:
        missing(f"cannot run a process on a skewed clock here: {exc}")
    outbox = open_outbox(pg_schema_uri)
    # The portal of the host behind: due times by its clock (see the module docstring).
    writer = Outbox(make_engine(pg_schema_uri), clock=lambda: time.time() - SKEW)
    try:
        yield Hosts(outbox, writer, env, behind_env, tmp_path / "journal.txt")
    finally:
        mmolove_sandbox.clear_faults()
        writer.dispose()
        outbox.dispose()


def _with(env: dict[str, str], receiver_seconds: float) -> dict[str, str]:
    return {**env, "PORTAL_RECEIVER_SECONDS": str(receiver_seconds)}


def _poll(predicate: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``predicate()`` held, asking twice a second; None after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started >= timeout:
            return None
        time.sleep(0.5)
    return time.monotonic() - started


def _held_by(outbox: Outbox, table: sa.Table, pid: int, stamp: str) -> list[float]:
    """``stamp`` (a time by the writer's clock) of the rows of ``table`` the worker
    process ``pid`` holds claimed (lease owner ``host:pid:nonce``)."""
    query = sa.select(table.c[stamp]).where(table.c.lease_owner.like(f"%:{pid}:%"))
    if table is outbox.events:
        query = query.where(table.c.state == PENDING)
    with outbox.engine.connect() as conn:
        return [float(t) for t in conn.scalars(query)]


def _on_the_clock_behind(stamps: list[float]) -> bool:
    return bool(stamps) and all(abs(time.time() - SKEW - t) < 15 for t in stamps)


def _start_and_wait_for_banner(env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[str], str]:
    """A worker, once it has started its loop: its first line is its banner."""
    worker = start_worker(env, cwd)
    assert worker.stdout is not None
    return worker, worker.stdout.readline()


def _delivered(output: str) -> int:
    found = re.search(r"stopped: delivered (\d+)", output)
    return int(found.group(1)) if found else -1


@dataclass
class Run:
    #: Of the host behind, then of the one on the true clock.
    pids: list[int]
    outputs: list[str]
    returncodes: list[int | None]
    #: Claims the host behind held when the other host's worker had started.
    overlap: int
    #: Seconds from the first worker's start until everything was done, or None.
    seconds: float | None


def _race(
    hosts: Hosts,
    *,
    referees: int,
    behind_env: dict[str, str],
    true_env: dict[str, str],
    table: sa.Table,
    stamp: str,
) -> Run:
    """Start the host behind; once it holds rows of ``table``, the host on the true
    clock; wait until all is delivered and announced; stop both."""
    outbox = hosts.outbox

    def all_done() -> bool:
        stats = outbox.stats()
        announced = {x[2] for x in journal(hosts.journal) if x[1] == "credited"}
        return (
            stats.delivered == 2 * referees
            and stats.credits_unnotified == 0
            and len(announced) == referees
        )

    started = time.monotonic()
    workers = [start_worker(behind_env, hosts.journal.parent)]
    banner = ""
    try:
        behind = workers[0]
        held = _poll(lambda: bool(_held_by(outbox, table, behind.pid, stamp)), 30.0)
        assert held is not None, "the worker behind never claimed: " + stop_process(behind)
        # Its clock is the skewed one: what it wrote is stamped 90 s in the past.
        stamps = _held_by(outbox, table, behind.pid, stamp)
        assert _on_the_clock_behind(stamps), stamps
        true, banner = _start_and_wait_for_banner(true_env, hosts.journal.parent)
        workers.append(true)
        # The worker on the true clock is running while the one behind still holds
        # its claims: otherwise this proves nothing.
        overlap = len(_held_by(outbox, table, behind.pid, stamp))
        done = _poll(all_done, BOUND - (time.monotonic() - started))
        seconds = None if done is None else time.monotonic() - started
        # A second announcement still under way ends within a receiver's time.
        time.sleep(2 * SLOW_RECEIVER_SECONDS + 1)
    finally:
        outputs = [stop_process(worker) for worker in workers]
    outputs[1] = banner + outputs[1]
    return Run([w.pid for w in workers], outputs, [w.returncode for w in workers], overlap, seconds)


def _credits(hosts: Hosts) -> tuple[list[list[str]], list[str]]:
    """The ``credited`` journal lines, and the referees credited more than once."""
    credited = [x for x in journal(hosts.journal) if x[1] == "credited"]
    per_identity = Counter(x[2] for x in credited)
    return credited, sorted(identity for identity, n in per_identity.items() if n > 1)


def _check(run: Run, sandbox: Any, pairs: list[tuple[str, str]], hosts: Hosts) -> None:
    credited, twice = _credits(hosts)
    assert run.outputs[1].startswith("mmolove worker"), run.outputs[1]
    assert run.overlap > 0, "the worker behind finished before the other started"
    assert run.seconds is not None, f"not all delivered and announced within {BOUND} s"
    for returncode, output in zip(run.returncodes, run.outputs, strict=True):
        assert returncode == 0, output
    at_once = concurrent_posts(sandbox)
    assert at_once == [], f"{len(at_once)} events posted twice at once: {at_once[:3]}"
    assert twice == [], f"{len(twice)} referees credited twice: {twice}"
    assert sorted(x[2] for x in credited) == sorted(identity for identity, _ in pairs)
    assert assert_exactly_once(sandbox, pairs, ["registered", "qualified"]) == 0
    assert sum(_delivered(output) for output in run.outputs) == 2 * len(pairs)


def _figures(name: str, run: Run, sandbox: Any, hosts: Hosts, **more: Any) -> None:
    credited, twice = _credits(hosts)
    by_pid = Counter(int(x[0]) for x in credited)
    record_figures(
        name,
        skew_s=SKEW,
        lease_s=LEASE,
        **more,
        held_when_other_started=run.overlap,
        posts=len(sandbox.events),
        duplicate_posts=sum(n - 1 for n in posts_per_key(sandbox).values()),
        concurrent_posts=len(concurrent_posts(sandbox)),
        credits=len({x[2] for x in credited}),
        credited_twice=len(twice),
        credit_signals=len(credited),
        delivered_behind_true="/".join(str(_delivered(out)) for out in run.outputs),
        credits_behind_true="/".join(str(by_pid[pid]) for pid in run.pids),
        seconds=run.seconds,
    )


def test_an_event_the_host_behind_is_sending_is_not_sent_again(
    mmolove_sandbox: Any, hosts: Hosts
) -> None:
    pairs = enqueue_pairs(hosts.writer, mmolove_sandbox, REFEREES, prefix="e")
    mmolove_sandbox.delay_next(100 * REFEREES, MMOLOVE_SECONDS)
    run = _race(
        hosts,
        referees=REFEREES,
        behind_env=_with(hosts.behind_env, RECEIVER_SECONDS),
        true_env=_with(hosts.true_env, RECEIVER_SECONDS),
        table=hosts.outbox.events,
        stamp="last_attempt_at",
    )
    _figures(
        "15.3 skewed clocks: events",
        run,
        mmolove_sandbox,
        hosts,
        referees=REFEREES,
        mmolove_s=MMOLOVE_SECONDS,
        receiver_s=RECEIVER_SECONDS,
    )
    _check(run, mmolove_sandbox, pairs, hosts)


def test_a_credit_the_host_behind_is_announcing_is_not_announced_again(
    mmolove_sandbox: Any, hosts: Hosts
) -> None:
    pairs = enqueue_pairs(hosts.writer, mmolove_sandbox, CREDITS, prefix="c")
    run = _race(
        hosts,
        referees=CREDITS,
        behind_env=_with(hosts.behind_env, SLOW_RECEIVER_SECONDS),
        true_env=_with(hosts.true_env, 0.0),
        table=hosts.outbox.credits,
        stamp="created_at",
    )
    _figures(
        "15.3 skewed clocks: credits",
        run,
        mmolove_sandbox,
        hosts,
        referees=CREDITS,
        receiver_s_behind_true=f"{SLOW_RECEIVER_SECONDS:g}/0",
    )
    _check(run, mmolove_sandbox, pairs, hosts)
