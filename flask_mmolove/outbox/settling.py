"""Events under a lease: claiming due events, recording how each attempt ended (with the
credit it owes), and making events due again (dry runs released, retries, requeues)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._base import StoreBase
from .clauses import insert_if_absent
from .values import DELIVERED, PENDING, Ending, OutboxEvent, _limit, _owner, _positive


class Settling(StoreBase):
    """``claim``, ``settle`` and its shorthands, ``release_dry_runs`` and ``requeue``."""

    def claim(
        self,
        owner: str,
        *,
        limit: int,
        lease: float,
        ids: Sequence[int] | None = None,
    ) -> list[OutboxEvent]:
        """Lease up to ``limit`` due events to ``owner`` for ``lease`` seconds.

        Due means pending, ``next_attempt_at`` reached and no live lease; oldest due
        first. ``ids`` narrows the choice to those events (still only if due: to retry
        one early, :meth:`requeue` it first). Each claim counts as an attempt.
        ``owner`` must be unique per claimer (host, pid and a random part).
        """
        owner = _owner(owner)
        limit = _limit(limit)
        _positive("lease", lease)
        params: dict[str, Any] = {"limit": limit}
        statements = self._sql.claim_events
        if ids is not None:
            params["ids"] = [int(i) for i in ids]
            if not params["ids"]:
                return []
            statements = self._sql.claim_events_by_id
        rows = self._lease(statements, params, owner=owner, lease=lease, stamp_attempt=True)
        return [OutboxEvent.from_row(row) for row in rows]

    def settle(self, owner: str, endings: Sequence[Ending]) -> set[int]:
        """Record how ``owner``'s attempts at these events ended, in one transaction.

        Returns the ids whose lease ``owner`` still held: only those changed. An event
        whose lease ran out and was taken over keeps what its new owner records. A
        delivered event that owes a credit writes it in the same transaction, at most
        once per referee identity and once per token (one MMOLove referral), ever.
        """
        owner = _owner(owner)
        ids = [ending.event_id for ending in endings]
        if len(set(ids)) != len(ids):
            raise ValueError("settle: each event may end only once per call")
        if not ids:
            return set()
        now = self.clock()
        with self._transaction() as conn:
            held = {
                int(row.id): row
                for row in conn.execute(self._sql.settle_pick(ids))
                if row.lease_owner == owner and row.state == PENDING
            }
            by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for ending in endings:
                if ending.event_id not in held:
                    continue
                values = dict(ending.values)
                if values.get("state") == DELIVERED:
                    values["delivered_at"] = now
                by_columns.setdefault(tuple(sorted(values)), []).append(
                    {
                        "k_id": ending.event_id,
                        "k_owner": owner,
                        **{f"v_{name}": value for name, value in values.items()},
                    }
                )
            # One statement per kind of ending, each given every row of that kind.
            for columns, rows in by_columns.items():
                conn.execute(self._sql.lease_end(columns), rows)
            for ending in endings:
                if ending.credit and ending.event_id in held:
                    row = held[ending.event_id]
                    credit = {
                        "identity": row.identity,
                        "token": row.token,
                        "event_id": ending.event_id,
                        "outcome": ending.values["outcome"],
                        "created_at": now,
                        "attempts": 0,
                        "next_attempt_at": now,
                    }
                    # Either key already credited: nothing more (never an error).
                    insert_if_absent(conn, self.credits, credit, None)
        return set(held)

    def complete(
        self,
        event_id: int,
        owner: str,
        *,
        status: int,
        response: str,
        outcome: str,
        credit: bool,
    ) -> bool:
        """Record an accepted event (see :meth:`settle`); False if the lease is not ours."""
        ending = Ending.delivered(
            event_id, status=status, response=response, outcome=outcome, credit=credit
        )
        return event_id in self.settle(owner, [ending])

    def reschedule(
        self,
        event_id: int,
        owner: str,
        *,
        at: float,
        status: int | None,
        reason: str,
        error: str,
    ) -> bool:
        """Give up ``owner``'s lease and make the event due again at ``at``."""
        ending = Ending.retry(event_id, at=at, status=status, reason=reason, error=error)
        return event_id in self.settle(owner, [ending])

    def dead_letter(
        self, event_id: int, owner: str, *, status: int | None, reason: str, error: str
    ) -> bool:
        """Stop retrying the event; only :meth:`requeue` brings it back."""
        ending = Ending.dead(event_id, status=status, reason=reason, error=error)
        return event_id in self.settle(owner, [ending])

    def renew(self, owner: str, ids: Sequence[int], *, lease: float) -> int:
        """Extend ``owner``'s leases on ``ids`` to ``lease`` seconds from now, while it is
        still at work on them; return how many it still held. A holder that dies stops
        renewing, and its leases run out as before."""
        owner = _owner(owner)
        _positive("lease", lease)
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        with self._transaction() as conn:
            until = self._now(conn) + lease
            done = conn.execute(
                self._sql.renew_leases, {"ids": ids, "owner": owner, "until": until}
            )
            return int(done.rowcount)

    def release_dry_runs(self) -> int:
        """Make every event held after a dry run due now, to be sent for real (test
        mode is off); return how many."""
        with self._transaction() as conn:
            done = conn.execute(self._sql.release_dry_runs, {"now": self.clock()})
            return int(done.rowcount)

    def requeue(self, ids: Sequence[int] | None = None) -> int:
        """Make events due now; return how many changed.

        Without ``ids``: every undelivered event not in flight, that is every dead
        event and every pending one due later (backing off, or held after a 401). With
        ``ids``: those that are dead, or pending and waiting for a retry ("retry now").
        Either way an event in flight keeps its lease and a delivered one stays
        delivered. A dead event starts over at zero attempts.
        """
        if ids is not None:
            ids = [int(i) for i in ids]
            if not ids:
                return 0
        with self._transaction() as conn:
            return int(conn.execute(self._sql.requeue(ids, self._now(conn))).rowcount)
