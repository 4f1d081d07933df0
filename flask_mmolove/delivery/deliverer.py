"""One delivery run: claim due events, send them, judge and record every answer, signal.

Every verdict on an answer comes from :func:`flask_mmolove.protocol.classify`; this
module only carries it out: record it in the outbox, then tell the portal by signal.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from flask import Flask
from sqlalchemy.orm import Session

from ..client import ReferralClient, SendResult, TransportError
from ..outbox import Credit, Ending, Outbox, OutboxEvent
from ..protocol import Action, Decision, Outcome, classify, with_server_id
from ..redaction import Redactor
from ..settings import Settings
from ..signals import referee_registered, referral_rejected, referrer_credited
from . import process
from ._senders import Answer, Senders

logger = logging.getLogger("flask_mmolove")

#: The jitter factor's range: a delay is its nominal value times [0.75, 1.25).
JITTER_LOW: Final = 0.75
JITTER_SPAN: Final = 0.5


@dataclass
class PassReport:
    """What one delivery pass did."""

    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    credited: int = 0
    #: Claimed but not sent, because the deliverer was stopping: handed back at once.
    released: int = 0

    def __iadd__(self, other: PassReport) -> PassReport:
        self.claimed += other.claimed
        self.delivered += other.delivered
        self.retried += other.retried
        self.dead += other.dead
        self.credited += other.credited
        self.released += other.released
        return self

    @property
    def settled_undelivered(self) -> bool:
        """Every claimed event went back to wait (or died): nothing more is due now."""
        return self.claimed == self.retried + self.dead + self.released


def backoff_delay(
    attempts: int, decision: Decision, settings: Settings, jitter: Callable[[], float]
) -> float:
    """Seconds to wait before the next attempt, after ``attempts`` attempts so far.

    Exponential from ``MMOLOVE_RETRY_BASE``, doubling, capped at ``MMOLOVE_RETRY_CAP``,
    each multiplied by a jitter factor in [0.75, 1.25) so that a crowd of events
    failed together does not come back together. Answers that need a person
    (401, redirects) wait ``MMOLOVE_SLOW_RETRY``. ``Retry-After`` is a floor.
    """
    if decision.slow:
        nominal = settings.slow_retry
        cap = settings.slow_retry * (JITTER_LOW + JITTER_SPAN)
    else:
        # 2.0 ** 1024 overflows; long before that any positive base has met the cap.
        exponent = attempts - 1
        growth = settings.retry_base * 2.0**exponent if exponent < 1024 else math.inf
        nominal = min(settings.retry_cap, growth)
        cap = settings.retry_cap
    delay = min(cap, nominal * (JITTER_LOW + JITTER_SPAN * jitter()))
    if decision.retry_after is not None:
        delay = max(delay, decision.retry_after)
    return delay


@dataclass(frozen=True)
class _Verdict:
    """An answer judged: how its event ends, which ``PassReport`` count it adds to,
    and what to log and signal once the ending is recorded."""

    ending: Ending
    count: Literal["delivered", "retried", "dead", "released"]
    tell: Callable[[], None]


def _nothing() -> None:
    pass


def _new_owner() -> str:
    """A lease owner no other process, nor an earlier one, can share."""
    return f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Deliverer:
    """Claims due events, sends them, and settles each answer. Safe in many processes."""

    def __init__(
        self,
        app: Flask,
        outbox: Outbox,
        client: ReferralClient | None,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        portal_session: Callable[[], Session] | None = None,
    ) -> None:
        # The app is the signals' sender and gives receivers an app context.
        self.app = app
        #: With the outbox in the portal's database: the session whose transaction
        #: ``referrer_credited``'s receivers share with the credit's record.
        self.portal_session = portal_session
        self.outbox = outbox
        #: None while delivery is paused (``settings.paused``): then nothing is claimed.
        self.client = client
        self.settings = settings
        self.clock = clock
        self.jitter = jitter
        self.owner = _new_owner()
        self._scrub = Redactor(settings.secret)
        process.renew_after_fork(self)

    def after_fork(self) -> None:
        """In a forked child: a new lease owner and no inherited connections.

        Every deliverer, whatever the delivery mode: a ``--preload`` master may have
        delivered (inline, or a pass of its own) before forking its workers. The
        parent's pooled keep-alive sockets to MMOLove and to the database are left to
        the parent (not closed: that would end them for the parent too).
        """
        self.owner = _new_owner()
        self.outbox.engine.dispose(close=False)
        old = self.client
        if old is None:
            return
        self.client = ReferralClient(
            old.server_id,
            self.settings.secret,
            old.endpoint,
            timeout=old.timeout,
            key_id=old.key_id,
        )

    def run_once(
        self,
        *,
        ids: Sequence[int] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> PassReport:
        """One pass: claim what is due now (or just ``ids``), send it, record every
        answer in one transaction, then send owed credit signals.

        Sends run ``MMOLOVE_CONCURRENCY`` at a time on daemon threads, never a
        ``ThreadPoolExecutor``: the interpreter joins an executor's threads at exit, so
        a send hanging on a silent MMOLove would hold the process past its drain bound.
        Once ``should_stop()`` is true no new send starts; claimed events not sent are
        handed back, due at once, for the next deliverer instead of waiting out a lease.
        """
        return self._run(ids=ids, refill=False, should_stop=should_stop)

    def drain(
        self,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        on_pass: Callable[[PassReport], None] | None = None,
    ) -> PassReport:
        """Passes, on the same send threads, until one claims less than a full batch.

        ``on_pass`` gets each pass's report. The passes do not overlap: in one process,
        recording while sends run made every database call wait for the GIL behind
        the send threads, and cost more than it saved (docs/benchmarks.md).
        """
        return self._run(ids=None, refill=True, should_stop=should_stop, on_pass=on_pass)

    def _run(
        self,
        *,
        ids: Sequence[int] | None,
        refill: bool,
        should_stop: Callable[[], bool],
        on_pass: Callable[[PassReport], None] | None = None,
    ) -> PassReport:
        settings = self.settings
        total = PassReport()
        if self.client is None:
            # Missing credentials: the events wait in the outbox for a restart with them.
            logger.debug("%s: nothing is claimed", settings.paused)
            return total
        senders = Senders(self._send, settings.concurrency, should_stop)
        try:
            while True:
                report = PassReport()
                events = self.outbox.claim(
                    self.owner, limit=settings.batch_size, lease=settings.lease, ids=ids
                )
                report.claimed = len(events)
                if events:
                    senders.submit(events)
                    self._record(senders.collect(), report)
                report.credited = self.notify_credits()
                total += report
                if on_pass is not None and report.claimed:
                    on_pass(report)
                if not refill or len(events) < settings.batch_size or should_stop():
                    return total
        finally:
            senders.close()

    def _record(
        self, answers: Sequence[tuple[OutboxEvent, Answer | None]], report: PassReport
    ) -> None:
        """Record answers in one transaction, then log and signal what was recorded.

        A receiver never hears of an unrecorded answer, nor waits on the write lock.
        """
        judged = [self._judge(event, answer) for event, answer in answers]
        held = self.outbox.settle(self.owner, [verdict.ending for verdict in judged])
        for verdict in judged:
            if verdict.ending.event_id not in held:
                logger.warning(
                    "event %d: lease lost before its answer was recorded",
                    verdict.ending.event_id,
                )
                continue
            setattr(report, verdict.count, getattr(report, verdict.count) + 1)
            verdict.tell()

    def _send(self, event: OutboxEvent) -> Answer:
        client = self.client
        assert client is not None, "a paused deliverer claims nothing"
        try:
            # With the server id in force now, not when the event was written (a typo
            # since fixed): serialised once for this attempt, signed and sent as is.
            body = with_server_id(event.body, self.settings.server_id)
            return client.send_body(body), None
        except TransportError as exc:
            return None, str(exc)
        except Exception as exc:
            # A bug or an unusable setting: no answer came back, so the event is
            # retried with backoff like any failure to reach MMOLove, and the pass
            # (and the other sends) carry on.
            logger.exception("event %d: sending failed unexpectedly", event.id)
            return None, f"{type(exc).__name__}: {exc}"

    def _judge(self, event: OutboxEvent, answer: Answer | None) -> _Verdict:
        """What MMOLove's answer (or its absence) means for ``event``, decided before
        anything is recorded; ``tell`` logs it and signals it once it is."""
        if answer is None:
            # Claimed but never sent: back, due now, its last answer unchanged.
            ending = Ending.retry(
                event.id,
                at=self.clock(),
                status=event.last_status,
                reason=event.last_reason or "not_sent",
                error=event.last_error or "not sent: the deliverer stopped first",
            )
            return _Verdict(ending, "released", _nothing)
        result, error = answer
        status = result.status if result is not None else None
        decision = classify(
            status, retry_after=result.headers.get("Retry-After") if result is not None else None
        )
        # MMOLove's answer is kept and handed to signals; should it ever echo the
        # secret (a proxy's error page, a debug answer), the secret goes no further.
        text = self._scrub(result.body if result is not None else (error or ""))
        if result is not None and result.body != text:
            result = dataclasses.replace(result, body=text)
        if decision.action is Action.DELIVERED:
            assert result is not None
            assert result.outcome is not None
            return self._delivered(event, result, result.outcome, text)
        if decision.action is Action.RETRY:
            delay = backoff_delay(event.attempts, decision, self.settings, self.jitter)
            due = self.clock() + delay
            if due <= event.created_at + self.settings.max_age:

                def retried() -> None:
                    log = logger.error if decision.slow else logger.warning
                    log(
                        "event %d (%s) attempt %d: %s; next attempt in %.1f s",
                        event.id,
                        event.event,
                        event.attempts,
                        decision.hint,
                        delay,
                    )

                ending = Ending.retry(
                    event.id, at=due, status=status, reason=decision.reason, error=text
                )
                return _Verdict(ending, "retried", retried)
            decision = Decision(
                Action.DEAD,
                "expired",
                f"still undelivered after MMOLOVE_MAX_AGE ({self.settings.max_age:g} s); "
                f"last answer: {decision.hint}. Requeue with `flask mmolove retry`",
            )

        def died() -> None:
            logger.error(
                "event %d (%s) dead-lettered after %d attempt(s): %s (status %s)",
                event.id,
                event.event,
                event.attempts,
                decision.hint,
                status,
            )
            self._emit(
                referral_rejected,
                identity=event.identity,
                token=event.token,
                event=event.event,
                event_id=event.id,
                status=status,
                error=text,
                hint=decision.hint,
            )

        ending = Ending.dead(event.id, status=status, reason=decision.reason, error=text)
        return _Verdict(ending, "dead", died)

    def _delivered(
        self, event: OutboxEvent, result: SendResult, outcome: Outcome, text: str
    ) -> _Verdict:
        def accepted() -> None:
            logger.info("event %d (%s) accepted: %s", event.id, event.event, outcome.value)
            if event.event == "registered":
                self._emit(
                    referee_registered,
                    identity=event.identity,
                    token=event.token,
                    result=result,
                    outcome=outcome,
                )

        ending = Ending.delivered(
            event.id,
            status=result.status,
            response=text,
            outcome=outcome.value,
            credit=event.event == "qualified" and outcome is not Outcome.FIRST_TOUCH_CONFLICT,
        )
        return _Verdict(ending, "delivered", accepted)

    def notify_credits(self) -> int:
        """Send ``referrer_credited`` for every credit not yet announced."""
        sent = 0
        for credit in self.outbox.claim_credits(
            self.owner, limit=self.settings.batch_size, lease=self.settings.lease
        ):
            if self._announce(credit):
                sent += 1
        return sent

    def _announce(self, credit: Credit) -> bool:
        """Send ``referrer_credited`` for ``credit`` and record it as announced.

        With the portal's session, the receivers run in one of its transactions and
        the record joins it: what they write through that session commits with the
        record, once, or not at all.
        """
        event = self.outbox.get(credit.event_id)
        result = SendResult(
            status=(event.last_status or 200) if event is not None else 200,
            body=(event.response or "") if event is not None else "",
            outcome=Outcome(credit.outcome),
        )
        try:
            with self.app.app_context():
                if self.portal_session is None:
                    self._credit(credit, result)
                    recorded = self.outbox.finish_credit(credit.identity, self.owner)
                else:
                    recorded = self._credit_in_portal_transaction(
                        self.portal_session(), credit, result
                    )
        except Exception:
            retry_at = self.clock() + self.settings.retry_cap
            logger.exception(
                "a referrer_credited receiver failed for referee %r; it will be sent again",
                credit.identity,
            )
            self.outbox.release_credit(credit.identity, self.owner, retry_at=retry_at)
            return False
        if not recorded:
            logger.warning(
                "the credit of referee %r: lease lost before it was recorded", credit.identity
            )
        return recorded

    def _credit(self, credit: Credit, result: SendResult) -> None:
        referrer_credited.send(
            self.app,
            identity=credit.identity,
            token=credit.token,
            result=result,
            outcome=result.outcome,
        )

    def _credit_in_portal_transaction(
        self, session: Session, credit: Credit, result: SendResult
    ) -> bool:
        try:
            self._credit(credit, result)
            recorded = self.outbox.finish_credit(
                credit.identity, self.owner, connection=session.connection()
            )
            if recorded:
                session.commit()
            else:
                # Another deliverer holds the credit now: it announces, these grants go.
                session.rollback()
            return recorded
        except BaseException:
            session.rollback()
            raise

    def _emit(self, signal: object, **kwargs: object) -> None:
        # A receiver's bug must not undo a recorded delivery; it is logged instead.
        try:
            with self.app.app_context():
                signal.send(self.app, **kwargs)  # type: ignore[attr-defined]
        except Exception:
            logger.exception("a flask_mmolove signal receiver raised")
