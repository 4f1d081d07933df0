"""The operator view of referral deliveries, as a blueprint the portal mounts itself.

Off by default: nothing is mounted until the portal calls :func:`init_dashboard` (or
registers :func:`create_dashboard_blueprint`), and even then every page answers 404
unless the portal supplies an ``access_check`` that returns True for the current
request::

    from flask_login import current_user
    from flask_mmolove.dashboard import init_dashboard

    init_dashboard(app, access_check=lambda: current_user.is_authenticated
                   and current_user.is_admin)

The pages list pending, delivered and dead-lettered events with their attempts, last
status and error, and offer a CSRF-protected "retry" for dead letters. The signing
secret is never shown, even where MMOLove's answer echoes it.
"""

from __future__ import annotations

from .blueprint import (
    BLUEPRINT_NAME,
    DEFAULT_URL_PREFIX,
    AccessCheck,
    create_dashboard_blueprint,
    init_dashboard,
)

__all__ = [
    "BLUEPRINT_NAME",
    "DEFAULT_URL_PREFIX",
    "AccessCheck",
    "create_dashboard_blueprint",
    "init_dashboard",
]
