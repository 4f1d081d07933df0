"""Credits under a lease: claiming unannounced credits, then recording each as
announced or giving it back to be announced later."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from ._base import StoreBase
from .values import Credit, _limit, _owner, _positive, _time


class Credits(StoreBase):
    """``claim_credits``, ``finish_credit`` and ``release_credit``."""

    def claim_credits(self, owner: str, *, limit: int, lease: float) -> list[Credit]:
        """Lease up to ``limit`` unannounced credits to ``owner``, oldest due first.

        Announce each, then :meth:`finish_credit`; if announcing failed,
        :meth:`release_credit`. A lease that runs out makes the credit claimable again.
        """
        owner = _owner(owner)
        limit = _limit(limit)
        _positive("lease", lease)
        rows = self._lease(self._sql.claim_credits, {"limit": limit}, owner=owner, lease=lease)
        return [Credit.from_row(row) for row in rows]

    def finish_credit(
        self, identity: str, owner: str, *, connection: Connection | None = None
    ) -> bool:
        """Record that ``owner`` announced the credit; False if the lease is not ours.

        With ``connection``, in the caller's transaction: recorded if and when the
        caller commits (with whatever its receivers wrote there).
        """
        with self._transaction_on(connection) as conn:
            done = conn.execute(
                self._sql.end_credit_lease(identity, owner, notified_at=self.clock())
            )
            return done.rowcount == 1

    def release_credit(self, identity: str, owner: str, *, retry_at: float) -> bool:
        """Announcing failed: give the lease up and try again at ``retry_at``."""
        retry_at = _time("retry_at", retry_at)
        with self._transaction() as conn:
            done = conn.execute(
                self._sql.end_credit_lease(identity, owner, next_attempt_at=retry_at)
            )
            return done.rowcount == 1
