"""Three portals of the same shape, differing only in how they report referrals.

- ``plain_portal``: no referral code at all (the baseline of every comparison).
- ``referral_portal``: flask-mmolove, as the README's quick start sets it up.
- ``guide_portal``: the MMOLove Python guide's from-scratch approach: read ``mmref``
  from the query or a cookie in the registration view and post ``registered`` inline,
  with the guide's own ``mmolove_send_event`` (the verbatim copy in
  ``tests/guide_client.py``).

Each has ``/`` (a trivial page), ``/account`` (a page that reads the session, as a
logged-in page does) and ``/register`` (GET shows the form, POST creates an account
and redirects).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
from collections.abc import Callable
from functools import cache
from typing import Any

from flask import Flask, redirect, request, session

from flask_mmolove import MMOLove, referral_registered, set_referee

from . import ROOT

SECRET_KEY = "bench-" + "k" * 32
SendEvent = Callable[..., tuple[int, str]]


@cache
def guide_send_event() -> SendEvent:
    """The guide's ``mmolove_send_event``, loaded from ``tests/guide_client.py``."""
    path = ROOT / "tests" / "guide_client.py"
    spec = importlib.util.spec_from_file_location("mmolove_guide_client", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load the guide's client from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    send: SendEvent = module.mmolove_send_event
    return send


def _base(name: str) -> tuple[Flask, Callable[[], str]]:
    app = Flask(name)
    app.config.update(SECRET_KEY=SECRET_KEY)
    counter = itertools.count(1)
    accounts: dict[str, str] = {}

    def create_account() -> str:
        user_id = f"u{next(counter)}"
        accounts[user_id] = request.form.get("name", "player")
        return user_id

    @app.get("/")
    def index() -> str:
        return "ok"

    @app.get("/account")
    def account() -> str:
        return f"hello {session.get('user', 'guest')}"

    return app, create_account


def plain_portal() -> Flask:
    app, create_account = _base("plain_portal")

    @app.route("/register", methods=["GET", "POST"])
    def register() -> Any:
        if request.method == "POST":
            create_account()
            return redirect("/welcome")
        return "form"

    return app


def referral_portal(config: dict[str, Any], ext: MMOLove | None = None) -> Flask:
    app, create_account = _base("referral_portal")
    app.config.update(config)
    (ext or MMOLove()).init_app(app)

    @app.route("/register", methods=["GET", "POST"])
    @referral_registered
    def register() -> Any:
        if request.method == "POST":
            set_referee(create_account())
            return redirect("/welcome")
        return "form"

    return app


def guide_portal(secret: str, server_id: str, endpoint: str) -> Flask:
    app, create_account = _base("guide_portal")
    send = guide_send_event()

    def handle_result(status: int, body: str) -> bool:
        # The guide's handle_result, without its print and retry queue.
        with contextlib.suppress(ValueError):
            json.loads(body)
        return status == 200

    @app.route("/register", methods=["GET", "POST"])
    def register() -> Any:
        if request.method == "POST":
            mmref = request.args.get("mmref") or request.cookies.get("mmref")
            user_id = create_account()
            if mmref:
                status, body = send(
                    secret,
                    server_id,
                    "registered",
                    {
                        "token": mmref,
                        "referee_identity": user_id,
                        "server_event_id": f"reg-{user_id}",
                    },
                    endpoint,
                )
                handle_result(status, body)
            return redirect("/welcome")
        return "form"

    return app
