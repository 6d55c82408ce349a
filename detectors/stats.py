"""The distribution statistics the release gate (detectors/gate.py) and the sidecar's live
drift gauges (service/drift.py) share: population stability index and Kolmogorov-Smirnov; and
the Wilson interval of a rate (review precision, the gate bench's false alarms)."""

from __future__ import annotations

import math

import numpy as np

PSI_FLOOR = 1e-4  # share given to an empty bin, so PSI stays finite


def psi_of_shares(expected: np.ndarray | float, actual: np.ndarray) -> float:
    """PSI of bin shares ``actual`` against ``expected`` (each floored at ``PSI_FLOOR``)."""
    p = np.maximum(expected, PSI_FLOOR)
    q = np.maximum(actual, PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def psi(base: np.ndarray, cand: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the baseline's quantile bins (deciles by default)."""
    edges = np.unique(np.quantile(base, np.linspace(0, 1, bins + 1)[1:-1]))
    b = np.bincount(np.searchsorted(edges, base, side="right"), minlength=len(edges) + 1)
    c = np.bincount(np.searchsorted(edges, cand, side="right"), minlength=len(edges) + 1)
    return psi_of_shares(b / b.sum(), c / c.sum())


def ks_test(base: np.ndarray, cand: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic and p-value (scipy)."""
    from scipy.stats import ks_2samp

    res = ks_2samp(cand, base)
    return float(res.statistic), float(res.pvalue)


def ks_statistic(cdf_at_sorted: np.ndarray) -> float:
    """One-sample KS statistic from a reference CDF evaluated at the sorted sample."""
    f = cdf_at_sorted
    n = len(f)
    above = np.arange(1, n + 1) / n - f
    below = f - np.arange(n) / n
    return float(max(above.max(), below.max()))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    p = k / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)
