"""The durable outbox against real SQLite files and a real PostgreSQL database.

PostgreSQL runs when MMOLOVE_TEST_POSTGRES_URL is set; with MMOLOVE_REQUIRE_ALL_TESTS=1
a missing URL fails instead of skipping. Every test gets its own random table prefix
and drops its tables, so parallel runs against one database do not collide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import FakeClock

from flask_mmolove.outbox import (
    DEAD,
    DELIVERED,
    PENDING,
    TEXT_MAX,
    Ending,
    Outbox,
    OutboxError,
    make_engine,
)
from flask_mmolove.outbox import queries as outbox_queries

PG_URL = os.environ.get("MMOLOVE_TEST_POSTGRES_URL", "").strip()
REQUIRE_ALL = os.environ.get("MMOLOVE_REQUIRE_ALL_TESTS") == "1"
T0 = 1_700_000_000.0


def _pg_url() -> str:
    if not PG_URL:
        if REQUIRE_ALL:
            pytest.fail("MMOLOVE_REQUIRE_ALL_TESTS=1 but MMOLOVE_TEST_POSTGRES_URL is not set")
        pytest.skip("MMOLOVE_TEST_POSTGRES_URL is not set")
    return PG_URL


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}_"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        # A directory that does not exist yet: make_engine must create it.
        return f"sqlite:///{tmp_path / 'instance' / 'outbox.sqlite3'}"
    return _pg_url()


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def outbox(engine: sa.Engine, clock: FakeClock) -> Iterator[Outbox]:
    box = Outbox(engine, table_prefix=_prefix(), clock=clock)
    box.create_all()
    yield box
    box.drop_all()


def _enqueue(
    box: Outbox, n: int = 1, *, identity: str = "player-1", event: str = "registered"
) -> int:
    return box.enqueue(
        event=event,
        # A token per event: one token's events are claimed strictly in order, which
        # test_one_tokens_events_go_in_order covers on its own.
        token=f"tok-{identity}-{n}",
        identity=identity,
        server_event_id=f"{event[:3]}-{identity}-{n}",
        body=b'{"event":"%s","n":%d}' % (event.encode(), n),
    )


def _accept(box: Outbox, event_id: int, owner: str) -> bool:
    return box.complete(
        event_id, owner, status=200, response='{"ok":true}', outcome="advanced", credit=False
    )


def _count(box: Outbox, table: sa.Table) -> int:
    with box.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


# --- engine -----------------------------------------------------------------------


def test_sqlite_engine_creates_directory_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "outbox.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            pragma = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "foreign_keys")
            }
        assert pragma == {"journal_mode": "wal", "busy_timeout": 30000, "foreign_keys": 1}
        assert path.exists()
    finally:
        engine.dispose()


def test_sqlite_write_transactions_take_the_lock_up_front(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lock.sqlite3'}"
    engine, impatient = make_engine(url), make_engine(f"{url}?timeout=0.2")
    box = Outbox(engine)
    try:
        box.create_all()
        with engine.connect() as conn, conn.begin():
            # No statement has run yet, but BEGIN IMMEDIATE already holds the write
            # lock: a second writer waits its busy timeout, then gets a clear error.
            started = time.monotonic()
            with pytest.raises(OutboxError, match="stayed locked past its busy timeout"):
                _enqueue(Outbox(impatient))
            assert 0.15 < time.monotonic() - started < 5
        assert _enqueue(Outbox(impatient)) == 1
    finally:
        engine.dispose()
        impatient.dispose()


def test_sqlite_reads_do_not_wait_for_a_writer(tmp_path: Path, clock: FakeClock) -> None:
    url = f"sqlite:///{tmp_path / 'busy.sqlite3'}"
    engine, writer = make_engine(url), make_engine(url)
    box = Outbox(engine, clock=clock)
    try:
        box.create_all()
        event_id = _enqueue(box)
        with writer.connect() as conn, conn.begin():
            conn.execute(box.events.update().values(attempts=7))
            started = time.monotonic()
            # WAL readers see the last commit while another connection holds the lock.
            event = box.get(event_id)
            assert event is not None
            assert event.attempts == 0
            assert box.stats().pending == 1
            assert box.next_due_at() == T0
            assert time.monotonic() - started < 5
    finally:
        box.dispose()
        writer.dispose()


def test_in_memory_sqlite_is_shared_by_threads(clock: FakeClock) -> None:
    engine = make_engine("sqlite://")
    box = Outbox(engine, clock=clock)
    try:
        box.create_all()
        ids: list[int] = []
        thread = threading.Thread(target=lambda: ids.append(_enqueue(box)))
        thread.start()
        thread.join()
        assert [e.id for e in box.claim("me", limit=5, lease=30)] == ids
    finally:
        box.dispose()


def test_unreachable_database_is_named_without_its_password() -> None:
    engine = make_engine("postgresql+psycopg://mmolove:s3cret-pw@127.0.0.1:1/nowhere")
    box = Outbox(engine)
    try:
        with pytest.raises(OutboxError) as caught:
            box.create_all()
        message = str(caught.value)
        assert "s3cret-pw" not in message
        assert "postgresql+psycopg://mmolove:***@127.0.0.1:1/nowhere" in message
        assert "cannot connect" in message
        assert "s3cret-pw" not in repr(box)
    finally:
        box.dispose()


def test_missing_tables_say_how_to_create_them(engine: sa.Engine) -> None:
    box = Outbox(engine, table_prefix=_prefix())
    with pytest.raises(OutboxError, match=r"do not exist .*create_all"):
        _enqueue(box)
    with pytest.raises(OutboxError, match="create_all"):
        box.stats()


def test_create_all_is_idempotent_and_safe_concurrently(engine: sa.Engine) -> None:
    prefix = _prefix()
    boxes = [Outbox(engine, table_prefix=prefix) for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(boxes))

    def create(box: Outbox) -> None:
        try:
            start.wait()
            box.create_all()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(box,)) for box in boxes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        boxes[0].create_all()
        assert _enqueue(boxes[1]) == 1
    finally:
        boxes[0].drop_all()


def test_table_prefix_is_checked(engine: sa.Engine) -> None:
    with pytest.raises(ValueError, match="table_prefix"):
        Outbox(engine, table_prefix="bad-prefix; drop")
    assert Outbox(engine, table_prefix="app_mmolove_").events.name == "app_mmolove_events"


# --- enqueue and bindings -----------------------------------------------------------


def test_enqueue_is_idempotent_and_keeps_the_exact_bytes(outbox: Outbox, clock: FakeClock) -> None:
    body = b'{"event":"registered","name":"J\xc3\xbcrgen"}'
    kwargs = {"event": "registered", "token": "tok", "identity": "p1", "server_event_id": "reg-p1"}
    first = outbox.enqueue(body=body, **kwargs)
    clock.advance(5)
    assert outbox.enqueue(body=b"{}", **kwargs) == first
    assert outbox.enqueue(body=b"{}", **{**kwargs, "token": "  tok  "}) == first
    assert _count(outbox, outbox.events) == 1
    stored = outbox.get(first)
    assert stored is not None
    assert stored.body == body
    assert (stored.state, stored.attempts, stored.created_at) == (PENDING, 0, T0)
    assert stored.next_attempt_at == T0
    other = outbox.enqueue(body=body, **{**kwargs, "server_event_id": "reg-p1-again"})
    qualified = outbox.enqueue(body=body, **{**kwargs, "event": "qualified"})
    assert len({first, other, qualified}) == 3


def test_enqueue_rejects_what_cannot_be_stored(outbox: Outbox) -> None:
    good = {"event": "registered", "token": "t", "identity": "p", "server_event_id": "s"}
    with pytest.raises(TypeError, match="bytes"):
        outbox.enqueue(body="{}", **good)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token"):
        outbox.enqueue(body=b"{}", **{**good, "token": "  "})
    with pytest.raises(ValueError, match="at most 512"):
        outbox.enqueue(body=b"{}", **{**good, "token": "x" * 513})
    with pytest.raises(ValueError, match="identity"):
        outbox.enqueue(body=b"{}", **{**good, "identity": "x" * 256})
    with pytest.raises(ValueError, match="event must be one of"):
        outbox.enqueue(body=b"{}", **{**good, "event": "signup"})
    assert outbox.enqueue(body=b"{}", **{**good, "token": "x" * 512, "identity": "y" * 255}) > 0


def test_first_touch_binding(outbox: Outbox) -> None:
    def register(identity: str, token: str) -> tuple[str, int | None]:
        return outbox.bind_and_enqueue(
            identity=identity,
            token=token,
            event="registered",
            server_event_id=f"reg-{identity}",
            body=b'{"token":"%s"}' % token.encode(),
        )

    assert outbox.token_for("p1") is None
    bound, event_id = register("p1", "first")
    assert bound == "first"
    assert event_id is not None
    assert register("p1", "first") == ("first", event_id)
    # A later referrer neither rebinds the referee nor gets an event enqueued.
    assert register("p1", "second") == ("first", None)
    assert outbox.token_for("p1") == "first"
    assert _count(outbox, outbox.events) == 1
    bound, other_id = register("p2", "second")
    assert bound == "second"
    assert other_id not in (None, event_id)
    assert _count(outbox, outbox.bindings) == 2


def test_concurrent_first_touch_has_one_winner(outbox: Outbox) -> None:
    results: list[tuple[str, int | None]] = []
    start = threading.Barrier(6)

    def register(token: str) -> None:
        start.wait()
        results.append(
            outbox.bind_and_enqueue(
                identity="contested",
                token=token,
                event="registered",
                server_event_id="reg-contested",
                body=b"{}",
            )
        )

    threads = [threading.Thread(target=register, args=(f"tok-{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = {bound for bound, _ in results}
    assert len(winners) == 1
    assert [event_id for _, event_id in results].count(None) == 5
    assert _count(outbox, outbox.events) == 1


# --- writing in the caller's transaction ----------------------------------------------


def _register_on(
    box: Outbox, conn: sa.Connection, token: str, identity: str = "p1"
) -> tuple[str, int | None]:
    return box.bind_and_enqueue(
        identity=identity,
        token=token,
        event="registered",
        server_event_id=f"reg-{identity}",
        body=b'{"token":"%s"}' % token.encode(),
        connection=conn,
    )


def _qualify_on(box: Outbox, conn: sa.Connection, *, identity: str = "p1") -> int:
    return box.enqueue(
        event="qualified",
        token="tok",
        identity=identity,
        server_event_id=f"qual-{identity}",
        body=b"{}",
        connection=conn,
    )


def test_writes_on_a_handed_connection_go_with_its_rollback(
    outbox: Outbox, engine: sa.Engine
) -> None:
    with engine.connect() as conn:
        transaction = conn.begin()
        bound, event_id = _register_on(outbox, conn, "tok")
        assert bound == "tok"
        assert event_id is not None
        assert _qualify_on(outbox, conn) != event_id
        # The caller's transaction sees what it wrote; nobody else does before it ends.
        assert outbox.token_for("p1", connection=conn) == "tok"
        assert outbox.token_for("p1") is None
        assert outbox.get(event_id) is None
        transaction.rollback()
    assert outbox.token_for("p1") is None
    assert (_count(outbox, outbox.events), _count(outbox, outbox.bindings)) == (0, 0)
    assert outbox.claim("w", limit=5, lease=30) == []


def test_writes_on_a_handed_connection_are_stored_when_it_commits(
    outbox: Outbox, engine: sa.Engine
) -> None:
    with engine.connect() as conn, conn.begin():
        bound, registered = _register_on(outbox, conn, "tok")
        assert registered is not None
        # Idempotent within the caller's transaction, and first touch still wins.
        assert _register_on(outbox, conn, "tok") == (bound, registered)
        assert _register_on(outbox, conn, "other") == ("tok", None)
        qualified = _qualify_on(outbox, conn)
        assert _qualify_on(outbox, conn) == qualified
        assert outbox.get(registered) is None
    assert outbox.token_for("p1") == "tok"
    # And across transactions: the same key finds the rows the first one committed.
    with engine.connect() as conn, conn.begin():
        assert _register_on(outbox, conn, "tok") == ("tok", registered)
        assert _qualify_on(outbox, conn) == qualified
    assert (_count(outbox, outbox.events), _count(outbox, outbox.bindings)) == (2, 1)
    [claimed] = outbox.claim("w", limit=5, lease=30)
    assert (claimed.id, claimed.body) == (registered, b'{"token":"tok"}')
    assert _accept(outbox, registered, "w")
    assert [e.id for e in outbox.claim("w", limit=5, lease=30)] == [qualified]


def test_handed_connections_racing_on_one_key_store_it_once(
    outbox: Outbox, engine: sa.Engine
) -> None:
    # The second writer waits for the first transaction (its write lock on SQLite, the
    # conflicting insert on PostgreSQL), then finds the event the first one committed.
    results: list[tuple[str, int | None]] = []
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with engine.connect() as conn, conn.begin():
                results.append(_register_on(outbox, conn, "late"))
        except BaseException as exc:
            errors.append(exc)

    with engine.connect() as conn, conn.begin():
        first = _register_on(outbox, conn, "tok")
        racer = threading.Thread(target=second)
        racer.start()
        racer.join(0.3)
        assert racer.is_alive(), "the second writer did not wait for the first"
    racer.join(10)
    assert errors == []
    assert results == [("tok", None)]
    assert first[1] is not None
    assert _count(outbox, outbox.events) == 1


def test_without_on_conflict_a_duplicate_leaves_the_callers_transaction_usable(
    outbox: Outbox, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dialects without ON CONFLICT insert in a SAVEPOINT; on PostgreSQL a unique
    # violation outside one would abort the caller's whole transaction.
    monkeypatch.setattr(outbox_queries, "_ON_CONFLICT", frozenset())
    with engine.connect() as conn, conn.begin():
        bound, registered = _register_on(outbox, conn, "tok")
        assert _register_on(outbox, conn, "tok") == (bound, registered)
        qualified = _qualify_on(outbox, conn)
        assert _qualify_on(outbox, conn) == qualified
        # The caller's own statements still run in its transaction, which commits.
        assert conn.execute(sa.select(sa.func.count()).select_from(outbox.events)).scalar() == 2
    assert (_count(outbox, outbox.events), _count(outbox, outbox.bindings)) == (2, 1)


# --- claiming and leases ------------------------------------------------------------


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


def test_complete_records_the_answer_only_for_the_lease_owner(
    outbox: Outbox, clock: FakeClock
) -> None:
    event_id = _enqueue(outbox)
    outbox.claim("a", limit=1, lease=30)
    clock.advance(2)
    assert not _accept(outbox, event_id, "b")
    assert not outbox.reschedule(event_id, "b", at=T0, status=None, reason="x", error="y")
    assert not outbox.dead_letter(event_id, "b", status=None, reason="x", error="y")
    untouched = outbox.get(event_id)
    assert untouched is not None
    assert untouched.lease_owner == "a"
    assert untouched.state == PENDING
    assert _accept(outbox, event_id, "a")
    done = outbox.get(event_id)
    assert done is not None
    assert (done.state, done.delivered_at, done.last_status) == (DELIVERED, T0 + 2, 200)
    assert (done.outcome, done.response, done.lease_owner, done.lease_until) == (
        "advanced",
        '{"ok":true}',
        None,
        None,
    )
    # Settled once: a second answer for the same claim changes nothing.
    assert not _accept(outbox, event_id, "a")
    assert not outbox.dead_letter(event_id, "a", status=None, reason="x", error="y")
    assert outbox.claim("a", limit=5, lease=30) == []


def test_a_lease_taken_over_refuses_the_late_owner(outbox: Outbox, clock: FakeClock) -> None:
    event_id = _enqueue(outbox)
    outbox.claim("slow", limit=1, lease=10)
    clock.advance(11)
    assert [e.id for e in outbox.claim("fast", limit=1, lease=10)] == [event_id]
    assert not _accept(outbox, event_id, "slow")
    assert _accept(outbox, event_id, "fast")


def test_reschedule_records_the_failure(outbox: Outbox, clock: FakeClock) -> None:
    event_id = _enqueue(outbox)
    outbox.claim("a", limit=1, lease=30)
    long_error = "E" * (TEXT_MAX + 500)
    assert outbox.reschedule(
        event_id, "a", at=T0 + 120, status=503, reason="server_error", error=long_error
    )
    event = outbox.get(event_id)
    assert event is not None
    assert (event.state, event.next_attempt_at, event.lease_owner) == (PENDING, T0 + 120, None)
    assert (event.last_status, event.last_reason) == (503, "server_error")
    assert event.last_error is not None
    assert len(event.last_error) == TEXT_MAX
    # The lease is gone: the old owner can no longer settle it.
    assert not outbox.reschedule(event_id, "a", at=T0, status=None, reason="x", error="")


def test_dead_letter_and_requeue(outbox: Outbox, clock: FakeClock) -> None:
    dead_a, dead_b, waiting, busy, done = (_enqueue(outbox, n) for n in range(5))
    outbox.claim("w", limit=5, lease=30)
    for event_id in (dead_a, dead_b):
        assert outbox.dead_letter(event_id, "w", status=404, reason="not_found", error="{}")
    assert outbox.reschedule(waiting, "w", at=T0 + 3600, status=None, reason="t", error="")
    assert outbox.complete(done, "w", status=200, response="{}", outcome="advanced", credit=False)
    dead = outbox.get(dead_a)
    assert dead is not None
    assert (dead.state, dead.last_status, dead.lease_owner) == (
        DEAD,
        404,
        None,
    )
    assert outbox.claim("w2", limit=10, lease=30) == []

    clock.advance(10)
    # By id: dead and backing-off events come back; in flight and delivered do not.
    assert outbox.requeue([dead_a, waiting, busy, done]) == 2
    assert outbox.requeue([]) == 0
    assert outbox.requeue() == 1  # the remaining dead one
    assert outbox.requeue() == 0
    for event_id in (dead_a, dead_b):
        event = outbox.get(event_id)
        assert event is not None
        assert (event.state, event.attempts, event.next_attempt_at) == (PENDING, 0, T0 + 10)
    requeued_waiting = outbox.get(waiting)
    assert requeued_waiting is not None
    assert requeued_waiting.attempts == 1
    claimed = outbox.claim("w2", limit=10, lease=30)
    assert sorted(e.id for e in claimed) == sorted([dead_a, dead_b, waiting])
    still_busy = outbox.get(busy)
    assert still_busy is not None
    assert still_busy.lease_owner == "w"


# --- credits ------------------------------------------------------------------------


def _deliver(box: Outbox, event_id: int, *, credit: bool, owner: str = "d") -> bool:
    claimed = box.claim(owner, limit=1, lease=30, ids=[event_id])
    assert [e.id for e in claimed] == [event_id]
    return box.complete(
        event_id, owner, status=200, response="{}", outcome="advanced", credit=credit
    )


def test_a_referee_is_credited_once(outbox: Outbox) -> None:
    first = _enqueue(outbox, 1, event="qualified")
    second = _enqueue(outbox, 2, event="qualified")
    uncredited = _enqueue(outbox, 3, identity="player-2", event="qualified")
    assert _deliver(outbox, first, credit=True)
    assert _deliver(outbox, second, credit=True)
    assert _deliver(outbox, uncredited, credit=False)
    credits = outbox.claim_credits("n", limit=10, lease=30)
    assert [(c.identity, c.token, c.event_id, c.outcome, c.attempts) for c in credits] == [
        ("player-1", "tok-player-1-1", first, "advanced", 1)
    ]
    assert outbox.stats().credits_unnotified == 1


def test_concurrent_completions_credit_once(outbox: Outbox) -> None:
    ids = [_enqueue(outbox, n, event="qualified") for n in range(6)]
    claimed = {e.id: e.lease_owner for e in outbox.claim("d", limit=10, lease=60)}
    assert sorted(claimed) == sorted(ids)
    start = threading.Barrier(len(ids))
    results: list[bool] = []

    def complete(event_id: int) -> None:
        start.wait()
        results.append(
            outbox.complete(
                event_id, "d", status=200, response="{}", outcome="advanced", credit=True
            )
        )

    threads = [threading.Thread(target=complete, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * len(ids)
    assert _count(outbox, outbox.credits) == 1


def test_credit_claim_finish_release_and_expiry(outbox: Outbox, clock: FakeClock) -> None:
    assert _deliver(outbox, _enqueue(outbox, event="qualified"), credit=True)
    [credit] = outbox.claim_credits("a", limit=5, lease=30)
    assert outbox.claim_credits("b", limit=5, lease=30) == []
    assert not outbox.finish_credit(credit.identity, "b")
    assert not outbox.release_credit(credit.identity, "b", retry_at=T0)
    # The receiver raised: try again later, not before.
    assert outbox.release_credit(credit.identity, "a", retry_at=T0 + 60)
    assert not outbox.finish_credit(credit.identity, "a")
    clock.advance(59)
    assert outbox.claim_credits("b", limit=5, lease=30) == []
    clock.advance(1)
    [again] = outbox.claim_credits("b", limit=5, lease=30)
    assert again.attempts == 2
    # "b" crashed mid-announcement: its lease expires and "c" takes over.
    clock.advance(30)
    [taken] = outbox.claim_credits("c", limit=5, lease=30)
    assert taken.identity == credit.identity
    assert taken.attempts == 3
    assert not outbox.finish_credit(credit.identity, "b")
    assert outbox.finish_credit(credit.identity, "c")
    assert not outbox.finish_credit(credit.identity, "c")
    clock.advance(3600)
    assert outbox.claim_credits("d", limit=5, lease=30) == []
    assert outbox.stats().credits_unnotified == 0


# --- reading ------------------------------------------------------------------------


def test_stats_and_oldest_age(outbox: Outbox, clock: FakeClock) -> None:
    empty = outbox.stats()
    assert (empty.pending, empty.in_flight, empty.delivered, empty.dead) == (0, 0, 0, 0)
    assert empty.oldest_pending_age is None
    assert empty.credits_unnotified == 0
    ids = []
    for n in range(5):
        ids.append(_enqueue(outbox, n))
        clock.advance(10)
    outbox.claim("a", limit=3, lease=100)
    assert outbox.complete(ids[0], "a", status=200, response="", outcome="test", credit=False)
    assert outbox.dead_letter(ids[1], "a", status=400, reason="malformed", error="")
    stats = outbox.stats()
    assert (stats.pending, stats.in_flight, stats.delivered, stats.dead) == (2, 1, 1, 1)
    # ids[2] (created at T0 + 20) is the oldest still undelivered.
    assert stats.oldest_pending_age == pytest.approx(50 - 20)
    clock.advance(100)
    stats = outbox.stats()
    assert (stats.pending, stats.in_flight) == (3, 0)
    assert stats.oldest_pending_age == pytest.approx(150 - 20)


def test_next_due_at(outbox: Outbox, clock: FakeClock) -> None:
    assert outbox.next_due_at() is None
    first = _enqueue(outbox, 1)
    clock.advance(5)
    second = _enqueue(outbox, 2)
    assert outbox.next_due_at() == T0
    outbox.claim("a", limit=1, lease=30)
    assert outbox.next_due_at() == T0 + 5
    outbox.claim("a", limit=1, lease=30)
    # Both in flight: the earliest lease expiry is when something could be due.
    assert outbox.next_due_at() == T0 + 35
    assert outbox.reschedule(second, "a", at=T0 + 20, status=None, reason="t", error="")
    assert outbox.next_due_at() == T0 + 20
    assert outbox.complete(first, "a", status=200, response="", outcome="advanced", credit=True)
    # The credit waiting to be announced is due now.
    assert outbox.next_due_at() == T0 + 5
    [credit] = outbox.claim_credits("a", limit=1, lease=30)
    assert outbox.release_credit(credit.identity, "a", retry_at=T0 + 300)
    assert outbox.next_due_at() == T0 + 20
    clock.advance(15)
    [again] = outbox.claim("a", limit=1, lease=30)
    assert again.id == second
    assert outbox.dead_letter(second, "a", status=None, reason="t", error="")
    assert outbox.next_due_at() == T0 + 300


def test_list_and_get(outbox: Outbox, clock: FakeClock) -> None:
    ids = [_enqueue(outbox, n) for n in range(5)]
    outbox.claim("a", limit=1, lease=30)
    assert outbox.dead_letter(ids[0], "a", status=422, reason="invalid_transition", error="")
    assert [e.id for e in outbox.list_events()] == ids[::-1]
    assert [e.id for e in outbox.list_events(limit=2, offset=1)] == [ids[3], ids[2]]
    assert [e.id for e in outbox.list_events(state=DEAD)] == [ids[0]]
    assert [e.id for e in outbox.list_events(state=PENDING, limit=2)] == [ids[4], ids[3]]
    assert outbox.list_events(state=DELIVERED) == []
    with pytest.raises(ValueError, match="state"):
        outbox.list_events(state="lost")
    event = outbox.get(ids[1])
    assert event is not None
    assert (event.event, event.token, event.identity, event.server_event_id) == (
        "registered",
        "tok-player-1-1",
        "player-1",
        "reg-player-1-1",
    )
    assert b"body" not in repr(event).encode()
    assert "body=" not in repr(event)
    assert outbox.get(10_000) is None


def test_purge_removes_only_old_deliveries(outbox: Outbox, clock: FakeClock) -> None:
    old, recent, dead, pending = (_enqueue(outbox, n, event="qualified") for n in range(4))
    outbox.claim("a", limit=3, lease=30)
    assert outbox.complete(old, "a", status=200, response="", outcome="advanced", credit=True)
    assert outbox.dead_letter(dead, "a", status=404, reason="not_found", error="")
    clock.advance(100)
    assert _accept(outbox, recent, "a")
    assert outbox.purge(before=T0 + 50) == 1
    assert outbox.get(old) is None
    assert [e.id for e in outbox.list_events()] == [pending, dead, recent]
    # The credit the purged event earned is still owed.
    [credit] = outbox.claim_credits("a", limit=5, lease=30)
    assert credit.event_id == old


# --- concurrency ----------------------------------------------------------------------

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


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_does_not_reuse_the_parents_connection(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'fork.sqlite3'}")
    box = Outbox(engine)
    try:
        box.create_all()
        event_id = _enqueue(box)
        assert box.get(event_id) is not None  # leaves a pooled connection made here
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() in a process that has threads.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            code = 1
            try:
                code = 0 if [e.id for e in box.claim("child", limit=1, lease=60)] else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        event = box.get(event_id)
        assert event is not None
        assert event.lease_owner == "child"
    finally:
        box.dispose()


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


def test_settle_records_every_kind_of_ending_at_once(outbox: Outbox, clock: FakeClock) -> None:
    ids = [_enqueue(outbox, n) for n in range(5)]
    assert [ev.id for ev in outbox.claim("w", limit=4, lease=30)] == ids[:4]
    clock.advance(1)
    endings = [
        Ending.delivered(ids[0], status=200, response="{}", outcome="advanced", credit=True),
        Ending.delivered(ids[1], status=200, response="{}", outcome="duplicate", credit=False),
        Ending.retry(ids[2], at=T0 + 60, status=503, reason="server_error", error="busy"),
        Ending.dead(ids[3], status=404, reason="not_found", error="{}"),
        # Never claimed by "w": not its lease, left as it is.
        Ending.dead(ids[4], status=404, reason="not_found", error="{}"),
    ]
    assert outbox.settle("w", endings) == set(ids[:4])
    got = [outbox.get(i) for i in ids]
    assert [(g.state, g.outcome, g.lease_owner) for g in got if g] == [
        ("delivered", "advanced", None),
        ("delivered", "duplicate", None),
        ("pending", None, None),
        ("dead", None, None),
        ("pending", None, None),
    ]
    delivered, retried, untouched = got[0], got[2], got[4]
    assert delivered is not None
    assert delivered.delivered_at == T0 + 1
    assert retried is not None
    assert (retried.next_attempt_at, retried.last_error) == (T0 + 60, "busy")
    assert untouched is not None
    assert untouched.attempts == 0
    assert outbox.stats().credits_unnotified == 1
    # Settled once: a second try finds no lease to end.
    assert outbox.settle("w", endings[:1]) == set()
    with pytest.raises(ValueError, match="only once"):
        outbox.settle("w", [endings[2], endings[2]])


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


@pytest.mark.postgres
@pytest.mark.parametrize("foreign_key", [True, False], ids=["key share", "for update"])
def test_settle_waits_for_a_row_lock_it_does_not_refuse_the_lease(foreign_key: bool) -> None:
    # A portal's foreign key to the events table locks rows FOR KEY SHARE: no reason to
    # wait. A claimer's pick can hold a row FOR UPDATE for a moment and pass it by:
    # worth waiting for. Neither takes the lease, so the answer is never refused.
    engine = make_engine(_pg_url())
    outbox = Outbox(engine, table_prefix=_prefix())
    outbox.create_all()
    try:
        event_id = _enqueue(outbox)
        assert [ev.id for ev in outbox.claim("w", limit=1, lease=60)] == [event_id]
        e = outbox.events
        recorded: list[bool] = []

        def settle() -> None:
            recorded.append(_accept(outbox, event_id, "w"))

        with engine.connect() as other:
            other.execute(
                sa.select(e.c.id)
                .where(e.c.id == event_id)
                .with_for_update(read=foreign_key, key_share=foreign_key)
            )
            settler = threading.Thread(target=settle)
            settler.start()
            settler.join(5 if foreign_key else 0.5)
            # Not held up by a foreign key's lock.
            assert not (foreign_key and settler.is_alive())
            other.rollback()
        settler.join(10)
        assert recorded == [True]
        got = outbox.get(event_id)
        assert got is not None
        assert (got.state, got.lease_owner) == ("delivered", None)
    finally:
        outbox.drop_all()
        engine.dispose()
