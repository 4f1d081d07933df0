"""Writing events: enqueue is idempotent and keeps the exact bytes, refuses what it
cannot store, and the first referrer to touch a player is bound once, even under races.

The same writes on a connection the caller hands in belong to the caller's transaction:
gone with its rollback, stored with its commit, stored once when two transactions race
on one key, and a duplicate never spoils the caller's transaction.
"""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from outbox_support import T0, _accept, _count
from support import FakeClock

from flask_mmolove.outbox import PENDING, Outbox
from flask_mmolove.outbox import queries as outbox_queries


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
