"""The send threads of one delivery run: up to ``MMOLOVE_CONCURRENCY`` sends at a time."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

from ..client import SendResult
from ..outbox import OutboxEvent

logger = logging.getLogger("flask_mmolove")

#: What a send gave: MMOLove's answer, or no answer and why (a transport error).
Answer = tuple[SendResult | None, str | None]


class Senders:
    """Sends claimed events, up to ``concurrency`` at a time, for one delivery run.

    Threads are started as work arrives and end with the run (:meth:`close`); with a
    concurrency of one, events are sent in the caller's thread by :meth:`collect`.
    Every submitted event gets exactly one answer, None when ``should_stop()`` was
    true before it was sent.
    """

    def __init__(
        self,
        send: Callable[[OutboxEvent], Answer],
        concurrency: int,
        should_stop: Callable[[], bool],
    ) -> None:
        self._send = send
        self._concurrency = concurrency
        self._should_stop = should_stop
        self._jobs: queue.SimpleQueue[OutboxEvent | None] = queue.SimpleQueue()
        # Answers in, and how many collect() waits for: a waiting caller is woken
        # once per chunk, not once per answer.
        self._answers: list[tuple[OutboxEvent, Answer | None]] = []
        self._wanted = 1
        self._answered = threading.Condition(threading.Lock())
        self._threads: list[threading.Thread] = []
        # Submitted and not answered yet, with threads; to send here, without.
        self._queued = 0
        self._unsent: list[OutboxEvent] = []

    def submit(self, events: Sequence[OutboxEvent]) -> None:
        if self._concurrency <= 1:
            self._unsent.extend(events)
            return
        for event in events:
            self._jobs.put(event)
        self._queued += len(events)
        # Only a BaseException (the interpreter going down) ends a thread early.
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        while len(self._threads) < min(self._concurrency, self._queued):
            thread = threading.Thread(target=self._work, name="mmolove-send", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _answer(self, event: OutboxEvent) -> tuple[OutboxEvent, Answer | None]:
        try:
            stopping = self._should_stop()
        except Exception:
            logger.exception("should_stop raised: taken as stop, event %d not sent", event.id)
            stopping = True
        return event, None if stopping else self._send(event)

    def _work(self) -> None:
        while (event := self._jobs.get()) is not None:
            # Whatever happens, the event is answered: collect() waits for every one.
            answer: tuple[OutboxEvent, Answer | None] = (event, None)
            try:
                answer = self._answer(event)
            finally:
                with self._answered:
                    self._answers.append(answer)
                    if len(self._answers) >= self._wanted:
                        self._answered.notify()

    def collect(self, at_least: int) -> list[tuple[OutboxEvent, Answer | None]]:
        """Wait for ``at_least`` answers (or all still due); return every answer in."""
        if self._concurrency <= 1:
            answers = [self._answer(event) for event in self._unsent]
            self._unsent.clear()
            return answers
        with self._answered:
            self._wanted = max(1, min(at_least, self._queued))
            self._answered.wait_for(lambda: len(self._answers) >= self._wanted)
            answers, self._answers = self._answers, []
        self._queued -= len(answers)
        return answers

    def close(self) -> None:
        """Let the threads end once they are idle (a hung send ends when it times out)."""
        for _ in self._threads:
            self._jobs.put(None)
