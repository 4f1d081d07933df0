"""The statistics the benchmarks judge their goals by (``bench.stats``): no timing here."""

from __future__ import annotations

import math
import random

import pytest

from bench.stats import median_interval


def binomial_coverage(n: int, k: int) -> float:
    """P(x(k) <= median <= x(n-k+1)) for n draws of any continuous distribution."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n


@pytest.mark.parametrize("n", [6, 9, 15, 31, 41, 100])
def test_median_interval_is_the_narrowest_pair_of_order_statistics_at_95_percent(n: int) -> None:
    values = list(range(1, n + 1))
    random.Random(n).shuffle(values)
    low, high = median_interval(values)
    k = low
    assert high == n - k + 1, "symmetric order statistics"
    assert binomial_coverage(n, k) >= 0.95
    assert binomial_coverage(n, k + 1) < 0.95, "the next pair inward would cover less"


def test_median_interval_with_too_few_values_is_the_whole_range() -> None:
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0)
    assert median_interval([7.0]) == (7.0, 7.0)
    with pytest.raises(ValueError, match="no values"):
        median_interval([])


def test_median_interval_holds_the_true_median_as_often_as_it_says() -> None:
    # Skewed noise, as a loaded VM gives: exponential, true median ln 2.
    rng = random.Random(20261124)
    trials = 4000
    hits = 0
    for _ in range(trials):
        low, high = median_interval([rng.expovariate(1.0) for _ in range(31)])
        hits += low <= math.log(2) <= high
    assert 0.95 <= hits / trials <= 0.99  # 31 values: the exact coverage is 97.1%
