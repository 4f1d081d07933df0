"""Reading the Outbox without changing an event: what is due next, the counts, the
events themselves; and purging delivered events once they are no longer wanted."""

from __future__ import annotations

from ._base import StoreBase
from .values import DEAD, DELIVERED, PENDING, STATES, OutboxEvent, Stats, _time


class Reading(StoreBase):
    """``next_due_at``, ``stats``, ``list_events``, ``get`` and ``purge``."""

    def next_due_at(self) -> float | None:
        """When something next needs doing: the earliest due time (or lease expiry) of a
        pending event or an unannounced credit; None when there is nothing at all.

        A time in the past means "now". A deliverer may sleep until then. An event
        waiting for an earlier one of its token does not count: it becomes due when that
        one is settled, by the deliverer that settles it.
        """
        with self._transaction(read_only=True) as conn:
            lease_now = self._now(conn)
            now = self.clock()
            params = {"lease_now": lease_now}
            rows = [
                conn.execute(self._sql.next_event_due(), params).one(),
                conn.execute(self._sql.next_credit_due(), params).one(),
            ]
        times = [float(due) for due, _ in rows if due is not None]
        # A live lease ends by the lease clock (the database's, on PostgreSQL): on a
        # host whose clock is ahead of it, the lease's end read as a due time would be
        # long past, and the host would poll without a pause until the lease ran out.
        times += [now + float(until) - lease_now for _, until in rows if until is not None]
        return min(times) if times else None

    def stats(self) -> Stats:
        now = self.clock()
        counts: dict[str, int] = {}
        in_flight = 0
        oldest: float | None = None
        with self._transaction(read_only=True) as conn:
            # One statement for the events, so that on PostgreSQL (a snapshot per
            # statement) the counts agree with each other.
            for state, n, leased, first in conn.execute(self._sql.event_counts(now)):
                counts[str(state)] = int(n)
                if state == PENDING:
                    in_flight, oldest = int(leased or 0), float(first)
            unnotified = conn.execute(self._sql.credits_unnotified()).scalar_one()
        return Stats(
            pending=counts.get(PENDING, 0) - in_flight,
            in_flight=in_flight,
            delivered=counts.get(DELIVERED, 0),
            dead=counts.get(DEAD, 0),
            oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
            credits_unnotified=int(unnotified),
        )

    def purge(self, *, before: float) -> int:
        """Delete delivered events delivered before ``before``; return how many.

        Dead and pending events are never purged, and credits and first-touch bindings
        are kept whatever happens to the events that made them.
        """
        statement = self._sql.purge(_time("before", before))
        with self._transaction() as conn:
            return int(conn.execute(statement).rowcount)

    def list_events(
        self, *, state: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[OutboxEvent]:
        """Events newest first, optionally only those in ``state``."""
        if state is not None and state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must not be negative")
        with self._transaction(read_only=True) as conn:
            rows = conn.execute(self._sql.list_events(state, limit, offset))
            return [OutboxEvent.from_row(row) for row in rows]

    def get(self, event_id: int) -> OutboxEvent | None:
        with self._transaction(read_only=True) as conn:
            row = conn.execute(self._sql.event(event_id)).one_or_none()
        return None if row is None else OutboxEvent.from_row(row)
