"""The portal as a separate process, for tests that kill, fork and exit processes.

Settings come from the environment: ``MMOLOVE_SERVER_ID``, ``MMOLOVE_REFERRAL_SECRET``
and ``MMOLOVE_ENDPOINT`` as in production, every other key as ``PORTAL_<KEY>`` (JSON,
read by ``app.config.from_prefixed_env``). Each outcome signal appends
``<pid> <signal> <identity>`` to the file ``PORTAL_JOURNAL`` names.

Used as ``flask --app procapp.py mmolove worker``, as ``gunicorn procapp:app``, and as
``python procapp.py enqueue TOKENS_FILE`` (register one player per token, then exit).

``PORTAL_RECEIVER_SECONDS`` makes the ``referrer_credited`` receiver take that long
before it journals, as a portal's grant does when it is an RPC to the game server.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from flask import Flask, g, jsonify, request

from flask_mmolove import (
    MMOLove,
    player_qualified,
    referee_registered,
    referral_registered,
    referral_rejected,
    referrer_credited,
    set_referee,
)


def _journal(line: str) -> None:
    path = os.environ.get("PORTAL_JOURNAL")
    if path:
        # O_APPEND: one short write per line, whole, whichever process writes it.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["SECRET_KEY"] = "procapp-" + os.environ.get("MMOLOVE_SERVER_ID", "")
    app.config.from_prefixed_env("PORTAL")
    MMOLove(app)

    for name, signal in (
        ("registered", referee_registered),
        ("credited", referrer_credited),
        ("rejected", referral_rejected),
    ):

        def receiver(sender: Flask, _name: str = name, **kw: Any) -> None:
            if _name == "credited":
                time.sleep(float(app.config.get("RECEIVER_SECONDS", 0)))
            _journal(f"{os.getpid()} {_name} {kw['identity']}")

        signal.connect(receiver, sender=app, weak=False)

    @app.get("/pid")
    def pid() -> Any:
        return jsonify(pid=os.getpid())

    @app.route("/register", methods=["GET", "POST"])
    @referral_registered
    def register() -> Any:
        if request.method == "POST":
            set_referee(request.form["id"])
            return jsonify(pid=os.getpid()), 201
        return jsonify(mmref=g.mmref, pid=os.getpid())

    @app.post("/play/<identity>")
    def play(identity: str) -> Any:
        player_qualified.send(app, identity=identity)
        return jsonify(pid=os.getpid())

    return app


app = create_app()


def enqueue(tokens_file: str) -> None:
    """Register one player per token through the views, then let the process exit."""
    client = app.test_client()
    for n, token in enumerate(Path(tokens_file).read_text().split()):
        client.get(f"/register?mmref={token}")
        assert client.post("/register", data={"id": f"x{n}"}).status_code == 201
    print(f"enqueued; exiting at {time.time():.6f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["enqueue"]:
        enqueue(sys.argv[2])
    else:
        raise SystemExit("usage: procapp.py enqueue TOKENS_FILE")
