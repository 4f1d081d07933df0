"""Claiming events: leases go oldest due first, a live lease is never handed out twice
(across threads and processes alike), an expired one comes back, one token's events go
strictly in order, and claiming and settling never read every waiting event.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from outbox_support import T0, _accept, _enqueue, _prefix
from support import FakeClock

from flask_mmolove.outbox import PENDING, Ending, Outbox, make_engine


def test_claim_leases_oldest_due_first(outbox: Outbox, clock: FakeClock) -> None:
    ids = []
    for n in range(3):
        ids.append(_enqueue(outbox, n))
        clock.advance(1)
    first = outbox.claim("a", limit=2, lease=30)
    assert [e.id for e in first] == ids[:2]
    assert all(e.attempts == 1 and e.lease_owner == "a" for e in first)
    assert all(e.lease_until == clock.now + 30 and e.last_attempt_at == clock.now for e in first)
    # A live lease is never handed out twice.
    assert [e.id for e in outbox.claim("b", limit=10, lease=30)] == [ids[2]]
    assert outbox.claim("c", limit=10, lease=30) == []
    clock.advance(29.9)
    assert outbox.claim("c", limit=10, lease=30) == []
    # "a" died: its leases expire and the events come back, one attempt more.
    clock.advance(0.1)
    again = outbox.claim("c", limit=10, lease=30)
    assert [e.id for e in again] == ids
    assert [e.attempts for e in again] == [2, 2, 2]
    assert {e.lease_owner for e in again} == {"c"}


def test_claim_waits_for_next_attempt_and_honours_ids(outbox: Outbox, clock: FakeClock) -> None:
    a, b = _enqueue(outbox, 1), _enqueue(outbox, 2)
    assert [e.id for e in outbox.claim("x", limit=5, lease=10, ids=[b])] == [b]
    assert outbox.claim("x", limit=5, lease=10, ids=[]) == []
    assert outbox.reschedule(b, "x", at=T0 + 60, status=503, reason="server_error", error="")
    assert [e.id for e in outbox.claim("y", limit=5, lease=100, ids=[a, b])] == [a]
    clock.advance(59)
    assert outbox.claim("y", limit=5, lease=10) == []
    clock.advance(1)
    assert [e.id for e in outbox.claim("y", limit=5, lease=10)] == [b]


def test_claim_checks_its_arguments(outbox: Outbox) -> None:
    with pytest.raises(ValueError, match="limit"):
        outbox.claim("a", limit=0, lease=10)
    with pytest.raises(ValueError, match="lease"):
        outbox.claim("a", limit=1, lease=0)
    with pytest.raises(ValueError, match="owner"):
        outbox.claim(" ", limit=1, lease=10)


def test_one_tokens_events_go_in_order(outbox: Outbox, clock: FakeClock) -> None:
    def add(event: str, identity: str = "p1") -> int:
        return outbox.enqueue(
            event=event,
            token="shared-token",
            identity=identity,
            server_event_id=f"{event}-{identity}",
            body=b"{}",
        )

    registered, qualified = add("registered"), add("qualified")
    other = _enqueue(outbox, 9, identity="p2")
    claimed = [ev.id for ev in outbox.claim("w", limit=10, lease=30)]
    assert claimed == [registered, other]
    assert _accept(outbox, other, "w")
    # Retrying registered later keeps qualified waiting behind it.
    assert outbox.reschedule(
        registered, "w", at=clock() + 60, status=503, reason="server_error", error=""
    )
    assert outbox.claim("w2", limit=10, lease=30) == []
    assert outbox.next_due_at() == pytest.approx(clock() + 60)
    clock.advance(60)
    [again] = outbox.claim("w3", limit=10, lease=30)
    assert again.id == registered
    assert _accept(outbox, registered, "w3")
    assert [ev.id for ev in outbox.claim("w4", limit=10, lease=30)] == [qualified]


_CLAIMER = textwrap.dedent(
    """
    import json, sys
    from flask_mmolove.outbox import Outbox, make_engine

    url, prefix, owner = sys.argv[1:4]
    box = Outbox(make_engine(url), table_prefix=prefix)
    box.create_all()
    print("ready", flush=True)
    sys.stdin.readline()
    claimed = []
    while batch := box.claim(owner, limit=3, lease=300):
        claimed.extend(event.id for event in batch)
    box.dispose()
    print(json.dumps(claimed), flush=True)
    """
)


def test_threads_and_processes_never_share_a_live_lease(db_url: str) -> None:
    rows, threads_n, processes_n = 600, 4, 3
    engine = make_engine(db_url)
    box = Outbox(engine, table_prefix=_prefix())
    box.create_all()
    try:
        with engine.begin() as conn:
            conn.execute(
                box.events.insert(),
                [
                    {
                        "event": "registered",
                        "token": f"tok-{n}",
                        "identity": f"p-{n}",
                        "server_event_id": f"reg-{n}",
                        "body": b"{}",
                        "state": PENDING,
                        "attempts": 0,
                        "created_at": 0.0,
                        "next_attempt_at": float(n % 7),
                    }
                    for n in range(rows)
                ],
            )
            all_ids = set(conn.scalars(sa.select(box.events.c.id)))

        children = [
            subprocess.Popen(
                [sys.executable, "-c", _CLAIMER, db_url, box.table_prefix, f"process-{n}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in range(processes_n)
        ]
        claimed: dict[str, list[int]] = {}
        errors: list[BaseException] = []
        go = threading.Event()

        def claim(owner: str) -> None:
            mine: list[int] = []
            try:
                go.wait()
                while batch := box.claim(owner, limit=3, lease=300):
                    mine.extend(event.id for event in batch)
            except BaseException as exc:
                errors.append(exc)
            claimed[owner] = mine

        workers = [threading.Thread(target=claim, args=(f"thread-{n}",)) for n in range(threads_n)]
        try:
            for child in children:
                assert child.stdout is not None
                line = child.stdout.readline()
                assert line == "ready\n", child.stderr.read() if child.stderr else line
            for worker in workers:
                worker.start()
            for child in children:
                assert child.stdin is not None
                child.stdin.write("go\n")
                child.stdin.flush()
            go.set()
            for n, child in enumerate(children):
                out, err = child.communicate(timeout=60)
                assert child.returncode == 0, err
                claimed[f"process-{n}"] = json.loads(out)
        finally:
            go.set()
            for worker in workers:
                worker.join()
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.communicate()
        assert errors == []
        everything = [event_id for ids in claimed.values() for event_id in ids]
        assert len(everything) == rows, {owner: len(ids) for owner, ids in claimed.items()}
        assert set(everything) == all_ids
        # The database agrees: one attempt each, leased to the claimer that reported it.
        owner_of = {event_id: owner for owner, ids in claimed.items() for event_id in ids}
        with engine.connect() as conn:
            for event_id, attempts, owner in conn.execute(
                sa.select(box.events.c.id, box.events.c.attempts, box.events.c.lease_owner)
            ):
                assert (attempts, owner) == (1, owner_of[event_id])
    finally:
        box.drop_all()
        engine.dispose()


def test_claim_and_settle_never_read_every_waiting_event(tmp_path: Path) -> None:
    # Their cost must not grow with the backlog (benchmark 4). On SQLite that shows in
    # the query plans: each table access finds its rows by primary key, or by an index
    # range that holds no more than the rows asked for. "state = ?" alone on the due
    # index reads every pending event, so the cost would grow with the backlog.
    outbox = Outbox(make_engine(f"sqlite:///{tmp_path / 'outbox.sqlite3'}"))
    outbox.create_all()
    for n in range(60):
        _enqueue(outbox, n, identity=f"p{n}")
    plans: dict[str, list[str]] = {}

    def explain(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        if statement.startswith(("SELECT", "UPDATE")):
            rows = cursor.connection.execute(
                "EXPLAIN QUERY PLAN " + statement, params[0] if many else params
            )
            plans[statement] = [row[3] for row in rows]

    sa.event.listen(outbox.engine, "before_cursor_execute", explain)
    events = outbox.claim("w", limit=50, lease=30)
    by_id = outbox.claim("w", limit=5, lease=30, ids=[ev.id + 50 for ev in events[:5]])
    outbox.settle(
        "w",
        [
            Ending.delivered(ev.id, status=200, response="", outcome="advanced", credit=True)
            for ev in events[:2]
        ]
        + [Ending.retry(ev.id, at=T0, status=503, reason="x", error="") for ev in events[2:]]
        + [Ending.dead(ev.id, status=404, reason="x", error="") for ev in by_id],
    )
    outbox.claim_credits("w", limit=10, lease=30)
    sa.event.remove(outbox.engine, "before_cursor_execute", explain)
    assert len(plans) >= 6
    for statement, steps in plans.items():
        for step in steps:
            assert not step.startswith("SCAN"), (statement, steps)
            assert not step.endswith("USING INDEX mmolove_events_due (state=?)"), (statement, steps)
    outbox.dispose()


def _outbox_on_a_host_off_by(
    seconds: float, url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Outbox:
    """An outbox whose default clock (``time.time``, taken at construction, as on a
    host) reads ``seconds`` off; leases still follow the database's clock."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)
    outbox = Outbox(make_engine(url), table_prefix=prefix)
    monkeypatch.setattr(time, "time", real)
    return outbox


@pytest.mark.postgres
def test_hosts_minutes_apart_never_share_a_lease(
    pg_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Leases follow the database's clock: a host 90 s behind (more than the lease)
    # still leases for the lease's whole length, as the other host sees it.
    prefix = _prefix()
    right = Outbox(make_engine(pg_uri), table_prefix=prefix)
    right.create_all()
    behind = _outbox_on_a_host_off_by(-90, pg_uri, prefix, monkeypatch)
    try:
        # Due by the behind host's own clock: it wrote the event.
        _enqueue(behind, 1)
        assert [e.id for e in behind.claim("host-behind", limit=10, lease=60)]
        assert right.claim("host-right", limit=10, lease=60) == []
        # And the other way round.
        _enqueue(right, 2)
        assert [e.id for e in right.claim("host-right", limit=10, lease=60)]
        assert behind.claim("host-behind", limit=10, lease=60) == []
    finally:
        right.drop_all()
        right.dispose()
        behind.dispose()


@pytest.mark.postgres
def test_a_host_ahead_of_the_database_claims_what_it_just_wrote(
    pg_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Due times are the hosts' own (written at enqueue, or as backoff): a host whose
    # clock runs ahead of the database's still finds its fresh event due at once, as
    # inline delivery needs; only leases follow the database's clock.
    ahead = _outbox_on_a_host_off_by(5, pg_uri, _prefix(), monkeypatch)
    ahead.create_all()
    try:
        event_id = _enqueue(ahead, 1)
        assert [e.id for e in ahead.claim("host-ahead", limit=10, lease=60, ids=[event_id])] == [
            event_id
        ]
    finally:
        ahead.drop_all()
        ahead.dispose()


@pytest.mark.postgres
def test_a_host_ahead_of_the_database_waits_out_a_live_lease(
    pg_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lease ends by the database's clock. Read as a due time by a host 90 s ahead, it
    # would look long past: the host would run pass after empty pass, without a pause,
    # for the whole lease.
    prefix = _prefix()
    right = Outbox(make_engine(pg_uri), table_prefix=prefix)
    right.create_all()
    ahead = _outbox_on_a_host_off_by(90, pg_uri, prefix, monkeypatch)
    try:
        _enqueue(right, 1)
        assert [e.id for e in right.claim("host-right", limit=10, lease=60)]
        assert ahead.claim("host-ahead", limit=10, lease=60) == []
        due = ahead.next_due_at()
        assert due is not None
        # The lease's end as the ahead host's clock reads it: about 60 s from now.
        assert 55 <= due - ahead.clock() <= 61
    finally:
        right.drop_all()
        right.dispose()
        ahead.dispose()
