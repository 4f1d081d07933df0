"""The per-process delivery thread of ``thread`` mode."""

from __future__ import annotations

import logging
import threading
import time

from . import process
from .deliverer import Deliverer, PassReport

logger = logging.getLogger("flask_mmolove")


class BackgroundDelivery:
    """A daemon thread per process that delivers while the portal serves requests.

    Started lazily, woken right after an enqueue, restarted in a forked child (a
    gunicorn worker forked from a ``--preload`` master), and drained for at most
    ``MMOLOVE_DRAIN_TIMEOUT`` seconds when the process exits.
    """

    def __init__(self, deliverer: Deliverer) -> None:
        self.deliverer = deliverer
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop_at: float | None = None
        #: Set when the thread starts, cleared when its loop returns: a plain attribute,
        #: because the request hook reads it on every request (``running`` asks the
        #: thread, which costs a lock).
        self.started = False
        process.renew_after_fork(self)

    def after_fork(self) -> None:
        # The parent's thread does not exist here and its lock may have been held at
        # the fork: start from fresh ones, never from inherited state.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        self._stop_at = None
        self.started = False

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def drain_timeout(self) -> float:
        """How long the drain at process exit may deliver: ``MMOLOVE_DRAIN_TIMEOUT``."""
        return self.deliverer.settings.drain_timeout

    def _past_drain_bound(self) -> bool:
        stop_at = self._stop_at
        return stop_at is not None and time.monotonic() >= stop_at

    def ensure_running(self) -> None:
        if self.running:
            return
        with self._lock:
            if self.running:
                return
            self._stop_at = None
            self._thread = threading.Thread(target=self._run, name="mmolove-delivery", daemon=True)
            self.started = True
            self._thread.start()

    def wake(self) -> None:
        self.ensure_running()
        self._wake.set()

    def stop(self, drain: float = 0.0) -> None:
        """Stop after delivering what is due, for at most ``drain`` seconds."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._stop_at = time.monotonic() + drain
        self._wake.set()
        thread.join(timeout=drain + 1.0)
        self.deliverer.close()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self.started = False

    def _loop(self) -> None:
        settings = self.deliverer.settings
        while True:
            self._wake.clear()
            try:
                report = self.deliverer.drain(should_stop=self._past_drain_bound)
            except Exception:
                logger.exception("delivery pass failed; the events stay in the outbox")
                report = PassReport()
            stop_at = self._stop_at
            if stop_at is not None and (report.settled_undelivered or time.monotonic() >= stop_at):
                # Draining: stop once nothing due remains deliverable, or at the bound.
                return
            timeout = settings.poll_interval
            try:
                due = self.deliverer.outbox.next_due_at()
            except Exception:
                due = None
            if due is not None:
                timeout = min(timeout, max(0.0, due - self.deliverer.clock()))
            if stop_at is not None:
                timeout = min(timeout, max(0.0, stop_at - time.monotonic()))
            self._wake.wait(timeout)
