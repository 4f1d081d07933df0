"""The delivery loop: drain passes and, between them, a wait; the worker's and the
background thread's one loop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

from sqlalchemy import exc as sa_exc

from ..outbox import OutboxUnreachable
from .deliverer import Deliverer, PassReport

logger = logging.getLogger("flask_mmolove")

#: How often a wait with no wake event asks ``should_stop()``: the worker's stop flag
#: is set from a signal handler, which must not set an Event (its Condition's lock is
#: not reentrant: a signal landing while the main thread holds it would deadlock).
STOP_CHECK: Final = 0.2


def _never(report: PassReport) -> bool:
    return False


def _fatal(exc: Exception) -> bool:
    return False


def survive_everything(exc: Exception) -> bool:
    """The background thread's rule: a failing pass never takes the portal down."""
    return True


def survive_unreachable(exc: Exception) -> bool:
    """The worker's rule: the database out of reach for now (refused, lost, locked, a
    timeout) is survived; what needs the operator (an outdated schema, missing tables,
    a bug) ends the worker with its error, for its supervisor to report."""
    return isinstance(exc, OutboxUnreachable | sa_exc.OperationalError | sa_exc.InterfaceError)


def _unbounded() -> float | None:
    return None


def deliver_until(
    deliverer: Deliverer,
    *,
    should_stop: Callable[[], bool],
    finished: Callable[[PassReport], bool] = _never,
    wait: bool = True,
    wake: threading.Event | None = None,
    bound: Callable[[], float | None] = _unbounded,
    on_pass: Callable[[PassReport], None] | None = None,
    survive: Callable[[Exception], bool] = _fatal,
) -> PassReport:
    """Drain passes until ``should_stop()``, or until ``finished(report)`` for a drain.

    Between drains (unless ``wait`` is false) it waits until the earliest of: the next
    event's due time, ``MMOLOVE_POLL_INTERVAL``, ``wake`` being set, ``should_stop()``,
    and ``bound()`` (a ``time.monotonic()`` deadline, or None). A ``wake`` event must
    also be set by whoever makes ``should_stop()`` true: the wait then asks it only
    once. A pass failing with an error ``survive(error)`` accepts is logged and the
    loop goes on (after the wait); any other error is raised.
    """
    total = PassReport()
    while not should_stop():
        if wake is not None:
            wake.clear()
        try:
            report = deliverer.drain(should_stop=should_stop, on_pass=on_pass)
        except Exception as exc:
            if not survive(exc):
                raise
            logger.exception("delivery pass failed; the events stay in the outbox")
            report = PassReport()
        total += report
        if finished(report):
            break
        if wait:
            _wait(_until(deliverer, bound(), survive), should_stop, wake)
    return total


def _until(
    deliverer: Deliverer, bound: float | None, survive: Callable[[Exception], bool]
) -> float:
    """When the wait ends at the latest, in ``time.monotonic()`` time."""
    timeout = deliverer.settings.poll_interval
    try:
        due = deliverer.outbox.next_due_at()
    except Exception as exc:
        if not survive(exc):
            raise
        due = None
    if due is not None:
        timeout = min(timeout, max(0.0, due - deliverer.clock()))
    until = time.monotonic() + timeout
    return until if bound is None else min(until, bound)


def _wait(until: float, should_stop: Callable[[], bool], wake: threading.Event | None) -> None:
    while not should_stop():
        left = until - time.monotonic()
        if left <= 0:
            return
        if wake is None:
            time.sleep(min(STOP_CHECK, left))
        elif wake.wait(left):
            return


def run_worker(
    deliverer: Deliverer,
    *,
    burst: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    on_pass: Callable[[PassReport], None] | None = None,
) -> PassReport:
    """The ``flask mmolove worker`` loop: deliver until stopped (or, in burst, until idle).

    A pass failing because the database is out of reach (restarting, a link down, a
    lock) is logged and tried again after a poll interval: a worker outlives what a
    host's network does to it, and what it held when cut off is refused when it is
    back. An error that needs the operator ends it (see :func:`survive_unreachable`).
    Burst drains one after
    the other, no wait between, ends at the first that finds nothing due, and fails on
    the first error (its exit status is what cron reports).
    """
    if burst:
        return deliver_until(
            deliverer,
            should_stop=should_stop,
            finished=lambda report: report.claimed == 0,
            wait=False,
            on_pass=on_pass,
        )
    return deliver_until(
        deliverer, should_stop=should_stop, on_pass=on_pass, survive=survive_unreachable
    )
