"""Means with 95% intervals and rank correlations: what tables and checks report.

Intervals are bootstrap percentile intervals of the mean with a fixed seed, so the same
values give the same interval; they need no normality (pointing-game values are 0 or 1) and
stay inside the metric's range. NaN values (a sample a metric does not apply to) are left
out and the count says how many remain.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
"""Bootstrap resamples: the interval's ends move by well under 0.01 between seeds at this count."""


def mean_interval(values: Sequence[float], seed: int = 0, resamples: int = RESAMPLES,
                  confidence: float = CONFIDENCE) -> dict[str, float | int | None]:
    """``{"mean", "low", "high", "n"}`` of the finite values; None entries when there are none."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(arr.mean())
    if arr.size == 1:
        return {"mean": mean, "low": mean, "high": mean, "n": 1}
    rng = np.random.default_rng([seed, 0xB007])
    means = arr[rng.integers(0, arr.size, size=(resamples, arr.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": mean, "low": float(min(low, mean)), "high": float(max(high, mean)), "n": int(arr.size)}


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values`` (flattened), tied values sharing the mean of their ranks."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(flat, kind="stable")
    ranks = np.empty(flat.size, dtype=np.float64)
    sorted_vals = flat[order]
    start = 0
    while start < flat.size:
        stop = start + 1
        while stop < flat.size and sorted_vals[stop] == sorted_vals[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop + 1) / 2.0  # mean of ranks start+1 .. stop
        start = stop
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps of the same shape.

    Identical maps correlate 1 (constant ones included); a constant map has no ranking, so
    its correlation with any other map is 0. Non-finite values give NaN.
    """
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"maps of {np.shape(a)} and {np.shape(b)} values cannot be correlated")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    if np.array_equal(x, y):
        return 1.0
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float(np.clip((rx @ ry) / np.sqrt((rx @ rx) * (ry @ ry)), -1.0, 1.0))
