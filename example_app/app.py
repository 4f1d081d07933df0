"""The app factory of Emberfall's portal, the demo of flask-mmolove."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask, abort, current_app, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from flask_mmolove.dashboard import init_dashboard

from .extensions import csrf, db, login_manager, mmolove
from .models import User
from .rewards import connect_rewards
from .views import bp

DEFAULTS: dict[str, Any] = {
    "PORTAL_NAME": "Emberfall",
    #: Reaching this level is the referral milestone (MMOLove's "qualified").
    "PORTAL_MILESTONE_LEVEL": 3,
    "PORTAL_XP_PER_QUEST": 50,
    #: Gold for the referrer when a referee reaches the milestone.
    "PORTAL_REFERRAL_REWARD": 500,
    #: Gold for a vote on MMOLove (double from a week's daily streak).
    "PORTAL_VOTE_REWARD": 50,
    #: Where share links point; None derives it from MMOLOVE_ENDPOINT.
    "PORTAL_SHARE_LINK_BASE": None,
    #: The key the sandbox signs tokens with, if not derived from the secret.
    "PORTAL_SANDBOX_TOKEN_KEY": None,
    #: Links for the home page's walkthrough; set by ``python -m example_app``.
    "PORTAL_DEMO_GUIDE": None,
    "SESSION_COOKIE_SAMESITE": "Lax",
}


def _secret_key(instance: Path) -> str:
    """A key kept in the instance folder, so sessions outlive a restart of the demo."""
    path = instance / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        key = secrets.token_hex(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key)
        return key


def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    # WAL lets the delivery thread write a reward while a request's connection reads.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA busy_timeout = 15000")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def operator_only() -> bool:
    """The dashboard's access check: the admin account, and nobody else."""
    if not current_user.is_authenticated:
        # Abort with a redirect rather than 403, so an operator lands on the login page.
        abort(redirect(url_for("portal.login", next=request.full_path)))
    return bool(current_user.is_admin)


def _error_page(error: HTTPException) -> ResponseReturnValue:
    return render_template("error.html", error=error), error.code or 500


def _csrf_error(error: CSRFError) -> ResponseReturnValue:
    return render_template("error.html", error=error, csrf_failed=True), 400


def load_user(user_id: str) -> User | None:
    try:
        return db.session.get(User, int(user_id))
    except ValueError:
        return None


login_manager.user_loader(load_user)


def create_app(config: dict[str, Any] | None = None, *, instance_path: str | None = None) -> Flask:
    """Build the portal. ``config`` overrides the defaults and ``MMOLOVE_*`` settings.

    MMOLove's server id, secret and endpoint come from ``config`` or, failing that,
    from the environment, as flask-mmolove reads them.
    """
    app = Flask(__name__, instance_path=instance_path)
    instance = Path(app.instance_path)
    instance.mkdir(parents=True, exist_ok=True)
    app.config.update(DEFAULTS)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{instance / 'portal.sqlite3'}"
    app.config.update(config or {})
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = os.environ.get("SECRET_KEY") or _secret_key(instance)

    db.init_app(app)
    login_manager.init_app(app)
    csrf.init_app(app)
    # The referral tables live in the portal's database, and every referral write in
    # the transaction of the account or level it is about.
    mmolove.init_app(app, db=db)
    init_dashboard(app, access_check=operator_only)
    connect_rewards(app)
    app.register_blueprint(bp)
    app.register_error_handler(CSRFError, _csrf_error)
    for code in (400, 401, 403, 404, 405):
        app.register_error_handler(code, _error_page)

    with app.app_context():
        if db.engine.dialect.name == "sqlite":
            sa.event.listen(db.engine, "connect", _sqlite_pragmas)
        db.create_all()

    @app.context_processor
    def portal_globals() -> dict[str, Any]:
        return {"portal_name": current_app.config["PORTAL_NAME"]}

    return app
