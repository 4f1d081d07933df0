"""Running the sandbox on a real socket, in a background thread, for tests and demos."""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from flask import Flask
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from ..protocol import DEFAULT_TOLERANCE
from .app import INGEST_PATH, create_sandbox_app, sandbox_callbacks, sandbox_state
from .callback_values import DEFAULT_CALLBACK_TIMEOUT, UNSET, CallbackAttempt, CallbackConfig, Unset
from .callbacks import CallbackDelivery, CallbackSender
from .log import LogRecord
from .rules import Referral
from .state import SandboxState

if TYPE_CHECKING:
    from ..client import ReferralClient

DEFAULT_REGISTRATION_URL: Final = "https://portal.example/register"
#: How long stop() waits for the serving loop and for each request thread.
_JOIN_TIMEOUT: Final = 5.0


class _Connections:
    """The sockets of requests in flight, so stop() can end them instead of leaking them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[socket.socket, threading.Thread] = {}
        self._closed = False

    def add(self, sock: socket.socket) -> bool:
        with self._lock:
            if not self._closed:
                self._live[sock] = threading.current_thread()
                return True
        return False

    def discard(self, sock: socket.socket) -> None:
        with self._lock:
            self._live.pop(sock, None)

    def close(self) -> list[threading.Thread]:
        """Refuse new connections, end the live ones; the threads to join."""
        with self._lock:
            self._closed = True
            live = list(self._live.items())
        for sock, _thread in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return [thread for _sock, thread in live]


def handler_class(
    connections: _Connections | None = None, *, quiet: bool = False
) -> type[WSGIRequestHandler]:
    """A request handler that can be tracked and silenced; shared with the CLI."""

    class SandboxRequestHandler(WSGIRequestHandler):
        def setup(self) -> None:
            super().setup()
            if connections is not None and not connections.add(self.connection):
                # Accepted in the instant before stop(): end it rather than serve it.
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                if connections is not None:
                    connections.discard(self.connection)

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            if not quiet:
                super().log_request(code, size)

    return SandboxRequestHandler


class SandboxServer:
    """The sandbox on a free 127.0.0.1 port, served by werkzeug in a daemon thread.

    Secret and server id default to fresh random values. Use as a context manager, or
    call :meth:`start` and :meth:`stop`. The request log is silent unless ``quiet`` is
    False.

    It also plays MMOLove's side of reward callbacks: :meth:`send_heart` and
    :meth:`send_test_callback` POST signed votes to ``callback_url`` with
    ``callback_secret`` (default a fresh random one, never the referral ``secret``),
    retried on MMOLove's schedule with its delays times ``retry_scale``; see
    :mod:`flask_mmolove.sandbox.callbacks`.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        server_id: str | None = None,
        registration_url: str = DEFAULT_REGISTRATION_URL,
        token_key: str | None = None,
        tolerance: int = DEFAULT_TOLERANCE,
        clock: Callable[[], float] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        quiet: bool = True,
        callback_url: str | None = None,
        callback_secret: str | None = None,
        callback_legacy_get: bool = False,
        retry_scale: float = 1.0,
        callback_timeout: float = DEFAULT_CALLBACK_TIMEOUT,
    ) -> None:
        self.app: Flask = create_sandbox_app(
            secret=secret or secrets.token_urlsafe(32),
            server_id=server_id or f"sandbox-{secrets.token_hex(4)}",
            registration_url=registration_url,
            token_key=token_key,
            tolerance=tolerance,
            clock=clock,
            callback_url=callback_url,
            callback_secret=callback_secret,
        )
        self.state: SandboxState = sandbox_state(self.app)
        self.callbacks: CallbackSender = sandbox_callbacks(self.app)
        self.callbacks.configure(
            legacy_get=callback_legacy_get, retry_scale=retry_scale, timeout=callback_timeout
        )
        self._host = host
        self._port = port
        self._quiet = quiet
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._connections = _Connections()

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "stopped"
        return f"<SandboxServer server_id={self.server_id!r} {where}>"

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> SandboxServer:
        if self._server is not None:
            raise RuntimeError("the sandbox is already running")
        self._connections = _Connections()
        server = make_server(
            self._host,
            self._port,
            self.app,
            threaded=True,
            request_handler=handler_class(self._connections, quiet=self._quiet),
        )
        self._server = server
        self._thread = threading.Thread(
            # A short poll so stop() returns in tens of milliseconds, not half a second.
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"mmolove-sandbox:{server.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, end requests in flight and close every socket; cancel pending
        reward callbacks and cut those in flight. Idempotent."""
        self.callbacks.stop(_JOIN_TIMEOUT)
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        server.shutdown()
        thread.join(_JOIN_TIMEOUT)
        # Sockets first, then wake any request held by a delay: it then finds its
        # connection gone, as a client would when MMOLove goes down mid-request.
        request_threads = self._connections.close()
        self.state.wake()
        for request_thread in request_threads:
            request_thread.join(_JOIN_TIMEOUT)
        # serve_forever closes the listening socket on its way out; this covers a
        # loop that never ran.
        server.server_close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    # --- where and who ------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321``."""
        if self._server is None:
            raise RuntimeError("the sandbox is not running: call start() first")
        return f"http://{self._server.host}:{self._server.port}"

    @property
    def endpoint(self) -> str:
        """The ingest endpoint, to use as ``MMOLOVE_ENDPOINT``."""
        return self.url + INGEST_PATH

    @property
    def secret(self) -> str:
        return self.state.secret

    @property
    def server_id(self) -> str:
        return self.state.server_id

    def mint_token(self, code: str = "friend", *, server_id: str | None = None) -> str:
        """A token as a click on ``code``'s share link would mint (recorded as a click)."""
        return self.state.mint_token(code, server_id=server_id)

    def share_link(self, code: str = "friend") -> str:
        """The share link a referrer with ``code`` would hand out."""
        return f"{self.url}/r/{quote(self.server_id, safe='')}?ref={quote(code, safe='')}"

    def client(self, **kwargs: Any) -> ReferralClient:
        """A :class:`~flask_mmolove.ReferralClient` for this sandbox; close it after use."""
        from ..client import ReferralClient

        return ReferralClient(self.server_id, self.secret, self.endpoint, **kwargs)

    # --- what arrived -------------------------------------------------------------

    @property
    def events(self) -> list[LogRecord]:
        """Every request to the ingest endpoint, oldest first, whatever its verdict."""
        return self.state.log

    @property
    def referrals(self) -> dict[str, Referral]:
        """Token -> referral, as a snapshot."""
        return self.state.referrals

    def accepted_count(self, event: str | None = None) -> int:
        """Events written: not duplicates, not dry runs, not rejected."""
        return self.state.accepted_count(event)

    def accepted_posts(self, token: str, event: str) -> int:
        """200 answers to real ``event`` posts for ``token``, duplicates included."""
        return self.state.accepted_posts(token, event)

    # --- faults -------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        retry_after: int | float | str | None = None,
        body: Any = None,
    ) -> None:
        """Answer the next ``n`` events with ``status`` (and ``Retry-After``), unhandled."""
        self.state.fail_next(n, status, retry_after, body)

    def delay_next(self, n: int, seconds: float) -> None:
        """Hold each of the next ``n`` events ``seconds`` before handling it."""
        self.state.delay_next(n, seconds)

    def drop_next(self, n: int = 1, after_commit: bool = False) -> None:
        """Drop the next ``n`` connections unanswered; ``after_commit``: once written."""
        self.state.drop_next(n, after_commit=after_commit)

    def clear_faults(self) -> None:
        """Forget scripted faults and release any request held by a delay."""
        self.state.clear_faults()

    def reset(self) -> None:
        """Forget referrals, dedup keys, the logs and faults; keep secrets and server id.
        Reward callbacks still pending go on."""
        self.state.reset()
        self.callbacks.reset()

    # --- reward callbacks (votes), MMOLove -> portal --------------------------------

    def configure_callbacks(
        self,
        url: str | Unset | None = UNSET,
        *,
        secret: str | Unset = UNSET,
        legacy_get: bool | Unset = UNSET,
        retry_scale: float | Unset = UNSET,
        timeout: float | Unset = UNSET,
    ) -> CallbackConfig:
        """Set what is given, as on MMOLove's Integration tab: the portal's callback
        ``url``, the callback ``secret`` (rotating it applies to pending retries at
        once), ``legacy_get`` mode, ``retry_scale`` (``0.001``: a minute is 60 ms) and
        the per-operation ``timeout`` in seconds."""
        return self.callbacks.configure(
            url=url, secret=secret, legacy_get=legacy_get, retry_scale=retry_scale,
            timeout=timeout,
        )  # fmt: skip

    @property
    def callback_secret(self) -> str:
        """The reward callbacks' signing secret: the portal's MMOLOVE_CALLBACK_SECRET."""
        return self.callbacks.secret

    @property
    def callback_url(self) -> str | None:
        return self.callbacks.config.url

    def send_heart(
        self,
        username: str,
        *,
        streak_day: int | None = None,
        extra: dict[str, Any] | None = None,
        heart_id: str | None = None,
        period: str | None = None,
        timestamp: int | None = None,
    ) -> CallbackDelivery:
        """POST a signed ``heart.counted`` for ``username`` to the callback URL in the
        background, retried on MMOLove's schedule; returns at once with the delivery
        (``.wait(timeout)``, ``.state``, ``.attempts``). Reuse a ``heart_id`` to model
        MMOLove's duplicate; ``extra`` adds fields such as ``first_heart``."""
        return self.callbacks.send_heart(
            username, streak_day=streak_day, extra=extra, heart_id=heart_id, period=period,
            timestamp=timestamp,
        )  # fmt: skip

    def send_test_callback(self) -> CallbackDelivery:
        """The "Send test callback" button: ``heart.test`` for ``test-user``, heart_id
        all zeros, one attempt in the background."""
        return self.callbacks.send_test()

    @property
    def callback_log(self) -> list[CallbackAttempt]:
        """Every callback attempt, oldest first: heart_id, attempt number, time, status
        or error, and the delivery's state after it."""
        return self.callbacks.attempts

    @property
    def callback_deliveries(self) -> list[CallbackDelivery]:
        """Every callback sent, oldest first, with its state and attempts."""
        return self.callbacks.deliveries

    def wait_callbacks(self, timeout: float | None = 10.0) -> bool:
        """Wait until every callback sent so far is delivered, exhausted, failed or
        cancelled; False when ``timeout`` seconds pass first."""
        return self.callbacks.wait(timeout)
