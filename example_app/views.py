"""The portal's pages: home, register, log in and out, play, rewards."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import flask_login
from flask import (
    Blueprint,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_user, logout_user
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from werkzeug.security import check_password_hash, generate_password_hash

from flask_mmolove import player_qualified, referral_registered, set_referee

from .extensions import db
from .models import Reward, User, utcnow
from .rewards import share_link

bp = Blueprint("portal", __name__)

F = TypeVar("F", bound=Callable[..., Any])


def login_required(view: F) -> F:
    """Flask-Login's ``login_required``, with the type it lacks."""
    return cast(F, flask_login.login_required(view))


USERNAME = re.compile(r"[A-Za-z0-9_-]{3,32}")
MIN_PASSWORD = 8
#: A path of this site: one slash, then printable ASCII but space and backslash.
_LOCAL_PATH = re.compile(r"/(?![/\\])[!-\[\]-~]*", re.ASCII)


def player() -> User:
    """The logged-in player (only in views behind ``login_required``)."""
    return cast(User, current_user._get_current_object())


def _safe_next(target: str | None) -> str | None:
    r"""``target`` if it is a path of this site, else None (then the default page).

    Browsers drop tabs and line breaks anywhere in a URL, strip leading spaces and
    controls, and read a backslash as a slash: "/\t/evil.example" and "/\evil.example"
    lead off the site as "//evil.example" does, and a line break cannot go in a header.
    So a target is printable ASCII without space or backslash, one slash first, and
    has neither scheme nor host: whatever the encoding, it stays on the site.
    """
    if target is None or not _LOCAL_PATH.fullmatch(target):
        return None
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else None


@bp.get("/")
def home() -> ResponseReturnValue:
    return render_template("home.html")


def _registration_errors(username: str, password: str, confirm: str) -> dict[str, str]:
    errors: dict[str, str] = {}
    if not USERNAME.fullmatch(username):
        errors["username"] = "Use 3 to 32 letters, digits, '-' or '_'."
    if len(password) < MIN_PASSWORD:
        errors["password"] = f"Use at least {MIN_PASSWORD} characters."
    elif password != confirm:
        errors["confirm"] = "The two passwords differ."
    return errors


@bp.route("/register", methods=["GET", "POST"])
@referral_registered
def register() -> ResponseReturnValue:
    invited = g.get("mmref") is not None
    if current_user.is_authenticated:
        # A 4xx, not a redirect: @referral_registered reads a successful response
        # with a signed-in user as "this user just registered", and an existing
        # player must not become a friend's referee by following a share link.
        return render_template("signed_in.html", invited=invited), 403
    if request.method == "GET":
        return render_template("register.html", errors={}, username="", invited=invited)

    username = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    errors = _registration_errors(username, password, request.form.get("confirm", ""))
    if not errors:
        user = User(username=username, password_hash=generate_password_hash(password))
        db.session.add(user)
        try:
            db.session.flush()
        except IntegrityError:
            db.session.rollback()
            errors["username"] = "That name is taken."
        else:
            # The atomic order: the account flushed (it has its id), the referral
            # written in the same transaction, then one commit for both.
            set_referee(user.id)
            db.session.commit()
            login_user(user)
            flash(f"Welcome to {current_app.config['PORTAL_NAME']}, {user.username}!", "success")
            return redirect(url_for(".play"), 303)
    # 422, so that neither the browser nor @referral_registered takes it for success.
    return (
        render_template("register.html", errors=errors, username=username, invited=invited),
        422,
    )


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    next_url = _safe_next(request.values.get("next"))
    if request.method == "GET":
        return render_template("login.html", username="", next_url=next_url, failed=False)
    username = request.form.get("username", "").strip()
    user = db.session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    password = request.form.get("password", "")
    if user is None or not check_password_hash(user.password_hash, password):
        return (
            render_template("login.html", username=username, next_url=next_url, failed=True),
            401,
        )
    login_user(user)
    flash(f"Welcome back, {user.username}.", "success")
    return redirect(next_url or url_for(".play"), 303)


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    logout_user()
    flash("You are logged out.", "success")
    return redirect(url_for(".home"), 303)


@bp.route("/play", methods=["GET", "POST"])
@login_required
def play() -> ResponseReturnValue:
    user = player()
    milestone = int(current_app.config["PORTAL_MILESTONE_LEVEL"])
    if request.method == "GET":
        return render_template("play.html", user=user, milestone=milestone)

    before = user.level
    user.xp += int(current_app.config["PORTAL_XP_PER_QUEST"])
    reached = user.level >= milestone and user.reached_milestone_at is None
    if reached:
        user.reached_milestone_at = utcnow()
        # The milestone is MMOLove's "qualified": the extension records it, in this
        # transaction, for a player who arrived through a share link, and ignores
        # everyone else. The level and the event commit together.
        player_qualified.send(
            current_app._get_current_object(),  # type: ignore[attr-defined]
            identity=str(user.id),
        )
    db.session.commit()
    if reached:
        flash(f"Level {user.level}! You reached the milestone, level {milestone}.", "success")
    elif user.level > before:
        flash(f"Level up: you are level {user.level}.", "success")
    return redirect(url_for(".play"), 303)


@bp.get("/rewards")
@login_required
def rewards() -> ResponseReturnValue:
    user = player()
    earned = (
        db.session.execute(
            select(Reward).where(Reward.referrer_id == user.id).order_by(Reward.granted_at.desc())
        )
        .scalars()
        .all()
    )
    return render_template(
        "rewards.html",
        user=user,
        rewards=earned,
        share_link=share_link(user.share_code),
        milestone=int(current_app.config["PORTAL_MILESTONE_LEVEL"]),
    )
