"""Helpers the outbox tests (tests/outbox/) share: the fake clock's start, a fresh
table prefix, and enqueueing, accepting and counting in one line.

The leading underscores keep these apart from the Outbox's own methods they call
(``_enqueue(outbox)`` beside ``outbox.enqueue(...)``).
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from flask_mmolove.outbox import Outbox

#: Where the tests' FakeClock starts: stored times read as T0 + seconds.
T0 = 1_700_000_000.0


def _prefix() -> str:
    """A random table prefix, so tests sharing one database never meet."""
    return f"t{uuid.uuid4().hex[:12]}_"


def _enqueue(
    box: Outbox, n: int = 1, *, identity: str = "player-1", event: str = "registered"
) -> int:
    """Enqueue event number ``n`` of ``identity``, on a token of its own; its id."""
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
    """Record a 200 "advanced" answer, no credit, for ``owner``'s claim of the event."""
    return box.complete(
        event_id, owner, status=200, response='{"ok":true}', outcome="advanced", credit=False
    )


def _count(box: Outbox, table: sa.Table) -> int:
    """The number of rows in one of the outbox's tables."""
    with box.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
