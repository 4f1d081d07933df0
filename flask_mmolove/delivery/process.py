"""Delivery's process hooks: a fresh start in a forked child, a bounded drain at exit.

The only module of the package that registers with the interpreter
(``os.register_at_fork``, ``atexit``); the objects it serves register with it.
"""

from __future__ import annotations

import atexit
import os
import weakref
from typing import Protocol


class _ForkAware(Protocol):
    def after_fork(self) -> None: ...


class _Drainable(Protocol):
    @property
    def drain_timeout(self) -> float: ...

    def stop(self, drain: float = 0.0) -> None: ...


_renewed: weakref.WeakSet[_ForkAware] = weakref.WeakSet()
_to_drain: weakref.WeakSet[_Drainable] = weakref.WeakSet()


def renew_after_fork(obj: _ForkAware) -> None:
    """Have ``obj.after_fork()`` called in every child forked from this process.

    Held weakly: an object collected is forgotten.
    """
    _renewed.add(obj)


def drain_at_exit(background: _Drainable) -> None:
    """Stop ``background`` when the process exits, delivering what is due for at most
    its ``drain_timeout`` seconds. Held weakly."""
    _to_drain.add(background)


def forget(background: _Drainable) -> None:
    """Undo :func:`drain_at_exit` (the background was stopped for good)."""
    _to_drain.discard(background)


def _after_fork_in_child() -> None:
    for obj in list(_renewed):
        obj.after_fork()


@atexit.register
def _drain_all() -> None:
    for background in list(_to_drain):
        background.stop(drain=background.drain_timeout)


os.register_at_fork(after_in_child=_after_fork_in_child)
