"""MMOLove's side of reward callbacks (votes): signed ``heart.counted`` and ``heart.test``
sent to the portal's callback URL, retried on MMOLove's schedule, every attempt logged.

Each delivery runs in a daemon thread of its own, so :meth:`CallbackSender.send_heart`
returns at once with a :class:`CallbackDelivery` to wait on. Any 2xx answer delivers;
3xx (never followed), 4xx, 5xx, a timeout or a failed connection is retried, up to
:data:`MAX_ATTEMPTS` in all, after the delays of :data:`RETRY_DELAYS` times the
configured ``retry_scale`` (``0.001`` makes a minute 60 ms), then the delivery is
exhausted. :meth:`CallbackSender.stop` cancels the pending retries and cuts an attempt
in flight.

What the docs leave open, and the choice made here: each attempt is signed when it is
sent, with the body's ``timestamp`` equal to that attempt's ``t`` and the same
``heart_id`` (a signature kept from the first attempt would fall outside the portal's
±300 s window by the third), and with the secret and URL configured at that moment
(rotating "invalidates the previous secret immediately"). A delay counts from the end
of the failed attempt. The test callback makes one attempt, as the dashboard's button
reports one status. Legacy GET mode sends only ``username``, ``ts`` and ``sig``; the
``heart_id`` then only tells deliveries apart in the log.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from ..protocol import HEART_COUNTED, HEART_TEST
from ..redaction import Redactor
from .callback_http import Answer, CallbackConnections, legacy_request, post_request, send_once
from .callback_values import (
    CANCELLED,
    CORE_FIELDS,
    DEFAULT_CALLBACK_TIMEOUT,
    DELIVERED,
    EXHAUSTED,
    FAILED,
    FINAL_STATES,
    MAX_ATTEMPTS,
    PENDING,
    RETRY_DELAYS,
    RETRYING,
    TEST_HEART_ID,
    TEST_USERNAME,
    UNSET,
    CallbackAttempt,
    CallbackConfig,
    Unset,
    checked_config,
)


class CallbackDelivery:
    """One callback (one ``heart_id``) on its way to the portal: its attempts and state."""

    def __init__(
        self,
        sender: CallbackSender,
        *,
        event: str,
        username: str,
        heart_id: str,
        fields: dict[str, Any],
        timestamp: int | None,
        max_attempts: int,
    ) -> None:
        self._sender = sender
        self.event = event
        self.username = username
        self.heart_id = heart_id
        #: The body's fields other than ``timestamp``, which each attempt sets.
        self.fields = fields
        self.fixed_timestamp = timestamp
        self.max_attempts = max_attempts
        self._state = PENDING
        self._attempts: list[CallbackAttempt] = []
        self._done = threading.Event()

    def __repr__(self) -> str:
        return (
            f"<CallbackDelivery {self.event} heart_id={self.heart_id!r} "
            f"username={self.username!r} {self.state} after {len(self.attempts)} attempt(s)>"
        )

    @property
    def state(self) -> str:
        with self._sender.lock:
            return self._state

    @property
    def attempts(self) -> list[CallbackAttempt]:
        with self._sender.lock:
            return list(self._attempts)

    @property
    def status(self) -> int | None:
        """The last attempt's HTTP status (None before any, or with no answer)."""
        attempts = self.attempts
        return attempts[-1].status if attempts else None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def delivered(self) -> bool:
        return self.state == DELIVERED

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the delivery is delivered, exhausted, failed or cancelled; False
        when ``timeout`` seconds pass first."""
        return self._done.wait(timeout)


class CallbackSender:
    """MMOLove's callback side for one server: its configuration, deliveries and log."""

    def __init__(
        self,
        *,
        server_id: str,
        clock: Callable[[], float] | None = None,
        url: str | None = None,
        secret: str | None = None,
        legacy_get: bool = False,
        retry_scale: float = 1.0,
        timeout: float = DEFAULT_CALLBACK_TIMEOUT,
    ) -> None:
        self.server_id = server_id
        self.clock: Callable[[], float] = clock or time.time
        # Its own secret, never the referral one: MMOLove keeps the two apart.
        config = CallbackConfig(
            url, secret or secrets.token_urlsafe(32), legacy_get, retry_scale, timeout
        )
        self._config = checked_config(config)
        self._known_secrets = [self._config.secret]
        self.lock = threading.Lock()
        self._changed = threading.Condition(self.lock)
        self._stopping = threading.Event()
        self._connections = CallbackConnections()
        self._deliveries: list[CallbackDelivery] = []
        self._threads: set[threading.Thread] = set()
        self._log: list[CallbackAttempt] = []
        self._seq = 0

    def __repr__(self) -> str:
        return f"<CallbackSender to {self.config.url!r}, {len(self.attempts)} attempt(s)>"

    # --- configuration ------------------------------------------------------------

    @property
    def config(self) -> CallbackConfig:
        with self.lock:
            return self._config

    @property
    def secret(self) -> str:
        """The callback signing secret: give it to the portal as MMOLOVE_CALLBACK_SECRET."""
        return self.config.secret

    def configure(
        self,
        *,
        url: str | Unset | None = UNSET,
        secret: str | Unset = UNSET,
        legacy_get: bool | Unset = UNSET,
        retry_scale: float | Unset = UNSET,
        timeout: float | Unset = UNSET,
    ) -> CallbackConfig:
        """Change what is given; the rest stays. Pending retries use the new values,
        as a secret rotated on MMOLove's Integration tab applies at once."""
        changes: dict[str, Any] = {
            name: value
            for name, value in (
                ("url", url),
                ("secret", secret),
                ("legacy_get", legacy_get),
                ("retry_scale", retry_scale),
                ("timeout", timeout),
            )
            if value is not UNSET
        }
        with self.lock:
            self._config = checked_config(replace(self._config, **changes))
            if self._config.secret not in self._known_secrets:
                self._known_secrets.append(self._config.secret)
            # A shorter scale applies to a retry already waiting, too.
            self._changed.notify_all()
            return self._config

    # --- sending ------------------------------------------------------------------

    def send_heart(
        self,
        username: str,
        *,
        streak_day: int | None = None,
        extra: Mapping[str, Any] | None = None,
        heart_id: str | None = None,
        period: str | None = None,
        timestamp: int | None = None,
    ) -> CallbackDelivery:
        """Send ``heart.counted`` for a vote by ``username``, retried on MMOLove's schedule.

        ``heart_id`` defaults to a fresh UUID4 (pass one again to model a duplicate);
        ``period`` to the UTC month of ``timestamp`` or now. Without ``timestamp`` each
        attempt is signed at its own time; with it, every attempt carries that ``t``
        (to test the portal's replay window). ``extra`` adds fields (``streak_milestone``,
        ``first_heart``...).
        """
        if not isinstance(username, str) or not username:
            raise ValueError("username must be a non-empty string")
        if timestamp is not None and (
            isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp <= 0
        ):
            raise ValueError("timestamp must be a positive whole number of unix seconds")
        if extra is not None and not isinstance(extra, Mapping):
            raise TypeError("extra must be a mapping of field names to JSON values")
        clashes = sorted(set(extra or ()) & {*CORE_FIELDS, "streak_day"})
        if clashes:
            raise ValueError(f"extra may not replace {', '.join(clashes)}: pass them as arguments")
        if period is None:
            at = self.clock() if timestamp is None else timestamp
            period = datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m")
        fields: dict[str, Any] = {
            "event": HEART_COUNTED,
            "server_id": self.server_id,
            "username": username,
            "heart_id": heart_id or str(uuid.uuid4()),
            "period": period,
        }
        if streak_day is not None:
            fields["streak_day"] = streak_day
        fields.update(extra or {})
        # Checked here: a value JSON cannot carry would otherwise fail in the thread.
        json.dumps(fields)
        return self._start(fields, timestamp, MAX_ATTEMPTS)

    def send_test(self) -> CallbackDelivery:
        """What the dashboard's "Send test callback" button sends: ``heart.test`` for
        ``test-user`` with an all-zero ``heart_id``, one attempt."""
        fields: dict[str, Any] = {
            "event": HEART_TEST,
            "server_id": self.server_id,
            "username": TEST_USERNAME,
            "heart_id": TEST_HEART_ID,
            "period": datetime.fromtimestamp(self.clock(), timezone.utc).strftime("%Y-%m"),
        }
        return self._start(fields, None, 1)

    def _start(
        self, fields: dict[str, Any], timestamp: int | None, max_attempts: int
    ) -> CallbackDelivery:
        if self.config.url is None:
            raise RuntimeError(
                "no callback URL: configure_callbacks(url=...) first (MMOLove reports "
                "not_configured)"
            )
        delivery = CallbackDelivery(
            self,
            event=fields["event"],
            username=fields["username"],
            heart_id=fields["heart_id"],
            fields=fields,
            timestamp=timestamp,
            max_attempts=max_attempts,
        )
        thread = threading.Thread(
            target=self._run,
            args=(delivery, self._stopping),
            name=f"mmolove-sandbox-callback:{delivery.heart_id[:8]}",
            daemon=True,
        )
        with self.lock:
            self._deliveries.append(delivery)
            self._threads.add(thread)
        thread.start()
        return delivery

    def _run(self, delivery: CallbackDelivery, stopping: threading.Event) -> None:
        try:
            for number in range(1, delivery.max_attempts + 1):
                if number > 1 and not self._sleep(RETRY_DELAYS[number - 1], stopping):
                    self._finish(delivery, CANCELLED)
                    return
                if self._attempt(delivery, number, stopping) in FINAL_STATES:
                    return
        except BaseException:
            # A bug here must not leave a test waiting on a delivery that never ends.
            self._finish(delivery, FAILED)
            raise
        finally:
            with self.lock:
                self._threads.discard(threading.current_thread())
                self._changed.notify_all()

    def _sleep(self, delay: float, stopping: threading.Event) -> bool:
        """Wait ``delay`` scaled; False when stop() came first."""
        started = time.monotonic()
        with self.lock:
            while not stopping.is_set():
                # Read on every wake: configure(retry_scale=...) may shorten it.
                left = started + delay * self._config.retry_scale - time.monotonic()
                if left <= 0:
                    return True
                self._changed.wait(left)
        return False

    def _attempt(self, delivery: CallbackDelivery, number: int, stopping: threading.Event) -> str:
        config = self.config
        sent_at = self.clock()
        t = delivery.fixed_timestamp or int(sent_at)
        if config.legacy_get:
            request = legacy_request(config.url or "", config.secret, delivery.username, t)
        else:
            request = post_request(config.url or "", config.secret, delivery.fields, t)
        started = time.monotonic()
        if config.url is None:
            # configure(url=None) while a retry waited: MMOLove's "not_configured".
            answer = Answer(error="not_configured")
        else:
            answer = send_once(self._connections, stopping, request, config.timeout)
        duration = time.monotonic() - started
        return self._record(
            delivery, number, answer, stopping,
            time=sent_at, method=request.method, url=request.url,
            signature=request.signature, body=request.logged, duration=duration,
        )  # fmt: skip

    def _record(
        self,
        delivery: CallbackDelivery,
        number: int,
        answer: Answer,
        stopping: threading.Event,
        **sent: Any,
    ) -> str:
        ok = answer.status is not None and 200 <= answer.status < 300
        next_delay: float | None = None
        if ok:
            state = DELIVERED
        elif stopping.is_set():
            state = CANCELLED
        elif number >= delivery.max_attempts:
            state = FAILED if delivery.max_attempts == 1 else EXHAUSTED
        else:
            state = RETRYING
        with self.lock:
            if state == RETRYING:
                next_delay = RETRY_DELAYS[number] * self._config.retry_scale
            self._seq += 1
            record = CallbackAttempt(
                seq=self._seq,
                heart_id=delivery.heart_id,
                event=delivery.event,
                username=delivery.username,
                attempt=number,
                status=answer.status,
                error="stopped" if stopping.is_set() and not ok else answer.error,
                state=state,
                response=answer.text,
                location=answer.location,
                next_delay=next_delay,
                **sent,
            )
            self._log.append(record)
            delivery._attempts.append(record)
            delivery._state = state
        if state in FINAL_STATES:
            self._finish(delivery, state)
        return state

    def _finish(self, delivery: CallbackDelivery, state: str) -> None:
        with self.lock:
            delivery._state = state
            self._changed.notify_all()
        delivery._done.set()

    # --- waiting and stopping -----------------------------------------------------

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every delivery so far is final; False when ``timeout`` passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while any(not d._done.is_set() for d in self._deliveries):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel pending retries, cut attempts in flight and join the delivery threads.
        Later sends start afresh."""
        with self.lock:
            stopping, self._stopping = self._stopping, threading.Event()
            threads = list(self._threads)
            stopping.set()
            self._changed.notify_all()
        self._connections.cut(stopping)
        for thread in threads:
            thread.join(timeout)

    # --- the log ------------------------------------------------------------------

    @property
    def attempts(self) -> list[CallbackAttempt]:
        """Every attempt, oldest first."""
        with self.lock:
            return list(self._log)

    @property
    def deliveries(self) -> list[CallbackDelivery]:
        """Every callback sent (one per send), oldest first."""
        with self.lock:
            return list(self._deliveries)

    def public_log(self) -> list[dict[str, Any]]:
        """The attempts as JSON-ready dicts with every callback secret scrubbed."""
        with self.lock:
            redact = Redactor(*self._known_secrets)
            records = list(self._log)
        return [
            {key: redact(value) if isinstance(value, str) else value for key, value in d.items()}
            for d in (record.as_dict() for record in records)
        ]

    def reset(self) -> None:
        """Forget the log and the finished deliveries; pending ones go on."""
        with self.lock:
            self._log.clear()
            self._seq = 0
            self._deliveries = [d for d in self._deliveries if not d._done.is_set()]
