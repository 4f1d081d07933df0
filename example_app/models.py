"""The portal's own accounts and the rewards its players earned by referring friends."""

from __future__ import annotations

import secrets
from datetime import datetime, timezone

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .extensions import Base

XP_PER_LEVEL = 100
#: No 0/O or 1/l/I: a code is read aloud and typed from screenshots.
_CODE_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


def new_share_code() -> str:
    return "".join(secrets.choice(_CODE_ALPHABET) for _ in range(8))


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class User(Base):
    """A player account. Implements what Flask-Login asks of a user object."""

    __tablename__ = "players"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(32), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    #: What the player's share link carries as ``ref``: how a referral finds its way
    #: back to the referrer when MMOLove credits it.
    share_code: Mapped[str] = mapped_column(String(16), unique=True, default=new_share_code)
    xp: Mapped[int] = mapped_column(default=0)
    gold: Mapped[int] = mapped_column(default=0)
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Set once, when the player first reaches the milestone level.
    reached_milestone_at: Mapped[datetime | None] = mapped_column(default=None)

    @property
    def level(self) -> int:
        return 1 + self.xp // XP_PER_LEVEL

    @property
    def xp_into_level(self) -> int:
        return self.xp % XP_PER_LEVEL

    # Flask-Login's user protocol, spelled out rather than inherited from UserMixin.
    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def is_active(self) -> bool:
        return True

    @property
    def is_anonymous(self) -> bool:
        return False

    def get_id(self) -> str:
        return str(self.id)


class Reward(Base):
    """What a referrer earned when one referee reached the milestone.

    One row per referee, ever: the unique ``referee_id`` is what makes the grant
    idempotent, since ``referrer_credited`` is delivered at least once.
    """

    __tablename__ = "referral_rewards"

    id: Mapped[int] = mapped_column(primary_key=True)
    referee_id: Mapped[int] = mapped_column(ForeignKey("players.id"), unique=True)
    #: None when the token does not say who shared it (see rewards.referrer_code).
    referrer_id: Mapped[int | None] = mapped_column(ForeignKey("players.id"), index=True)
    gold: Mapped[int]
    granted_at: Mapped[datetime] = mapped_column(default=utcnow)

    referee: Mapped[User] = relationship(foreign_keys=[referee_id], lazy="joined")


class VoteReward(Base):
    """What a player earned for one vote on MMOLove (``heart_counted``).

    One row per vote, keyed by MMOLove's ``heart_id``: granted through ``db.session``,
    it commits with flask-mmolove's record of the vote, once.
    """

    __tablename__ = "vote_rewards"

    heart_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    #: What the voter typed on MMOLove.
    username: Mapped[str] = mapped_column(String(255))
    #: None when no player has that name: the vote is kept, nobody is paid.
    player_id: Mapped[int | None] = mapped_column(ForeignKey("players.id"), index=True)
    gold: Mapped[int]
    granted_at: Mapped[datetime] = mapped_column(default=utcnow)
