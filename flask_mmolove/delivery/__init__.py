"""Getting events from the outbox to MMOLove: one pass, a background thread, a worker.

- :mod:`.deliverer`: :class:`Deliverer` claims due events, sends them, records each
  answer as :func:`flask_mmolove.protocol.classify` judges it, and signals the portal.
- :mod:`.loop`: drain passes with a wait between them; :func:`run_worker`.
- :mod:`.background`: :class:`BackgroundDelivery`, the thread of ``thread`` mode.
- :mod:`.process`: what a forked child renews, and the bounded drain at exit.
"""

from .background import BackgroundDelivery
from .deliverer import Deliverer, PassReport
from .loop import run_worker
from .verdicts import backoff_delay

__all__ = [
    "BackgroundDelivery",
    "Deliverer",
    "PassReport",
    "backoff_delay",
    "run_worker",
]
