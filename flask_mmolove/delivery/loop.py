"""The ``flask mmolove worker`` loop."""

from __future__ import annotations

import time
from collections.abc import Callable

from .deliverer import Deliverer, PassReport


def run_worker(
    deliverer: Deliverer,
    *,
    burst: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    on_pass: Callable[[PassReport], None] | None = None,
) -> PassReport:
    """The ``flask mmolove worker`` loop: deliver until stopped (or, in burst, until idle)."""
    total = PassReport()
    settings = deliverer.settings
    while not should_stop():
        report = deliverer.drain(should_stop=should_stop, on_pass=on_pass)
        total += report
        if burst:
            # Burst ends at the first pass that finds nothing due.
            if report.claimed == 0:
                break
            continue
        due = deliverer.outbox.next_due_at()
        timeout = settings.poll_interval
        if due is not None:
            timeout = min(timeout, max(0.0, due - deliverer.clock()))
        deadline = time.monotonic() + timeout
        while not should_stop() and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    deliverer.close()
    return total
