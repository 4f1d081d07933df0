"""One delivery run: claim due events, send them, judge and record every answer, signal.

Every verdict on an answer comes from :func:`flask_mmolove.protocol.classify`; this
module only carries it out: record it in the outbox, then tell the portal by signal.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flask import Flask
from sqlalchemy.orm import Session

from .._deadline import TICK
from ..client import ReferralClient, TransportError
from ..outbox import Outbox, OutboxEvent
from ..protocol import with_server_id
from ..redaction import Redactor
from ..settings import Settings
from . import process
from ._senders import Answer, Senders
from .announcer import Announcer
from .verdicts import Judge

logger = logging.getLogger("flask_mmolove")


@dataclass
class PassReport:
    """What one delivery pass did."""

    claimed: int = 0
    delivered: int = 0
    #: Passed as dry runs (``MMOLOVE_TEST_MODE``): held until test mode is off.
    tested: int = 0
    retried: int = 0
    dead: int = 0
    credited: int = 0
    #: Votes announced (``heart_counted``).
    hearts: int = 0
    #: Claimed but not sent, because the deliverer was stopping: handed back at once.
    released: int = 0

    def __iadd__(self, other: PassReport) -> PassReport:
        self.claimed += other.claimed
        self.delivered += other.delivered
        self.tested += other.tested
        self.retried += other.retried
        self.dead += other.dead
        self.credited += other.credited
        self.hearts += other.hearts
        self.released += other.released
        return self

    @property
    def settled_undelivered(self) -> bool:
        """Every claimed event went back to wait (or died): nothing more is due now."""
        return self.claimed == self.tested + self.retried + self.dead + self.released


class _PassLease:
    """When the leases of one pass's events run out at the earliest, by this process's
    monotonic clock, so no send starts that could outlive them.

    The database times a lease from within the call that takes or renews it, so the
    call's start plus the lease is never later than the database's expiry, whatever
    either wall clock reads. A holder cut off from the database (a link down, a lock)
    cannot renew: once its leases may have run out, another deliverer may be sending
    the same events, and this one must not start them.
    """

    def __init__(self, lease: float, started: float) -> None:
        self.lease = lease
        self.expires = started + lease
        #: A renewal failed: the pass's unsent events go back without asking again.
        self.lost = False

    def renewed(self, started: float) -> None:
        self.expires = max(self.expires, started + self.lease)

    def until(self) -> float:
        """When an attempt must have ended: the watchdog acts up to TICK late."""
        return self.expires - TICK


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
        self._release_dry_runs_at = float("-inf")
        self._judge = Judge(settings, clock, jitter, Redactor(settings.secret), self._emit)
        self._announcer = Announcer(
            app,
            outbox,
            settings,
            owner=lambda: self.owner,
            clock=clock,
            portal_session=portal_session,
        )
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
        now = self.clock()
        if not settings.test_mode and now >= self._release_dry_runs_at:
            # Test mode was on, here or in another process still running with it (a
            # rolling deploy): what passed as a dry run is held, and goes for real now.
            # Looked for at most once a poll interval: it is a write.
            self.outbox.release_dry_runs()
            self._release_dry_runs_at = now + settings.poll_interval
        senders = Senders(settings.concurrency, should_stop)
        try:
            while True:
                report = PassReport()
                started = time.monotonic()
                events = self.outbox.claim(
                    self.owner, limit=settings.batch_size, lease=settings.lease, ids=ids
                )
                report.claimed = len(events)
                if events:
                    held = _PassLease(settings.lease, started)
                    senders.submit(events, functools.partial(self._send_held, held, should_stop))
                    # A pass may send for longer than a lease (MMOLove slow, many
                    # events): its holder renews them while it works, so no second
                    # deliverer takes over a live claim; a dead holder renews nothing.
                    answers = senders.collect(
                        heartbeat=functools.partial(self._renew, [e.id for e in events], held),
                        every=settings.lease / 3,
                    )
                    self._record(answers, report)
                report.credited = self.notify_credits()
                report.hearts = self.notify_hearts()
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

    def _send_held(
        self, held: _PassLease, should_stop: Callable[[], bool], event: OutboxEvent
    ) -> Answer | None:
        """Send ``event`` in an attempt that ends within its lease; None (not sent,
        handed back) if the lease cannot be vouched for.

        The attempt ends by the lease's end as this process knows it, and at most
        connect + read after it starts. With less than half of that left, the event's
        lease is renewed first; if that fails, it and the pass's other unsent events go
        back, without asking the database again for each.
        """
        until = held.until()
        if held.lost:
            return None
        if until - time.monotonic() < sum(self.settings.timeout) / 2:
            started = time.monotonic()
            try:
                renewed = self.outbox.renew(self.owner, [event.id], lease=self.settings.lease)
            except Exception as exc:
                logger.info("event %d: could not renew its lease: %s", event.id, exc)
                renewed = 0
            if renewed != 1:
                if not held.lost:
                    held.lost = True
                    logger.warning(
                        "this pass's leases could not be renewed (the database out of "
                        "reach, or taken over): its unsent events are handed back"
                    )
                return None
            # The renewal may have taken long: a stop asked meanwhile starts nothing.
            if should_stop():
                return None
            until = _PassLease(self.settings.lease, started).until()
        return self._send(event, until=until)

    def _send(self, event: OutboxEvent, *, until: float | None = None) -> Answer:
        client = self.client
        assert client is not None, "a paused deliverer claims nothing"
        try:
            # With the server id in force now, not when the event was written (a typo
            # since fixed): serialised once for this attempt, signed and sent as is.
            body = with_server_id(event.body, self.settings.server_id, test=self.settings.test_mode)
            return client.send_body(body, until=until), None
        except TransportError as exc:
            return None, str(exc)
        except Exception as exc:
            # A bug or an unusable setting: no answer came back, so the event is
            # retried with backoff like any failure to reach MMOLove, and the pass
            # (and the other sends) carry on.
            logger.exception("event %d: sending failed unexpectedly", event.id)
            return None, f"{type(exc).__name__}: {exc}"

    def _renew(self, ids: Sequence[int], lease: _PassLease) -> None:
        started = time.monotonic()
        try:
            held = self.outbox.renew(self.owner, ids, lease=self.settings.lease)
        except Exception:
            # The database is out of reach: the leases may run out, and a late answer
            # is then refused as for any lost lease.
            logger.exception("could not renew the leases of %d event(s) in flight", len(ids))
            return
        if held < len(ids):
            # Which were lost is not known: the unsent go back once the earlier
            # leases may have run out.
            logger.warning("%d event(s) in flight: lease lost before renewal", len(ids) - held)
        else:
            lease.renewed(started)

    def notify_credits(self) -> int:
        """Send ``referrer_credited`` for every credit not yet announced (at most a
        batch per call); see :mod:`.announcer`."""
        return self._announcer.credits()

    def notify_hearts(self) -> int:
        """Send ``heart_counted`` for every vote not yet announced (at most a batch
        per call); see :mod:`.announcer`."""
        return self._announcer.hearts()

    def _emit(self, signal: object, **kwargs: object) -> None:
        # A receiver's bug must not undo a recorded delivery; it is logged instead.
        try:
            with self.app.app_context():
                signal.send(self.app, **kwargs)  # type: ignore[attr-defined]
        except Exception:
            logger.exception("a flask_mmolove signal receiver raised")
