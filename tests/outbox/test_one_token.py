"""One share-link token is one MMOLove referral: it binds one account at most, and pays
one credit at most, whatever identities its events name.

The database enforces both (unique indexes on the token), so that registrations racing
on one token bind one account, on the outbox's own transactions and on a caller's: the
refused one gets "not bound", never an error, and the caller's transaction goes on.
"""

from __future__ import annotations

import threading

import sqlalchemy as sa
from outbox_support import _count

from flask_mmolove.outbox import Outbox

SHARED = "shared"


def _register(
    box: Outbox, identity: str, token: str = SHARED, conn: sa.Connection | None = None
) -> tuple[str | None, int | None]:
    return box.bind_and_enqueue(
        identity=identity,
        token=token,
        event="registered",
        server_event_id=f"reg-{identity}",
        body=b"{}",
        connection=conn,
    )


def _bindings(box: Outbox) -> list[tuple[str, str]]:
    b = box.bindings
    with box.engine.connect() as conn:
        return [(str(i), str(t)) for i, t in conn.execute(sa.select(b.c.identity, b.c.token))]


def test_a_token_binds_its_first_account_only(outbox: Outbox) -> None:
    bound, event_id = _register(outbox, "first")
    assert (bound, event_id is not None) == ("shared", True)
    # Alts on the same share link: not bound, nothing enqueued.
    assert _register(outbox, "alt-1") == (None, None)
    assert _register(outbox, "alt-2") == (None, None)
    assert outbox.token_for("alt-1") is None
    assert _bindings(outbox) == [("first", "shared")]
    assert _count(outbox, outbox.events) == 1
    # The first account again: idempotent, as before.
    assert _register(outbox, "first") == ("shared", event_id)
    # An alt already bound to a token of its own keeps it (first touch), not this one.
    assert _register(outbox, "alt-1", "own")[0] == "own"
    assert _register(outbox, "alt-1") == ("own", None)


def test_concurrent_registrations_on_one_token_bind_one_account(outbox: Outbox) -> None:
    results: list[tuple[str | None, int | None]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def register(identity: str) -> None:
        start.wait()
        try:
            results.append(_register(outbox, identity))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(f"acct-{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(bound or "" for bound, _ in results) == [""] * 5 + ["shared"]
    assert [event_id for _, event_id in results].count(None) == 5
    assert len(_bindings(outbox)) == 1
    assert _count(outbox, outbox.events) == 1


def test_a_refused_binding_never_spoils_the_callers_transaction(
    outbox: Outbox, engine: sa.Engine
) -> None:
    with engine.connect() as conn, conn.begin():
        assert _register(outbox, "first", conn=conn)[0] == "shared"
    with engine.connect() as conn, conn.begin():
        assert _register(outbox, "alt", conn=conn) == (None, None)
        # The portal's transaction goes on: its next statement and its commit work.
        assert _register(outbox, "other", "own", conn=conn)[0] == "own"
    assert sorted(_bindings(outbox)) == [("first", "shared"), ("other", "own")]


def test_handed_connections_racing_on_one_token_bind_one_account(
    outbox: Outbox, engine: sa.Engine
) -> None:
    # The second registration waits for the first transaction, then binds nothing.
    results: list[tuple[str | None, int | None]] = []
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with engine.connect() as conn, conn.begin():
                results.append(_register(outbox, "alt", conn=conn))
                _register(outbox, "other", "own", conn=conn)
        except BaseException as exc:
            errors.append(exc)

    with engine.connect() as conn, conn.begin():
        assert _register(outbox, "first", conn=conn)[0] == "shared"
        racer = threading.Thread(target=second)
        racer.start()
        racer.join(0.3)
        assert racer.is_alive(), "the second registration did not wait for the first"
    racer.join(10)
    assert errors == []
    assert results == [(None, None)]
    assert sorted(_bindings(outbox)) == [("first", "shared"), ("other", "own")]


def test_one_token_is_credited_once_whatever_identities_its_events_name(
    outbox: Outbox,
) -> None:
    """Defence in depth: qualified events of two identities on one token (bound before
    revision 0002, or enqueued by an operator with --token) credit once."""
    ids = [
        outbox.enqueue(
            event="qualified",
            token="shared",
            identity=identity,
            server_event_id=f"qual-{identity}",
            body=b"{}",
        )
        for identity in ("first", "alt")
    ]
    for event_id in ids:
        # One token's events go in order: the second is due once the first is delivered.
        assert [e.id for e in outbox.claim("d", limit=1, lease=30, ids=[event_id])] == [event_id]
        assert outbox.complete(
            event_id, "d", status=200, response="{}", outcome="advanced", credit=True
        )
    credits = outbox.claim_credits("n", limit=10, lease=30)
    assert [(c.identity, c.token, c.event_id) for c in credits] == [("first", "shared", ids[0])]
    assert _count(outbox, outbox.credits) == 1
