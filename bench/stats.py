"""The statistics the benchmarks judge their goals by: medians, quantiles, paired
ratios and a distribution-free interval for the median.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1), linear between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def paired_ratios(candidate: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Each round's candidate over that round's baseline."""
    return [c / b for c, b in zip(candidate, baseline, strict=True)]


def paired_ratio(candidate: Sequence[float], baseline: Sequence[float]) -> float:
    """The median of per-round ratios: each round's candidate over that round's baseline."""
    return median(paired_ratios(candidate, baseline))


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median: two order statistics of ``values``.

    With n values, [x(k), x(n-k+1)] holds the true median with probability
    1 - 2 P(Binomial(n, 1/2) < k), whatever the distribution: noise on a shared VM is
    skewed and has outliers, so no normal approximation. The largest k that keeps
    ``confidence`` is used; too few values for it give the whole range (n = 5: 94%).
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values")
    best, below = 1, 0.0
    for k in range(1, (n + 1) // 2 + 1):
        below += math.comb(n, k - 1) / 2**n  # P(Binomial(n, 1/2) < k)
        if 1 - 2 * below < confidence:
            break
        best = k
    return ordered[best - 1], ordered[n - best]
