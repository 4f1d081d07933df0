"""Helpers every test suite here uses: a hand-moved clock, polling with a deadline, and
the test PostgreSQL database."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, NoReturn

import pytest


class FakeClock:
    """A clock moved by hand: backoff, leases and token ages without sleeping.

    It starts at ``start``, or at the real time when none is given.
    """

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "it") -> Any:
    """Poll until ``predicate()`` is truthy and return its value; fail naming ``what``
    when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def missing(reason: str) -> NoReturn:
    """Skip a test whose machinery is missing here, but fail in CI, which has it all."""
    if os.environ.get("MMOLOVE_REQUIRE_ALL_TESTS"):
        pytest.fail(f"{reason} (required: MMOLOVE_REQUIRE_ALL_TESTS is set)")
    pytest.skip(reason)


def postgres_url() -> str:
    """The test PostgreSQL URL; skip without one, but fail in CI, where it must be set."""
    url = os.environ.get("MMOLOVE_TEST_POSTGRES_URL", "").strip()
    if not url:
        if os.environ.get("MMOLOVE_REQUIRE_ALL_TESTS"):
            pytest.fail("MMOLOVE_TEST_POSTGRES_URL must be set in CI")
        pytest.skip("set MMOLOVE_TEST_POSTGRES_URL to run PostgreSQL tests")
    return url
