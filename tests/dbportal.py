"""A Flask-SQLAlchemy portal with the outbox in its transaction (``db=``), as a process.

For tests that kill the portal at the worst moments. Settings come from the environment
as for procapp.py: ``MMOLOVE_SERVER_ID``, ``MMOLOVE_REFERRAL_SECRET``,
``MMOLOVE_ENDPOINT``, and every other key as ``PORTAL_<KEY>`` (JSON), the portal's
database in ``PORTAL_SQLALCHEMY_DATABASE_URI``. ``PORTAL_DIE_AFTER`` names the moment
the process SIGKILLs itself:

- ``register-commit`` / ``play-commit``: right after the view's commit, before it answers;
- ``grant-flush``: in ``referrer_credited``, after the grant is flushed, before the
  extension commits it.

Used as ``python dbportal.py create`` (the tables), ``python dbportal.py register TOKEN ID``
and ``python dbportal.py play ID`` (one request through the views), and as
``flask --app dbportal mmolove worker``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import sqlalchemy as sa
from flask import Flask, current_app, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_mmolove import MMOLove, player_qualified, referral_registered, referrer_credited
from flask_mmolove import set_referee as name_referee


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Player(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "players"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    level: Mapped[int] = mapped_column(default=1)


class Grant(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "grants"
    id: Mapped[int] = mapped_column(primary_key=True)
    referee: Mapped[str] = mapped_column(sa.String(80))


def _die_after(moment: str) -> None:
    if current_app.config.get("DIE_AFTER") == moment:
        os.kill(os.getpid(), signal.SIGKILL)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["SECRET_KEY"] = "dbportal-" + os.environ.get("MMOLOVE_SERVER_ID", "")
    app.config.from_prefixed_env("PORTAL")
    db.init_app(app)
    if app.config.get("STANDALONE"):
        # The control: the outbox beside the portal, written when the request finishes.
        MMOLove(app)
    else:
        MMOLove(app, db=db)

    @app.route("/register", methods=["GET", "POST"])
    @referral_registered
    def register() -> Any:
        if request.method == "GET":
            return "the form"
        player = Player(id=int(request.form["id"]))
        db.session.add(player)
        db.session.flush()
        name_referee(player.id)
        db.session.commit()
        _die_after("register-commit")
        return "created", 201

    @app.post("/play/<int:player_id>")
    def play(player_id: int) -> Any:
        player = db.session.get(Player, player_id)
        assert player is not None
        player.level += 1
        player_qualified.send(app, identity=str(player_id))
        db.session.commit()
        _die_after("play-commit")
        return "level up"

    @referrer_credited.connect_via(app)
    def grant(sender: Flask, identity: str, **extra: Any) -> None:
        # Through db.session and not committed: the extension commits it with the
        # credit's record.
        db.session.add(Grant(referee=identity))
        db.session.flush()
        _die_after("grant-flush")

    return app


app = create_app()


def main(argv: list[str]) -> None:
    if argv[:1] == ["create"]:
        with app.app_context():
            db.create_all()
        return
    client = app.test_client()
    if argv[:1] == ["register"] and len(argv) == 3:
        client.get(f"/register?mmref={argv[1]}")
        response = client.post("/register", data={"id": argv[2]})
    elif argv[:1] == ["play"] and len(argv) == 2:
        response = client.post(f"/play/{argv[1]}")
    else:
        raise SystemExit("usage: dbportal.py create | register TOKEN ID | play ID")
    print(response.status_code, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
