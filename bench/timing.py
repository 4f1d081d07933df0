"""Taking the measurements: interleaved rounds, and the time of one call.

Timing is interleaved (baseline and candidate alternate, round after round) and
summarised by medians (bench/stats.py), so drift of the machine (another process,
frequency scaling) falls on both sides alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


def interleaved(cases: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every case once per round, alternating the order (ABC, CBA, ...).

    Each case returns one measurement; the result maps case -> one value per round.
    """
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for n in range(rounds):
        for name in names if n % 2 == 0 else reversed(names):
            samples[name].append(cases[name]())
    return samples


def per_call(func: Callable[[], object], n: int) -> float:
    """Seconds per call of ``func``, over ``n`` calls."""
    started = time.perf_counter()
    for _ in range(n):
        func()
    return (time.perf_counter() - started) / n
