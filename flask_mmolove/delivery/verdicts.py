"""Judging MMOLove's answer to one attempt: how the event ends, when it is tried again,
and what the portal is told once that is recorded.

Every verdict on an answer comes from :func:`flask_mmolove.protocol.classify`; this
module turns it into an outbox :class:`~flask_mmolove.outbox.Ending` and a message.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from ..client import SendResult
from ..outbox import Ending, OutboxEvent
from ..protocol import Action, Decision, Outcome, classify
from ..settings import Settings
from ..signals import referee_registered, referral_rejected, referrer_credited
from ._senders import Answer

logger = logging.getLogger("flask_mmolove")

#: The jitter factor's range: a delay is its nominal value times [0.75, 1.25).
JITTER_LOW: Final = 0.75
JITTER_SPAN: Final = 0.5


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
class Verdict:
    """An answer judged: how its event ends, which ``PassReport`` count it adds to,
    and what to log and signal once the ending is recorded."""

    ending: Ending
    count: Literal["delivered", "tested", "retried", "dead", "released"]
    tell: Callable[[], None]


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Judge:
    """Judges the answers of one deliverer, with its settings, clock and jitter;
    ``scrub`` keeps the secret out of what is stored and told, ``emit`` sends a
    signal in the app's context."""

    settings: Settings
    clock: Callable[[], float]
    jitter: Callable[[], float]
    scrub: Callable[[str], str]
    emit: Callable[..., Any]

    def __call__(self, event: OutboxEvent, answer: Answer | None) -> Verdict:
        """What MMOLove's answer (or its absence) means for ``event``, decided before
        anything is recorded; ``tell`` logs it and signals it once it is."""
        if answer is None:
            # Claimed but never sent: back, due now, its last answer unchanged.
            ending = Ending.retry(
                event.id,
                at=self.clock(),
                status=event.last_status,
                reason=event.last_reason or "not_sent",
                error=event.last_error
                or "not sent: handed back (the deliverer stopping, or its lease not renewed)",
            )
            return Verdict(ending, "released", _nothing)
        result, error = answer
        status = result.status if result is not None else None
        decision = classify(
            status,
            retry_after=result.headers.get("Retry-After") if result is not None else None,
            outcome=result.outcome if result is not None else None,
        )
        # MMOLove's answer is kept and handed to signals; should it ever echo the
        # secret (a proxy's error page, a debug answer), the secret goes no further.
        text = self.scrub(result.body if result is not None else (error or ""))
        if result is not None and result.body != text:
            result = dataclasses.replace(result, body=text)
        if decision.action is Action.DELIVERED:
            assert result is not None
            assert result.outcome is not None
            if result.outcome is Outcome.TEST:
                return self._dry_run_passed(event, result, text)
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
                return Verdict(ending, "retried", retried)
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
            self.emit(
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
        return Verdict(ending, "dead", died)

    def _delivered(
        self, event: OutboxEvent, result: SendResult, outcome: Outcome, text: str
    ) -> Verdict:
        def accepted() -> None:
            logger.info("event %d (%s) accepted: %s", event.id, event.event, outcome.value)
            if event.event == "registered":
                self.emit(
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
        return Verdict(ending, "delivered", accepted)

    def _dry_run_passed(self, event: OutboxEvent, result: SendResult, text: str) -> Verdict:
        # A dry run uses nothing up: the event is held, not delivered, and goes for
        # real once MMOLOVE_TEST_MODE is off; its credit is announced (as a dry run),
        # never recorded, so the real one is still owed.
        def passed() -> None:
            logger.info("event %d (%s) passed as a dry run: held", event.id, event.event)
            signal = referee_registered if event.event == "registered" else referrer_credited
            self.emit(
                signal,
                identity=event.identity,
                token=event.token,
                result=result,
                outcome=Outcome.TEST,
            )

        ending = Ending.dry_run_passed(event.id, status=result.status, response=text)
        return Verdict(ending, "tested", passed)
