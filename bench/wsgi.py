"""The benchmark portals as WSGI apps for gunicorn: ``gunicorn bench.wsgi:app``.

``BENCH_PORTAL`` picks the portal (``plain`` or ``referral``); the referral portal's
outbox is ``BENCH_DATABASE_URI`` and it never needs to reach MMOLove here.
"""

from __future__ import annotations

import os

from .portals import plain_portal, referral_portal

if os.environ.get("BENCH_PORTAL", "plain") == "referral":
    app = referral_portal(
        {
            "MMOLOVE_SERVER_ID": "bench",
            "MMOLOVE_REFERRAL_SECRET": "bench-secret",
            "MMOLOVE_ENDPOINT": "http://127.0.0.1:9/api/referral/events",
            "MMOLOVE_DATABASE_URI": os.environ["BENCH_DATABASE_URI"],
            "MMOLOVE_DELIVERY": os.environ.get("BENCH_DELIVERY", "thread"),
        }
    )
else:
    app = plain_portal()
