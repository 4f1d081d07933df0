"""The portal's extension objects, created once and bound to each app in create_app."""

from __future__ import annotations

from flask_login import LoginManager
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect
from sqlalchemy.orm import DeclarativeBase

from flask_mmolove import MMOLove


class Base(DeclarativeBase):
    pass


# Objects stay usable after commit: a view that commits and then reads the player
# (to send player_qualified, say) must not reopen a read transaction that SQLite
# would hold until the request ends.
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})
login_manager = LoginManager()
login_manager.login_view = "portal.login"
login_manager.login_message = "Log in to play."
csrf = CSRFProtect()
mmolove = MMOLove()
