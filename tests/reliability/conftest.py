"""Fixtures of the reliability proofs: the shared portal in worker mode, table prefixes,
and the summary of the figures they measured."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from reliability_support import FIGURES


@pytest.fixture
def portal_config(portal_config: dict[str, Any]) -> dict[str, Any]:
    """tests/conftest.py's portal, in worker mode, with short timeouts.

    Worker: nothing delivers behind a proof's back; each proof runs the delivery passes
    itself (``deliverer.run_once()``, as ``flask mmolove worker`` does) or starts real
    worker processes, and counts what each pass sent. Connect and read timeouts are
    shorter than the production defaults, so an MMOLove that stops answering costs a
    proof seconds. The backoff cap is the one docs/reliability.md's figures were
    measured with.
    """
    return {
        **portal_config,
        "MMOLOVE_DELIVERY": "worker",
        "MMOLOVE_RETRY_CAP": 0.4,
        "MMOLOVE_CONNECT_TIMEOUT": 2.0,
        "MMOLOVE_READ_TIMEOUT": 5.0,
    }


@pytest.fixture
def table_prefix() -> str:
    """A fresh table prefix, so tests sharing one PostgreSQL database never meet."""
    return "r" + uuid.uuid4().hex[:10] + "_"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the figures the reliability tests measured (docs/reliability.md)."""
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for name, figures in FIGURES:
        shown = ", ".join(f"{key}={value}" for key, value in figures.items())
        terminalreporter.write_line(f"{name}: {shown}")
    target = os.environ.get("MMOLOVE_RELIABILITY_FIGURES")
    if target:
        Path(target).write_text(json.dumps(dict(FIGURES), indent=2, sort_keys=True) + "\n")
