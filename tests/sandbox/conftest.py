"""Fixtures of the sandbox tests: a hand-moved clock, and a sandbox that keeps its time."""

from __future__ import annotations

import pytest
from sandbox_support import T0, Factory
from support import FakeClock

from flask_mmolove.sandbox import SandboxServer


@pytest.fixture
def clock() -> FakeClock:
    """A clock at T0 that moves only when a test advances it."""
    return FakeClock(T0)


@pytest.fixture
def clocked(mmolove_sandbox_factory: Factory, clock: FakeClock) -> SandboxServer:
    """A running sandbox on ``clock``: token ages and the replay window follow it."""
    return mmolove_sandbox_factory(clock=clock)
