"""A total deadline for one HTTP exchange, enforced against a peer that drips.

A socket timeout bounds each read, not the exchange: a peer that sends one byte a
second never trips it, in the status line, the headers or the body. Here a watchdog
thread shuts down the socket of an exchange past its deadline, which ends any read
blocked on it at once, whatever the phase. The socket is found through the
connection: connections of a :class:`requests.adapters.HTTPAdapter`'s pools register
themselves as they send (:func:`arm_adapter`), and any other urllib3 answer
registers its connection once its headers are in (:meth:`Attempt.watch`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from typing import Any, Final

#: The watchdog acts at most this late, and wakes at most this often while exchanges
#: run: one wake per send would compete for the GIL with the sends themselves.
TICK: Final = 0.05


class Attempt:
    """One exchange's deadline: ``time.monotonic()`` time, and whether it passed."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired = False
        self._watched: list[Any] = []

    def watch(self, conn: Any) -> None:
        """Shut down ``conn`` (a socket, or a connection's ``sock``) should the
        deadline pass before the attempt ends."""
        self._watched.append(conn)
        if self.expired:
            _shutdown(conn)

    def _expire(self) -> None:
        self.expired = True
        for conn in self._watched:
            _shutdown(conn)

    def completed(self) -> None:
        """The exchange ended whole: its connection, kept for the next one, closes
        gracefully again when it is closed (see the armed ``connect``)."""
        for conn in self._watched:
            sock = conn if isinstance(conn, socket.socket) else getattr(conn, "sock", None)
            if sock is not None:
                _linger(sock, _GRACEFUL)


def _shutdown(conn: Any) -> None:
    sock = conn if isinstance(conn, socket.socket) else getattr(conn, "sock", None)
    if sock is None:
        # Still connecting: the connect timeout ends that, and the armed connection
        # refuses to wait for an answer once the attempt has expired.
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """One daemon thread per process, running only while exchanges are armed."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._armed: set[Attempt] = set()
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")

    def arm(self, attempt: Attempt) -> None:
        if self._pid != os.getpid():
            # A forked child: the parent's thread is not here, its lock may be held.
            self.__init__()  # type: ignore[misc]
        with self._cond:
            self._armed.add(attempt)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="mmolove-deadline", daemon=True
                )
                self._thread.start()
            elif attempt.deadline < self._wake_at:
                self._cond.notify()

    def disarm(self, attempt: Attempt) -> None:
        # No notify: the thread finds out at its next wake, which is cheaper than a
        # wake per send.
        with self._cond:
            self._armed.discard(attempt)

    def _run(self) -> None:
        with self._cond:
            while True:
                if not self._armed:
                    self._wake_at = float("inf")
                    self._cond.wait()
                    continue
                now = time.monotonic()
                due = [attempt for attempt in self._armed if attempt.deadline <= now]
                for attempt in due:
                    self._armed.discard(attempt)
                    attempt._expire()
                if self._armed:
                    earliest = min(attempt.deadline for attempt in self._armed)
                    self._wake_at = max(earliest, now + TICK)
                    self._cond.wait(self._wake_at - now)


_WATCHDOG = _Watchdog()
_CURRENT = threading.local()


class running:
    """``with running(seconds) as attempt:`` the exchange in this block ends by then."""

    def __init__(self, seconds: float) -> None:
        self.attempt = Attempt(time.monotonic() + seconds)

    def __enter__(self) -> Attempt:
        _CURRENT.attempt = self.attempt
        _WATCHDOG.arm(self.attempt)
        return self.attempt

    def __exit__(self, *exc: object) -> None:
        _CURRENT.attempt = None
        _WATCHDOG.disarm(self.attempt)


def _current() -> Attempt | None:
    attempt: Attempt | None = getattr(_CURRENT, "attempt", None)
    return attempt


#: SO_LINGER on, for no time: close() resets the connection and drops unsent bytes.
_ABORT: Final = struct.pack("ii", 1, 0)
#: SO_LINGER off: close() ends the connection as usual.
_GRACEFUL: Final = struct.pack("ii", 0, 0)


def _linger(sock: Any, how: bytes) -> None:
    # A socket already closed (or of a kind without SO_LINGER) keeps its close as it
    # is: nothing of an exchange may fail on this.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, how)


class DeadlinePassed(OSError):
    """Raised by an armed connection asked to wait for an answer past its deadline."""


_ARMED_CLASSES: dict[type[Any], type[Any]] = {}


def _armed_connection(base: type[Any]) -> type[Any]:
    armed = _ARMED_CLASSES.get(base)
    if armed is None:

        def connect(self: Any) -> Any:
            connected = base.connect(self)
            attempt = _current()
            if attempt is not None:
                # Closed abortively while an exchange is under way: an attempt given
                # up has no bytes left to send. A graceful close would keep
                # retransmitting the request after a link comes back, to arrive long
                # after its attempt (and its lease) ended.
                _linger(self.sock, _ABORT)
                if attempt.expired:
                    # Plain http connects inside request(), after the watchdog last
                    # looked: a deadline that passed while connecting sends nothing.
                    raise DeadlinePassed("the attempt's deadline passed while connecting")
            return connected

        def request(self: Any, *args: Any, **kwargs: Any) -> Any:
            attempt = _current()
            if attempt is not None:
                sock = getattr(self, "sock", None)
                if sock is not None:
                    # A kept-alive connection: abortive again for this exchange.
                    _linger(sock, _ABORT)
                attempt.watch(self)
            return base.request(self, *args, **kwargs)

        def getresponse(self: Any, *args: Any, **kwargs: Any) -> Any:
            attempt = _current()
            if attempt is not None:
                if attempt.expired:
                    raise DeadlinePassed("the attempt's deadline passed before the answer")
                # The socket itself: http.client lets go of it (self.sock = None)
                # when the answer is to end with the connection.
                attempt.watch(self.sock)
            return base.getresponse(self, *args, **kwargs)

        armed = type(
            base.__name__,
            (base,),
            {"connect": connect, "request": request, "getresponse": getresponse},
        )
        _ARMED_CLASSES[base] = armed
    return armed


def _armed_pool(base: type[Any]) -> type[Any]:
    armed = _ARMED_CLASSES.get(base)
    if armed is None:
        connection = _armed_connection(base.ConnectionCls)
        armed = type(base.__name__, (base,), {"ConnectionCls": connection})
        _ARMED_CLASSES[base] = armed
    return armed


def arm_adapter(adapter: object) -> None:
    """Make the connections of ``adapter``'s pools register with the running attempt.

    For a :class:`requests.adapters.HTTPAdapter` (or a subclass): its pool managers,
    and proxy managers made so far, make pools whose connections register from the
    first byte sent; pools made before get the same class for their new connections.
    Another adapter is left as it is (its connection registers at the headers).
    """
    managers = [getattr(adapter, "poolmanager", None)]
    managers += list(getattr(adapter, "proxy_manager", {}).values())
    for manager in managers:
        classes = getattr(manager, "pool_classes_by_scheme", None)
        if manager is None or not isinstance(classes, dict) or getattr(manager, "_mmolove", False):
            continue
        manager.pool_classes_by_scheme = {
            scheme: _armed_pool(pool) for scheme, pool in classes.items()
        }
        pools = manager.pools
        for key in list(pools.keys()):
            pool = pools.get(key)
            if pool is not None and hasattr(pool, "ConnectionCls"):
                pool.ConnectionCls = _armed_connection(pool.ConnectionCls)
        manager._mmolove = True
