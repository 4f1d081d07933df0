"""Announcing what the outbox owes the portal: ``referrer_credited`` for each credit,
``heart_counted`` for each vote, each exactly once with ``db=``.

One at a time, each claimed just before it is announced: its lease covers its own
receivers only, never a queue of others before it (receivers that take a second or
two each would outlive a lease shared by a batch, and a second deliverer would
announce the tail again). With the portal's session, the receivers run in one of its
transactions and the record joins it: what they write through that session commits
with the record, once, or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Flask
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from ..client import SendResult
from ..outbox import Credit, Heart, Outbox
from ..protocol import Outcome
from ..settings import Settings
from ..signals import heart_counted, referrer_credited

logger = logging.getLogger("flask_mmolove")

#: Sends the signal; records it as announced (in the given transaction, or one of the
#: outbox's own with None), False if the lease is not held; gives it back until then.
Send = Callable[[], None]
Finish = Callable[[Connection | None], bool]
Release = Callable[[float], bool]


class Announcer:
    """Claims credits and votes one by one and sends their signals."""

    def __init__(
        self,
        app: Flask,
        outbox: Outbox,
        settings: Settings,
        *,
        owner: Callable[[], str],
        clock: Callable[[], float],
        portal_session: Callable[[], Session] | None,
    ) -> None:
        self.app = app
        self.outbox = outbox
        self.settings = settings
        self._owner = owner
        self.clock = clock
        self.portal_session = portal_session

    def credits(self) -> int:
        """Send ``referrer_credited`` for each unannounced credit (a batch at most)."""
        sent = 0
        for _ in range(self.settings.batch_size):
            owner = self._owner()
            credits = self.outbox.claim_credits(owner, limit=1, lease=self.settings.lease)
            if not credits:
                break
            sent += self._credit(credits[0], owner)
        return sent

    def hearts(self) -> int:
        """Send ``heart_counted`` for each unannounced vote (a batch at most).

        A standalone outbox always has its votes' table, so a worker whose settings
        lack ``MMOLOVE_CALLBACK_SECRET`` still announces what the web processes kept.
        With ``db=`` the portal's migrations make that table: without the secret (no
        endpoint, perhaps no table yet) it is left alone.
        """
        sent = 0
        if self.portal_session is not None and not self.settings.callback_secrets:
            return sent
        for _ in range(self.settings.batch_size):
            owner = self._owner()
            hearts = self.outbox.claim_hearts(owner, limit=1, lease=self.settings.lease)
            if not hearts:
                break
            sent += self._heart(hearts[0], owner)
        return sent

    def _credit(self, credit: Credit, owner: str) -> bool:
        event = self.outbox.get(credit.event_id)
        result = SendResult(
            status=(event.last_status or 200) if event is not None else 200,
            body=(event.response or "") if event is not None else "",
            outcome=Outcome(credit.outcome),
        )

        def send() -> None:
            referrer_credited.send(
                self.app,
                identity=credit.identity,
                token=credit.token,
                result=result,
                outcome=result.outcome,
            )

        return self._announce(
            f"referee {credit.identity!r}",
            "a referrer_credited receiver failed",
            send,
            lambda conn: self.outbox.finish_credit(credit.identity, owner, connection=conn),
            lambda at: self.outbox.release_credit(credit.identity, owner, retry_at=at),
        )

    def _heart(self, heart: Heart, owner: str) -> bool:
        def send() -> None:
            heart_counted.send(
                self.app, username=heart.username, heart_id=heart.heart_id, payload=heart.fields
            )

        return self._announce(
            f"vote {heart.heart_id!r}",
            "a heart_counted receiver failed",
            send,
            lambda conn: self.outbox.finish_heart(heart.heart_id, owner, connection=conn),
            lambda at: self.outbox.release_heart(heart.heart_id, owner, retry_at=at),
        )

    def _announce(
        self, what: str, failure: str, send: Send, finish: Finish, release: Release
    ) -> bool:
        try:
            with self.app.app_context():
                if self.portal_session is None:
                    send()
                    recorded = finish(None)
                else:
                    recorded = self._in_portal_transaction(self.portal_session(), send, finish)
        except Exception:
            logger.exception("%s for %s; it will be sent again", failure, what)
            release(self.clock() + self.settings.retry_cap)
            return False
        if not recorded:
            logger.warning("%s: lease lost before it was recorded", what)
        return recorded

    @staticmethod
    def _in_portal_transaction(session: Session, send: Send, finish: Finish) -> bool:
        try:
            send()
            recorded = finish(session.connection())
            if recorded:
                session.commit()
            else:
                # Another deliverer holds it now: it announces, these grants go.
                session.rollback()
            return recorded
        except BaseException:
            session.rollback()
            raise
