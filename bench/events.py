"""Backlogs of referral events: built once, stored in an outbox quickly."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from flask_mmolove.outbox import Outbox, make_engine
from flask_mmolove.protocol import build_body


@dataclass(frozen=True)
class Event:
    token: str
    identity: str
    server_event_id: str
    body: bytes


def registered_events(
    n: int, server_id: str, mint: Callable[[int], str], *, start: int = 0
) -> list[Event]:
    """``n`` distinct ``registered`` events, each with its own token and referee."""
    events = []
    for i in range(start, start + n):
        token = mint(i)
        identity = f"player-{i}"
        event_id = f"reg-{identity}"
        body = build_body(
            "registered",
            token=token,
            server_id=server_id,
            server_event_id=event_id,
            referee_identity=identity,
        )
        events.append(Event(token, identity, event_id, body))
    return events


def fill(outbox: Outbox, events: Sequence[Event], chunk: int = 5000) -> None:
    """Store ``events`` as pending, exactly as ``Outbox.enqueue`` stores each, but in bulk.

    Row values come from the outbox's own ``_event_values`` (what ``enqueue`` inserts);
    only the one-transaction-per-event cost is skipped, which the scaling benchmark
    measures separately. On PostgreSQL the table is analysed afterwards.
    """
    table = outbox.events
    for begin in range(0, len(events), chunk):
        rows = [
            outbox._event_values(
                event="registered",
                token=e.token,
                identity=e.identity,
                server_event_id=e.server_event_id,
                body=e.body,
            )
            for e in events[begin : begin + chunk]
        ]
        with outbox.engine.begin() as conn:
            conn.execute(table.insert(), rows)
    if outbox.engine.dialect.name == "postgresql":
        # What autovacuum would do within a minute of such a bulk insert: without it
        # the planner still believes the table empty and picks plans for that.
        with outbox.engine.begin() as conn:
            conn.exec_driver_sql(f"ANALYZE {table.name}")


@contextmanager
def fresh_outbox(url: str, prefix: str) -> Iterator[Outbox]:
    """An empty outbox at ``url`` under ``prefix``; its tables dropped afterwards."""
    outbox = Outbox(make_engine(url), table_prefix=prefix)
    outbox.drop_all()
    outbox.create_all()
    try:
        yield outbox
    finally:
        outbox.drop_all()
        outbox.dispose()


def delivered_span(outbox: Outbox) -> tuple[int, float | None, float | None]:
    """How many events are delivered, and the first and last ``delivered_at``."""
    import sqlalchemy as sa

    e = outbox.events
    with outbox.engine.connect() as conn:
        n, first, last = conn.execute(
            sa.select(
                sa.func.count(), sa.func.min(e.c.delivered_at), sa.func.max(e.c.delivered_at)
            ).where(e.c.state == "delivered")
        ).one()
    return int(n), first, last
