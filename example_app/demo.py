"""``python -m example_app``: the portal, with an MMOLove sandbox mounted beside it.

Without ``MMOLOVE_ENDPOINT`` in the environment the sandbox answers under
``/_mmolove/`` in the same process, so a newcomer can follow a referral end to end
with nothing else running. With ``MMOLOVE_ENDPOINT``, ``MMOLOVE_SERVER_ID`` and
``MMOLOVE_REFERRAL_SECRET`` set, the same portal reports to that endpoint instead.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from flask import Flask
from sqlalchemy import select
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.security import generate_password_hash
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from flask_mmolove import ConfigurationError
from flask_mmolove.sandbox import INGEST_PATH, SandboxState, create_sandbox_app, sandbox_state
from flask_mmolove.state import get_state

from .app import create_app
from .extensions import db, mmolove
from .models import XP_PER_LEVEL, User
from .rewards import share_link

SANDBOX_PREFIX: Final = "/_mmolove"
DEMO_SERVER_ID: Final = "emberfall-demo"
#: Signs events between the portal and the sandbox in this one process, nothing else.
DEMO_SECRET: Final = "emberfall-local-sandbox-secret-not-for-production"  # noqa: S105
#: The sandbox's reward-callback secret (MMOLove's Integration tab holds the real one).
DEMO_CALLBACK_SECRET: Final = "emberfall-local-callback-secret-not-for-production"  # noqa: S105
ADMIN_USERNAME: Final = "admin"
ADMIN_PASSWORD_ENV: Final = "DEMO_ADMIN_PASSWORD"  # noqa: S105 (a variable's name)
INSTANCE_ENV: Final = "DEMO_INSTANCE_PATH"

StartResponse = Callable[..., Any]


def _not_ready(environ: Mapping[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    # Answers only in the instant between binding the port and building the app,
    # which needs the port to know its own sandbox's address.
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"starting\n"]


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def _url_host(host: str) -> str:
    """How a browser (and the portal's own delivery thread) reaches ``host``."""
    if host in ("", "0.0.0.0"):  # noqa: S104 (a comparison, not a bind)
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def ensure_admin(app: Flask, password: str) -> User:
    """The operator account: created on first start, its password reset on each."""
    with app.app_context():
        admin = db.session.execute(
            select(User).where(User.username == ADMIN_USERNAME)
        ).scalar_one_or_none()
        if admin is None:
            admin = User(username=ADMIN_USERNAME, password_hash="", is_admin=True)
            db.session.add(admin)
        admin.password_hash = generate_password_hash(password)
        admin.is_admin = True
        db.session.commit()
        return admin


class DemoServer:
    """The demo on a real socket: ``bind()`` then ``serve_forever()``, or ``start()``.

    ``port`` 0 picks a free port. ``environ`` (default: ``os.environ``) decides
    between the mounted sandbox and an external endpoint, as ``python -m example_app``
    does. ``config`` is passed on to :func:`example_app.create_app`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        instance_path: str | None = None,
        admin_password: str | None = None,
        config: dict[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        quiet: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.instance_path = instance_path
        self.environ = os.environ if environ is None else environ
        self.admin_password = (
            admin_password or self.environ.get(ADMIN_PASSWORD_ENV) or secrets.token_urlsafe(9)
        )
        self.config = dict(config or {})
        self.quiet = quiet
        self.portal: Flask | None = None
        self.sandbox: Flask | None = None
        self.admin_code = ""
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def sandboxed(self) -> bool:
        return not self.environ.get("MMOLOVE_ENDPOINT")

    @property
    def url(self) -> str:
        """The portal's base URL, without a trailing slash."""
        if self._server is None:
            raise RuntimeError("the demo is not bound: call bind() or start() first")
        return f"http://{_url_host(self.host)}:{self._server.port}"

    @property
    def sandbox_state(self) -> SandboxState:
        """The mounted sandbox's memory: its log, referrals and scripted faults."""
        if self.sandbox is None:
            raise RuntimeError("no sandbox is mounted: MMOLOVE_ENDPOINT is set")
        return sandbox_state(self.sandbox)

    def bind(self) -> DemoServer:
        """Take the port and build the portal (and sandbox) for it."""
        handler = _QuietHandler if self.quiet else WSGIRequestHandler
        # threaded: in sandbox mode the portal's delivery thread POSTs to this very
        # server, which must answer while a request of its own may be running.
        server = make_server(
            self.host, self.port, _not_ready, threaded=True, request_handler=handler
        )
        self._server = server
        try:
            server.app = self._build()
        except BaseException:
            self.stop()
            raise
        return self

    def _build(self) -> Any:
        config: dict[str, Any] = {"MMOLOVE_DELIVERY": "thread"}
        if self.sandboxed:
            config.update(
                MMOLOVE_ENDPOINT=self.url + SANDBOX_PREFIX + INGEST_PATH,
                MMOLOVE_SERVER_ID=DEMO_SERVER_ID,
                MMOLOVE_REFERRAL_SECRET=DEMO_SECRET,
                MMOLOVE_CALLBACK_SECRET=DEMO_CALLBACK_SECRET,
            )
        else:
            # The extension reads the server id and secret from the process
            # environment itself: the secret never passes through here.
            config["MMOLOVE_ENDPOINT"] = self.environ["MMOLOVE_ENDPOINT"]
        config.update(self.config)
        instance = self.instance_path or self.environ.get(INSTANCE_ENV) or None
        portal = create_app(config, instance_path=instance)
        self.portal = portal
        missing = get_state(portal).settings.missing
        if missing and not self.sandboxed:
            # The portal itself would start and hold its events; the demo's walkthrough
            # needs a working delivery, so it says what is missing instead.
            raise ConfigurationError(
                "; ".join(f"{key} is not set" for key in missing)
                + ": the demo reports to MMOLOVE_ENDPOINT with them. Set them in the "
                "environment, or unset MMOLOVE_ENDPOINT to use the demo's own sandbox"
            )
        admin = ensure_admin(portal, self.admin_password)
        self.admin_code = admin.share_code
        with portal.app_context():
            guide = {
                "share_link": share_link(admin.share_code),
                "log": self.url + SANDBOX_PREFIX + "/log" if self.sandboxed else None,
            }
        portal.config["PORTAL_DEMO_GUIDE"] = guide
        if not self.sandboxed:
            return portal
        self.sandbox = create_sandbox_app(
            secret=DEMO_SECRET,
            server_id=DEMO_SERVER_ID,
            registration_url=self.url + "/register",
            # Votes: the sandbox plays MMOLove's reward callbacks to the portal.
            callback_url=self.url + get_state(portal).settings.callback_url,
            callback_secret=DEMO_CALLBACK_SECRET,
        )
        return DispatcherMiddleware(portal, {SANDBOX_PREFIX: self.sandbox})

    def start(self) -> DemoServer:
        """Bind, then serve in a daemon thread (for tests and the screenshot run)."""
        if self._server is None:
            self.bind()
        assert self._server is not None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="example-app-demo",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until Ctrl-C, then stop."""
        if self._server is None:
            self.bind()
        assert self._server is not None
        try:
            self._server.serve_forever()
        finally:
            self.stop(drain=2.0)

    def stop(self, drain: float = 0.0) -> None:
        """Stop serving, then stop delivery (delivering for up to ``drain`` s). Idempotent."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None and thread is not None:
            server.shutdown()
            thread.join(5.0)
        if server is not None:
            server.server_close()
        portal, self.portal = self.portal, None
        if portal is not None:
            mmolove.shutdown(portal, drain=drain)
            with portal.app_context():
                db.engine.dispose()

    def walkthrough(self) -> str:
        """What to open, in order, for the console."""
        assert self.portal is not None
        config = self.portal.config
        milestone = int(config["PORTAL_MILESTONE_LEVEL"])
        quests = -(-(milestone - 1) * XP_PER_LEVEL // int(config["PORTAL_XP_PER_QUEST"]))
        guide = config["PORTAL_DEMO_GUIDE"]
        url = self.url
        admin = f"Admin account: {ADMIN_USERNAME} / {self.admin_password}"
        if not self.environ.get(ADMIN_PASSWORD_ENV):
            admin += f"   (new at every start; set {ADMIN_PASSWORD_ENV} to keep one)"
        if self.sandboxed:
            intro = [
                f"{config['PORTAL_NAME']} is running at {url}/ with an MMOLove sandbox "
                f"at {url}{SANDBOX_PREFIX}/",
                "",
                "Follow a referral, in this order:",
            ]
            steps = [
                ("1. Open the admin's share link, as a friend would:", guide["share_link"]),
                ("   (it lands on /register with a token: create an account)", ""),
                ("2. See `registered` arrive in the delivery log:", guide["log"]),
                (f"3. Play to level {milestone} ({quests} quests):", f"{url}/play"),
                ("4. See `qualified` arrive in the delivery log:", guide["log"]),
                ("5. Log in as admin to see the reward appear:", f"{url}/login?next=/rewards"),
                ("6. The operator view of deliveries (as admin):", f"{url}/mmolove/"),
                ("7. Vote for the server as ADMIN on MMOLove (+gold):", ""),
                (
                    f"   curl -X POST {url}{SANDBOX_PREFIX}/_hearts -H 'Content-Type: "
                    f'application/json\' -d \'{{"username": "{ADMIN_USERNAME}"}}\'',
                    "",
                ),
            ]
        else:
            endpoint = get_state(self.portal).settings.endpoint
            intro = [
                f"{config['PORTAL_NAME']} is running at {url}/, reporting referrals to {endpoint}",
                "",
            ]
            steps = [
                ("Register:", f"{url}/register"),
                ("Play:", f"{url}/play"),
                ("Rewards (with your share link):", f"{url}/rewards"),
                ("Operator view (as admin):", f"{url}/mmolove/"),
            ]
        width = max(len(label) for label, link in steps if link)
        lines = intro + [f"  {label:<{width}}  {link}".rstrip() for label, link in steps]
        return "\n".join([*lines, "", admin, "Press Ctrl-C to stop."])


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(environ: Mapping[str, str] | None = None) -> int:
    """Run the demo in the foreground; the exit status."""
    env = os.environ if environ is None else environ
    try:
        port = int(env.get("PORT", "5000"))
    except ValueError:
        print(f"error: PORT must be a number, got {env.get('PORT')!r}", file=sys.stderr)
        return 2
    if not env.get("MMOLOVE_ENDPOINT") and any(
        env.get(key) for key in ("MMOLOVE_SERVER_ID", "MMOLOVE_REFERRAL_SECRET")
    ):
        print(
            "note: MMOLOVE_ENDPOINT is not set, so the demo uses its own sandbox and "
            "ignores MMOLOVE_SERVER_ID / MMOLOVE_REFERRAL_SECRET",
            file=sys.stderr,
        )
    demo = DemoServer(host=env.get("HOST", "127.0.0.1"), port=port, environ=env)
    try:
        demo.bind()
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot listen on {demo.host}:{port}: {exc}", file=sys.stderr)
        return 2
    # Delivery outcomes (flask_mmolove) and requests (werkzeug) show on the console.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(demo.walkthrough(), flush=True)
    # SIGTERM (a process manager, `timeout`) stops as Ctrl-C does: deliveries drain.
    signal.signal(signal.SIGTERM, _interrupt)
    demo.serve_forever()
    return 0
