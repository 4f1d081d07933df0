"""A blocking HTTP client for the referral endpoint, shaped like the official SDK."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, cast

import requests
from requests.structures import CaseInsensitiveDict
from requests.utils import check_header_validity

from . import _deadline
from ._version import __version__
from .protocol import (
    DEFAULT_ENDPOINT,
    SIGNATURE_HEADER,
    Outcome,
    build_body,
    check_endpoint,
    check_key_id,
    outcome_of,
    parse_json_object,
    sign_referral_body,
)
from .redaction import Secret

USER_AGENT = f"flask-mmolove/{__version__}"

#: The most of an answer read. MMOLove's documented answers are a few hundred bytes
#: of JSON; an error page from a proxy fits too. An answer that never ends would
#: otherwise be buffered whole, growing the deliverer (in thread mode, the portal's
#: own process) without bound. Past it the attempt is a transport error, retried
#: with backoff: what was cut is no documented answer, and judging a truncated body
#: could hold a deliverable event for a person.
MAX_ANSWER: Final = 64 * 1024
#: One read of the answer: the deadline is checked between reads (the watchdog
#: ends one blocked past it).
_CHUNK: Final = 8 * 1024


class _TooLong(Exception):
    """The answer ran past MAX_ANSWER."""


def _cut(response: requests.Response) -> None:
    """Close the answer's connection: never returned to the pool with unread bytes."""
    raw = response.raw
    close = getattr(raw, "close", None)
    if close is not None:
        close()


class TransportError(RuntimeError):
    """No answer came back from MMOLove (DNS, refused, reset, timeout, TLS).

    A ``RuntimeError``, as the official SDK raises, so code written for it keeps working.
    """


@dataclass(frozen=True)
class SendResult:
    """One answer from MMOLove. Non-2xx answers are results too, never exceptions."""

    status: int
    body: str
    #: The documented 200 shape, or None when the answer was not a 2xx.
    outcome: Outcome | None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: Seconds from sending to the answer.
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def data(self) -> dict[str, Any] | None:
        """The body as a JSON object, or None."""
        return parse_json_object(self.body)


def _invalid_header_names(headers: Mapping[str, str | bytes]) -> list[str]:
    bad = []
    for name, value in headers.items():
        try:
            check_header_validity((name, value))  # type: ignore[type-var]
        except requests.exceptions.InvalidHeader:
            bad.append(repr(name))
    return bad


class ReferralClient:
    """Signs and posts referral events over one pooled :class:`requests.Session`.

    The session gives the transport: its connection pools and mounted adapters, its
    headers, and its TLS and proxy settings. Proxy and CA bundle settings
    (``HTTPS_PROXY``, ``NO_PROXY``, ``REQUESTS_CA_BUNDLE``) are read from the
    environment once, at the first send. Session cookies, auth and hooks are not used:
    MMOLove authenticates a request by its signature and sets no cookies.
    """

    def __init__(
        self,
        server_id: str,
        secret: str | Secret,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout: float | tuple[float, float] = (5.0, 10.0),
        key_id: str | None = None,
        session: requests.Session | None = None,
    ) -> None:
        # Wrapped before anything can fail, and the plain argument let go: a traceback
        # tool that shows frame locals (pytest -l, Sentry) finds no secret in this frame.
        held = Secret.of(secret)
        del secret
        if not isinstance(server_id, str) or not server_id.strip():
            raise ValueError("server_id is required: copy it from the Referrals tab")
        if held is None:
            raise ValueError("secret is required: copy it from the Referrals tab")
        self._secret = held
        self.server_id = server_id.strip()
        self.endpoint = check_endpoint(endpoint)
        self.timeout = timeout
        # Fail now, not at the first send, on a key id that cannot go in a header.
        self.key_id = None if key_id is None else check_key_id(key_id)
        self._session = session or requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT
        self._settings: dict[str, Any] | None = None
        # The URL as requests normalises it (IDNA host, quoting), worked out once.
        url = requests.PreparedRequest()
        url.prepare_url(self.endpoint, None)
        self._url: str = url.url or self.endpoint

    def __repr__(self) -> str:
        # getattr: a traceback tool shows the client half-built by a failing __init__.
        server_id, endpoint = getattr(self, "server_id", None), getattr(self, "endpoint", None)
        return f"<ReferralClient server_id={server_id!r} endpoint={endpoint!r}>"

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> ReferralClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sign(self, body: bytes, t: int | None = None) -> str:
        """The signature header value for ``body``, without sending anything."""
        failure: tuple[type[Exception], str] | None = None
        try:
            # The one place the secret is unwrapped.
            return sign_referral_body(self._secret.reveal(), body, t, key_id=self.key_id)
        except (TypeError, ValueError) as exc:
            failure = type(exc), str(exc)
        # Raised again out here, with no context: the traceback of the original passes
        # through the signing frame, which holds the plain secret.
        raise failure[0](failure[1])

    def body(
        self,
        event: str,
        token: str,
        *,
        server_event_id: str,
        referee_identity: str | None = None,
        ts: int | None = None,
        test: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> bytes:
        """Build the body for one event of this server, serialised once."""
        return build_body(
            event,
            token=token,
            server_id=self.server_id,
            server_event_id=server_event_id,
            referee_identity=referee_identity,
            ts=ts,
            test=test,
            extra=extra,
        )

    @property
    def deadline(self) -> float:
        """Seconds an attempt may take at most, connect to the answer's last byte:
        the connect timeout plus the read timeout."""
        timeout = self.timeout
        if isinstance(timeout, tuple):
            return float(timeout[0]) + float(timeout[1])
        return 2.0 * float(timeout)

    def send_body(self, body: bytes, *, until: float | None = None) -> SendResult:
        """POST ``body`` exactly as given, signed now. Raises :class:`TransportError`.

        The whole attempt (connect, send, and reading the whole answer) ends within
        :attr:`deadline`, or by ``until`` (a ``time.monotonic()`` time) if that is
        sooner, however slowly the answer comes; an answer longer than
        :data:`MAX_ANSWER` bytes is cut. Either is a :class:`TransportError`, and the
        connection is closed, never reused; nothing of an attempt given up is sent
        after it ended (the connection is reset, not closed gracefully).
        """
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: self.sign(body)}
        deadline = self.deadline
        if until is not None:
            deadline = min(deadline, until - time.monotonic())
        started = time.perf_counter()
        with _deadline.running(deadline) as attempt:
            try:
                response = self._post(body, headers)
                try:
                    text = self._read(response, attempt)
                finally:
                    response.close()
            except _TooLong as exc:
                raise TransportError(f"MMOLove's answer from {self.endpoint}: {exc}") from exc
            except (requests.RequestException, _deadline.DeadlinePassed) as exc:
                if attempt.expired:
                    raise TransportError(self._too_slow(deadline)) from exc
                # The exception text names the host and the failure, never the secret.
                raise TransportError(
                    f"could not reach MMOLove at {self.endpoint}: {type(exc).__name__}: {exc}"
                ) from exc
            if attempt.expired:
                # The socket was shut down under the read: what came may look whole.
                raise TransportError(self._too_slow(deadline))
            attempt.completed()
        elapsed = time.perf_counter() - started
        ok = 200 <= response.status_code < 300
        return SendResult(
            status=response.status_code,
            body=text,
            outcome=outcome_of(parse_json_object(text)) if ok else None,
            # Already a case-insensitive dict of its own, made for this answer.
            headers=response.headers,
            elapsed=elapsed,
        )

    def _too_slow(self, deadline: float) -> str:
        return (
            f"MMOLove's answer from {self.endpoint} took longer than {deadline:g} s "
            "(connect timeout + read timeout); the connection was closed"
        )

    @staticmethod
    def _read(response: requests.Response, attempt: _deadline.Attempt) -> str:
        """The answer's body, at most MAX_ANSWER bytes, read by its deadline."""
        raw = response.raw
        connection = getattr(raw, "connection", None)
        if connection is not None:
            # Already registered when the session's adapter is an HTTPAdapter; any
            # other urllib3 answer is covered from here on.
            attempt.watch(connection)
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > MAX_ANSWER:
            _cut(response)
            raise _TooLong(f"the answer announced {length} bytes, more than {MAX_ANSWER}")
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(_CHUNK):
            size += len(chunk)
            if size > MAX_ANSWER:
                _cut(response)
                raise _TooLong(f"the answer ran past {MAX_ANSWER} bytes; cut there")
            chunks.append(chunk)
        # The same decoding as Response.text, from what was read.
        response._content = b"".join(chunks)
        return response.text

    def _post(self, body: bytes, headers: dict[str, str]) -> requests.Response:
        # Session.post() costs as much CPU again as the HTTP exchange itself: it scans
        # os.environ and ~/.netrc, merges cookies, auth and hooks this client does not
        # use, on every call; PreparedRequest.prepare() parses and re-checks the same
        # URL and headers every time. The request is built from the session's headers
        # (read now, so later changes count; http.client still refuses an invalid
        # header) and the URL prepared once, and sent through the session's adapter,
        # with the environment's settings read once.
        session = self._session
        prepared = requests.PreparedRequest()
        prepared.method = "POST"
        prepared.url = self._url
        # Session header values may be bytes too; urllib3 sends either.
        prepared.headers = CaseInsensitiveDict(cast("Mapping[str, str]", session.headers))
        prepared.headers.update(headers)
        prepared.headers["Content-Length"] = str(len(body))
        prepared.body = body
        adapter = session.get_adapter(self._url)
        _deadline.arm_adapter(adapter)
        try:
            return adapter.send(prepared, timeout=self.timeout, **self._send_settings())
        except ValueError:
            bad = _invalid_header_names(prepared.headers)
            if not bad:
                raise
            # Named, never shown: a header's value may be a credential.
            raise ValueError(
                f"invalid HTTP header {', '.join(bad)} on the requests.Session given to "
                "ReferralClient (a line break, or leading whitespace, in its name or "
                "value): fix or remove it"
            ) from None

    def _send_settings(self) -> dict[str, Any]:
        """Proxies, TLS verification and client certificate, as ``post(verify=True)``
        resolves them: read from the session and the environment at the first send;
        and ``stream=True``."""
        settings = self._settings
        if settings is None:
            settings = dict(
                self._session.merge_environment_settings(self.endpoint, {}, None, True, None)
            )
            # Streamed: the answer is read here, capped and by its deadline.
            settings["stream"] = True
            self._settings = settings
        return settings

    def send(self, event: str, token: str, **fields: Any) -> SendResult:
        return self.send_body(self.body(event, token, **fields))

    def registered(
        self,
        token: str,
        *,
        referee_identity: str,
        server_event_id: str,
        test: bool = False,
        ts: int | None = None,
    ) -> SendResult:
        """Report that the referee's account exists: the first-touch anchor."""
        return self.send(
            "registered",
            token,
            referee_identity=referee_identity,
            server_event_id=server_event_id,
            test=test,
            ts=ts,
        )

    def qualified(
        self, token: str, *, server_event_id: str, test: bool = False, ts: int | None = None
    ) -> SendResult:
        """Report that the referee reached the portal's milestone."""
        return self.send("qualified", token, server_event_id=server_event_id, test=test, ts=ts)
