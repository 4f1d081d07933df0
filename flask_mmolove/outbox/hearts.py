"""Votes under a lease: recording what MMOLove's reward callbacks deliver, once per
``heart_id``, then claiming each to announce it and recording it as announced."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from ..protocol import HEART_TEST
from ._base import StoreBase
from .clauses import insert_if_absent
from .values import HEART_ID_MAX, Heart, HeartStats, _limit, _owner, _positive, _text, _time


class Hearts(StoreBase):
    """``record_heart``, ``claim_hearts``, ``finish_heart``, ``release_heart`` and
    ``heart_stats``."""

    def record_heart(
        self,
        *,
        heart_id: str,
        event: str,
        username: str,
        payload: bytes,
        connection: Connection | None = None,
    ) -> bool:
        """Keep a verified vote; False when ``heart_id`` was kept already (MMOLove's
        retry of a vote whose answer it did not get), and nothing changes.

        With ``connection``, in the caller's transaction: kept if and when the caller
        commits. A test callback (``heart.test``) is kept as already announced: there is
        nothing to grant for it.
        """
        heart_id = _text("heart_id", heart_id, HEART_ID_MAX)
        now = self.clock()
        values = {
            "heart_id": heart_id,
            "event": event,
            "username": username,
            "payload": bytes(payload),
            "received_at": now,
            "granted_at": now if event == HEART_TEST else None,
            "attempts": 0,
            "next_attempt_at": now,
        }
        with self._transaction_on(connection) as conn:
            statement = self._sql.record_heart
            if statement is not None:
                return conn.execute(statement, values).first() is not None
            if conn.execute(self._sql.heart_known, {"heart_id": heart_id}).first() is not None:
                return False
            insert_if_absent(conn, self.hearts, values, ("heart_id",))
            return True

    def claim_hearts(self, owner: str, *, limit: int, lease: float) -> list[Heart]:
        """Lease up to ``limit`` unannounced votes to ``owner``, oldest due first.

        Announce each, then :meth:`finish_heart`; if announcing failed,
        :meth:`release_heart`. A lease that runs out makes the vote claimable again.
        """
        owner = _owner(owner)
        limit = _limit(limit)
        _positive("lease", lease)
        rows = self._lease(self._sql.claim_hearts, {"limit": limit}, owner=owner, lease=lease)
        return [Heart.from_row(row) for row in rows]

    def finish_heart(
        self, heart_id: str, owner: str, *, connection: Connection | None = None
    ) -> bool:
        """Record that ``owner`` announced the vote; False if the lease is not ours.

        With ``connection``, in the caller's transaction (see :meth:`finish_credit`).
        """
        with self._transaction_on(connection) as conn:
            done = conn.execute(self._sql.end_heart_lease(heart_id, owner, granted_at=self.clock()))
            return done.rowcount == 1

    def release_heart(self, heart_id: str, owner: str, *, retry_at: float) -> bool:
        """Announcing failed: give the lease up and try again at ``retry_at``."""
        retry_at = _time("retry_at", retry_at)
        with self._transaction() as conn:
            done = conn.execute(
                self._sql.end_heart_lease(heart_id, owner, next_attempt_at=retry_at)
            )
            return done.rowcount == 1

    def heart_stats(self) -> HeartStats:
        """Votes received (``heart.counted``), announced, and test callbacks."""
        counts = {HEART_TEST: (0, 0)}
        with self._transaction(read_only=True) as conn:
            for event, n, granted in conn.execute(self._sql.heart_counts()):
                counts[str(event)] = (int(n), int(granted))
        received, granted = (0, 0)
        for event, (n, announced) in counts.items():
            if event != HEART_TEST:
                received += n
                granted += announced
        return HeartStats(received=received, granted=granted, tests=counts[HEART_TEST][0])
