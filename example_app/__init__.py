"""Emberfall's portal: the flask-mmolove demo. Run it with ``python -m example_app``.

A small fictional MMO's site using the extension the way the README teaches: an mmref
token captured on /register, ``registered`` reported when the account is created,
``qualified`` when the player reaches the milestone level, and the referrer rewarded
when MMOLove credits the referral. Operators see deliveries at /mmolove/.
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
