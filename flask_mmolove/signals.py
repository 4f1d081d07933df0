"""Signals of the referral lifecycle.

Every signal's sender is the Flask app (``current_app._get_current_object()``), so a
receiver connected with ``signal.connect_via(app)`` hears only its own app.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: Sent by the portal when a player reaches its milestone; the extension answers by
#: enqueueing ``qualified`` for the player's bound token. Sender: the app.
#: Keyword arguments: ``identity`` (the referee's stable id, as given to
#: ``set_referee``), and optionally ``token`` (when the portal keeps the token itself)
#: and ``server_event_id`` (default ``"qual-<identity>"``).
player_qualified = _signals.signal("player-qualified")

#: Sent when MMOLove accepted ``registered``. Sender: the app. Keyword arguments:
#: ``identity``, ``token``, ``result`` (the :class:`~flask_mmolove.SendResult`) and
#: ``outcome`` (its :class:`~flask_mmolove.Outcome`; ``FIRST_TOUCH_CONFLICT`` means
#: another referrer registered this referee first).
referee_registered = _signals.signal("referee-registered")

#: Sent exactly once per referee when MMOLove accepted ``qualified``: grant the
#: referrer's reward here. Sender: the app. Keyword arguments: ``identity``, ``token``,
#: ``result`` (a :class:`~flask_mmolove.SendResult` rebuilt from the stored answer) and
#: ``outcome`` (``Outcome.TEST`` for a dry run in ``MMOLOVE_TEST_MODE``). If a receiver
#: raises, the signal is sent again later; should the process die between your grant
#: and its record, it is sent again once the lease expires, so make the grant
#: idempotent on ``identity`` (one credit per referee, ever).
referrer_credited = _signals.signal("referrer-credited")

#: Sent when an event was dead-lettered: MMOLove refused it for good, or it outlived
#: ``MMOLOVE_MAX_AGE``. Sender: the app. Keyword arguments: ``identity``, ``token``,
#: ``event`` (``"registered"`` or ``"qualified"``), ``event_id`` (the outbox row, for
#: ``flask mmolove retry``), ``status`` (None for a transport failure), ``error`` (the
#: answer's body) and ``hint`` (what to fix).
referral_rejected = _signals.signal("referral-rejected")

#: Sent once per vote MMOLove's reward callback delivered (``heart.counted``), from the
#: deliverer, after the vote was kept: grant the voter's reward here. Sender: the app.
#: Keyword arguments: ``username`` (what the voter typed on MMOLove: the portal decides
#: whose account that is, and may find none), ``heart_id`` (MMOLove's id of the vote)
#: and ``payload`` (every field received: ``streak_day``, ``period`` and any other).
#: The same contract as ``referrer_credited``: exactly once when the receiver grants
#: through ``db.session`` with ``db=``; otherwise at least once (make the grant
#: idempotent on ``heart_id``). Test callbacks (``heart.test``) are never sent.
heart_counted = _signals.signal("heart-counted")
