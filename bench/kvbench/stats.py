"""Counts with intervals and paired comparisons, for benchmarks that report retrieval rates."""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> Tuple[float, float]:
    """Wilson score interval (95% by default) of a proportion ``successes / n``; (0, 1) when n is 0.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n successes,
    which is where small benchmark counts sit."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value of paired outcomes ``a`` and ``b`` on the same cases: a binomial
    test of the discordant pairs (only ``a`` right against only ``b`` right). 1.0 when none differ."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def count_with_interval(successes: int, n: int) -> str:
    """``"3/10 (11-60%)"``: a count and its Wilson 95% interval, for tables."""
    lo, hi = wilson_interval(successes, n)
    return f"{successes}/{n} ({100 * lo:.0f}-{100 * hi:.0f}%)"


def bootstrap_interval(values: Sequence[float], n_resamples: int = 4000, seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``values`` (one value per context: the resampled unit)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(_resampled_means(x, n_resamples, seed), [2.5, 97.5])
    return float(lo), float(hi)


def paired_bootstrap_p(a: Sequence[float], b: Sequence[float], n_resamples: int = 4000, seed: int = 0) -> float:
    """Two-sided bootstrap p-value that the mean of the paired differences ``a - b`` is zero (contexts resampled)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size == 0:
        return 1.0
    means = _resampled_means(d, n_resamples, seed)
    tail = min((means <= 0).mean(), (means >= 0).mean())
    return float(min(1.0, 2 * tail))


def _resampled_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` resamples of ``x`` with replacement (seeded: tables rebuild identically)."""
    rng = np.random.default_rng(seed)
    return x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
