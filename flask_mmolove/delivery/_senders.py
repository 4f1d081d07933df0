"""The send threads of one delivery run: up to ``MMOLOVE_CONCURRENCY`` sends at a time."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence

from ..client import SendResult
from ..outbox import OutboxEvent

logger = logging.getLogger("flask_mmolove")

#: What a send gave: MMOLove's answer, or no answer and why (a transport error).
Answer = tuple[SendResult | None, str | None]
#: Sends one event: its answer, or None when it was not sent after all.
Send = Callable[[OutboxEvent], Answer | None]


class Senders:
    """Sends claimed events, up to ``concurrency`` at a time, for one delivery run.

    Threads are started as work arrives and end with the run (:meth:`close`); with a
    concurrency of one, events are sent in the caller's thread by :meth:`collect`.
    Every submitted event gets exactly one answer, None when ``should_stop()`` was
    true (or raised) before it was sent, or the batch's ``send`` did not send it.

    The threads are daemon threads, never a ``ThreadPoolExecutor``: the interpreter
    joins an executor's threads at exit, so a send hanging on a silent MMOLove would
    hold the process past its drain bound.
    """

    def __init__(
        self,
        concurrency: int,
        should_stop: Callable[[], bool],
    ) -> None:
        self._concurrency = concurrency
        self._should_stop = should_stop
        self._jobs: queue.SimpleQueue[tuple[OutboxEvent, Send] | None] = queue.SimpleQueue()
        # Answers in, and how many the submitted events will give: collect() is woken
        # once, when the last one is in.
        self._answers: list[tuple[OutboxEvent, Answer | None]] = []
        self._expected = 0
        self._answered = threading.Condition(threading.Lock())
        self._threads: list[threading.Thread] = []
        # Without threads: submitted, to be sent here by collect().
        self._unsent: list[tuple[OutboxEvent, Send]] = []

    def submit(self, events: Sequence[OutboxEvent], send: Send) -> None:
        """Send ``events`` with ``send``, one call per event."""
        if self._concurrency <= 1:
            self._unsent.extend((event, send) for event in events)
            return
        with self._answered:
            self._expected += len(events)
        for event in events:
            self._jobs.put((event, send))
        # Only a BaseException (the interpreter going down) ends a thread early.
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        while len(self._threads) < min(self._concurrency, len(events)):
            thread = threading.Thread(target=self._work, name="mmolove-send", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _answer(self, event: OutboxEvent, send: Send) -> tuple[OutboxEvent, Answer | None]:
        try:
            stopping = self._should_stop()
        except Exception:
            logger.exception("should_stop raised: taken as stop, event %d not sent", event.id)
            stopping = True
        return event, None if stopping else send(event)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            event, send = job
            # Whatever happens, the event is answered: collect() waits for every one.
            answer: tuple[OutboxEvent, Answer | None] = (event, None)
            try:
                answer = self._answer(event, send)
            finally:
                with self._answered:
                    self._answers.append(answer)
                    if len(self._answers) >= self._expected:
                        self._answered.notify()

    def collect(
        self, heartbeat: Callable[[], None] = lambda: None, every: float = math.inf
    ) -> list[tuple[OutboxEvent, Answer | None]]:
        """Wait for the answers of every submitted event; return them.

        ``heartbeat`` is called every ``every`` seconds while answers are still due
        (the deliverer renews its leases there), in the caller's thread.
        """
        beat_at = time.monotonic() + every
        if self._concurrency <= 1:
            answers = []
            for event, send in self._unsent:
                if time.monotonic() >= beat_at:
                    heartbeat()
                    beat_at = time.monotonic() + every
                answers.append(self._answer(event, send))
            self._unsent.clear()
            return answers
        while True:
            with self._answered:
                done = self._answered.wait_for(
                    lambda: len(self._answers) >= self._expected,
                    timeout=max(0.0, beat_at - time.monotonic()) if every < math.inf else None,
                )
                if done:
                    answers, self._answers = self._answers, []
                    self._expected = 0
                    return answers
            heartbeat()
            beat_at = time.monotonic() + every

    def close(self) -> None:
        """Let the threads end once they are idle (a hung send ends when it times out)."""
        for _ in self._threads:
            self._jobs.put(None)
