"""A small portal built the way the README teaches, and helpers to watch it."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask, abort, g, jsonify, redirect, request

from flask_mmolove import (
    MMOLove,
    player_qualified,
    referee_registered,
    referral_registered,
    referral_rejected,
    referrer_credited,
    set_referee,
)


class Recorder:
    """Collects what each outcome signal said, for one app."""

    def __init__(self, app: Flask) -> None:
        self.registered: list[dict[str, Any]] = []
        self.credited: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self._receivers: list[tuple[Any, Callable[..., None]]] = []
        for signal, into in (
            (referee_registered, self.registered),
            (referrer_credited, self.credited),
            (referral_rejected, self.rejected),
        ):

            def receiver(sender: Flask, _into: list[dict[str, Any]] = into, **kw: Any) -> None:
                _into.append(kw)

            signal.connect(receiver, sender=app, weak=False)
            self._receivers.append((signal, receiver))

    def disconnect(self) -> None:
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)


def build_portal(config: dict[str, Any], ext: MMOLove | None = None) -> Flask:
    """The README's portal: /register creates an account, /play/<id> is the milestone."""
    app = Flask(__name__)
    app.config.update(SECRET_KEY="test-" + uuid.uuid4().hex, **config)
    (ext or MMOLove()).init_app(app)
    accounts: dict[str, str] = {}

    @app.route("/register", methods=["GET", "POST"])
    @referral_registered
    def register() -> Any:
        if request.method == "POST":
            name = request.form.get("name", "")
            if not name:
                abort(400)
            if request.form.get("explode"):
                raise RuntimeError("the portal's own bug")
            user_id = str(len(accounts) + 1000)
            accounts[user_id] = name
            set_referee(user_id)
            return redirect("/welcome")
        return jsonify(mmref=g.mmref)

    @app.post("/register-async")
    @referral_registered
    async def register_async() -> Any:
        set_referee(request.form["id"])
        return "created", 201

    @app.post("/register-callable")
    @referral_registered(identity=lambda: request.form["id"])
    def register_callable() -> Any:
        return "created", 201

    @app.post("/register-no-identity")
    @referral_registered
    def register_no_identity() -> Any:
        return "created", 201

    @app.post("/register-rejected")
    @referral_registered
    def register_rejected() -> Any:
        set_referee(request.form["id"])
        return "name taken", 409

    @app.get("/page")
    def page() -> Any:
        return jsonify(mmref=g.mmref)

    @app.post("/play/<user_id>")
    def play(user_id: str) -> Any:
        player_qualified.send(app, identity=user_id)
        if request.form.get("fail"):
            abort(500)
        return "level up"

    return app


@contextmanager
def portals(base_config: dict[str, Any]) -> Iterator[Callable[..., Flask]]:
    """A factory of README-style portals on ``base_config``; stops them all at the end."""
    made: list[tuple[MMOLove, Flask]] = []

    def factory(ext: MMOLove | None = None, **overrides: Any) -> Flask:
        ext = ext or MMOLove()
        app = build_portal({**base_config, **overrides}, ext)
        made.append((ext, app))
        return app

    try:
        yield factory
    finally:
        for ext, app in made:
            ext.shutdown(app)
