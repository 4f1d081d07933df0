"""Turning MMOLove's ``referrer_credited`` into gold for the player who shared the link,
and ``heart_counted`` (a vote for the server) into gold for the voter."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from flask import Flask, current_app
from sqlalchemy import select, update

from flask_mmolove import Outcome, heart_counted, referrer_credited
from flask_mmolove.sandbox import INGEST_PATH, TokenError, TokenMinter, derive_token_key
from flask_mmolove.settings import Settings
from flask_mmolove.state import get_state

from .extensions import db
from .models import Reward, User, VoteReward

logger = logging.getLogger("example_app")


def _settings() -> Settings:
    return get_state().settings


def share_link(code: str) -> str:
    """The link a player hands out: MMOLove's share link with the player's code as ref.

    MMOLove's host is where the events go, so the link is built from
    ``MMOLOVE_ENDPOINT`` unless ``PORTAL_SHARE_LINK_BASE`` names another base.
    """
    settings = _settings()
    base = current_app.config.get("PORTAL_SHARE_LINK_BASE")
    if not base:
        endpoint: str = settings.endpoint
        if endpoint.endswith(INGEST_PATH):
            base = endpoint[: -len(INGEST_PATH)]
        else:
            parts = urlsplit(endpoint)
            base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
    server = quote(settings.server_id, safe="")
    return f"{str(base).rstrip('/')}/r/{server}?ref={quote(code, safe='')}"


def referrer_code(token: str) -> str | None:
    """The share code a token was minted for, if this portal can read the token.

    MMOLove's tokens are opaque to portals: MMOLove itself knows the referrer. The
    flask-mmolove sandbox, which this demo runs against, mints signed tokens that
    carry the code, so the demo can show a reward landing on the referrer's account.
    Against real MMOLove this returns None and the reward is recorded unassigned.
    """
    settings = _settings()
    key = current_app.config.get("PORTAL_SANDBOX_TOKEN_KEY") or derive_token_key(
        settings.secret.reveal()
    )
    try:
        claims = TokenMinter(key).decode(token)
    except TokenError:
        return None
    if claims.server_id != settings.server_id:
        return None
    return claims.referrer


def grant_referral_reward(referee_identity: str, token: str) -> Reward | None:
    """Grant the referrer's reward for this referee, through ``db.session``.

    Not committed here: flask-mmolove runs this receiver in a transaction of
    ``db.session`` that also records the credit as announced, and commits both once
    every receiver has returned (rolls both back if one raises). The reward is granted
    exactly once without any check of ours, even if the process dies mid-way.
    """
    try:
        referee_id = int(referee_identity)
    except ValueError:
        logger.warning("referrer_credited for %r, which is not one of our ids", referee_identity)
        return None
    code = referrer_code(token)
    referrer = None
    if code is not None:
        referrer = db.session.execute(
            select(User).where(User.share_code == code)
        ).scalar_one_or_none()
    if referrer is not None and referrer.id == referee_id:
        logger.warning("player %d followed their own share link: no reward", referee_id)
        referrer = None
    amount = int(current_app.config["PORTAL_REFERRAL_REWARD"]) if referrer else 0
    reward = Reward(
        referee_id=referee_id,
        referrer_id=referrer.id if referrer else None,
        gold=amount,
    )
    db.session.add(reward)
    if referrer is not None:
        # Added in SQL, not in Python: the referrer may be spending gold right now.
        db.session.execute(
            update(User).where(User.id == referrer.id).values(gold=User.gold + amount)
        )
    logger.info(
        "referral reward: %d gold to player %s for referee %d",
        amount,
        referrer.id if referrer else "(unknown referrer)",
        referee_id,
    )
    return reward


def grant_vote_reward(username: str, heart_id: str, payload: dict[str, Any]) -> VoteReward:
    """Pay the voter for one vote, through ``db.session`` (committed by flask-mmolove
    with its record of the vote, once). A daily streak of a week or more pays double.
    A name no player has is kept, unpaid: MMOLove has its answer already."""
    player = db.session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    streak = payload.get("streak_day")
    amount = int(current_app.config["PORTAL_VOTE_REWARD"]) if player else 0
    if isinstance(streak, int) and streak >= 7:
        amount *= 2
    reward = VoteReward(
        heart_id=heart_id, username=username, player_id=player.id if player else None, gold=amount
    )
    db.session.add(reward)
    if player is not None:
        db.session.execute(update(User).where(User.id == player.id).values(gold=User.gold + amount))
    logger.info("vote reward: %d gold to %r (heart %s)", amount, username, heart_id)
    return reward


def connect_rewards(app: Flask) -> None:
    """Grant rewards when MMOLove credits one of ``app``'s referrals, and for votes."""

    @heart_counted.connect_via(app)
    def on_heart_counted(
        sender: Flask, username: str, heart_id: str, payload: dict[str, Any], **kwargs: Any
    ) -> None:
        grant_vote_reward(username, heart_id, payload)

    @referrer_credited.connect_via(app)
    def on_referrer_credited(sender: Flask, **kwargs: Any) -> None:
        if kwargs.get("outcome") is Outcome.TEST:
            # MMOLOVE_TEST_MODE sends dry runs: nothing was credited for real.
            logger.info("dry-run credit for referee %s: no reward", kwargs.get("identity"))
            return
        # Raising here is fine: the extension sends the signal again later.
        grant_referral_reward(str(kwargs["identity"]), str(kwargs["token"]))
