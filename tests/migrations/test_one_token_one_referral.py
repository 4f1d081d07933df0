"""Revision 0002, one token one referral: unique indexes on ``bindings.token`` and
``credits.token``. An outbox already holding a token bound to several accounts, or
credited several times, is refused, unchanged, its rows named; once the operator has
removed the rows that are not the referral's, the upgrade runs. SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from legacy_outbox import create_010, rows, tables_010

from flask_mmolove.outbox import Outbox, OutboxError, make_engine


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _unique_indexes(engine: sa.Engine, table: str) -> dict[str, list[str | None]]:
    with engine.connect() as conn:
        return {
            str(index["name"]): list(index["column_names"])
            for index in sa.inspect(conn).get_indexes(table)
            if index["unique"]
        }


def _insert(engine: sa.Engine, table: str, **values: object) -> None:
    with engine.begin() as conn:
        conn.execute(tables_010("mmolove_").tables[table].insert().values(**values))


def _bind(engine: sa.Engine, identity: str, token: str, at: float) -> None:
    _insert(engine, "mmolove_bindings", identity=identity, token=token, bound_at=at)


def _credit(engine: sa.Engine, identity: str, token: str, at: float) -> None:
    _insert(
        engine,
        "mmolove_credits",
        identity=identity,
        token=token,
        event_id=int(at),
        outcome="advanced",
        created_at=at,
        attempts=0,
        next_attempt_at=at,
    )


def test_an_outbox_without_shared_tokens_gets_both_unique_indexes(engine: sa.Engine) -> None:
    create_010(engine)
    _bind(engine, "p1", "tok-1", 1.0)
    _bind(engine, "p2", "tok-2", 2.0)
    _credit(engine, "p1", "tok-1", 3.0)
    before = rows(engine)
    was, now = Outbox(engine).upgrade()
    assert was.unversioned
    assert now.current
    assert rows(engine) == before
    assert _unique_indexes(engine, "mmolove_bindings") == {"mmolove_bindings_token": ["token"]}
    assert _unique_indexes(engine, "mmolove_credits") == {"mmolove_credits_token": ["token"]}


def test_shared_tokens_are_refused_named_and_nothing_changes(engine: sa.Engine) -> None:
    create_010(engine)
    _bind(engine, "first", "farmed", 1.0)
    _bind(engine, "alt-2", "farmed", 3.0)
    _bind(engine, "alt-1", "farmed", 2.0)
    _bind(engine, "honest", "tok-honest", 4.0)
    _credit(engine, "first", "farmed", 5.0)
    _credit(engine, "alt-1", "farmed", 6.0)
    long_token = "L" * 100
    _bind(engine, "x", long_token, 7.0)
    _bind(engine, "y", long_token, 8.0)
    before = rows(engine)
    with pytest.raises(OutboxError) as refused:
        Outbox(engine).upgrade()
    message = str(refused.value)
    assert "revision 0002" in message
    assert "Nothing was changed" in message
    assert "mmolove_bindings: token 'farmed' is held by identities 'first', 'alt-1', 'alt-2'" in (
        message
    )
    assert "mmolove_credits: token 'farmed' is held by identities 'first', 'alt-1'" in message
    assert "'x', 'y'" in message
    assert long_token not in message  # named by its start, not written out in full
    assert "honest" not in message
    assert "flask mmolove db upgrade" in message
    assert rows(engine) == before
    assert Outbox(engine).schema_version().unversioned  # not even stamped

    # The operator decides: the first account is the referral's.
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "DELETE FROM mmolove_bindings WHERE identity IN ('alt-1', 'alt-2', 'y')"
        )
        conn.exec_driver_sql("DELETE FROM mmolove_credits WHERE identity = 'alt-1'")
    _, now = Outbox(engine).upgrade()
    assert now.current
    assert "mmolove_bindings_token" in _unique_indexes(engine, "mmolove_bindings")
    box = Outbox(engine)
    assert box.bind_and_enqueue(
        identity="alt-3", token="farmed", event="registered", server_event_id="r", body=b"{}"
    ) == (None, None)
