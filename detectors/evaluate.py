"""Detection figures: AUROC with a bootstrap interval, TPR at a fixed false-positive rate."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability a random positive outscores a random negative (ties count half)."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float = 0.01) -> float:
    """Share of positives above the threshold that lets through ``fpr`` of the negatives."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    if y.sum() == 0 or (~y).sum() == 0:
        return float("nan")
    thr = np.quantile(s[~y], 1 - fpr, method="higher")
    return float((s[y] > thr).mean())


def bootstrap_auroc_ci(
    scores: np.ndarray, labels: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval, resampling positives and negatives separately."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    # All resamples at once: how often each distinct score value is drawn among positives and
    # among negatives ([n_boot, values]); AUROC is then a sum over the values in order.
    values, inv = np.unique(np.r_[pos, neg], return_inverse=True)
    m = len(values)
    counts = []
    for part in (inv[: len(pos)], inv[len(pos) :]):
        drawn = part[rng.integers(0, len(part), size=(n_boot, len(part)))]
        flat = (drawn + m * np.arange(n_boot)[:, None]).ravel()
        counts.append(np.bincount(flat, minlength=n_boot * m).reshape(n_boot, m))
    cp, cn = counts
    below = np.cumsum(cn, axis=1) - cn  # negatives strictly below each value
    stats = (cp * (below + cn / 2)).sum(axis=1) / (len(pos) * len(neg))
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class Detection:
    auroc: float
    auroc_ci: tuple[float, float]
    tpr_at_1pct_fpr: float
    n_pos: int
    n_neg: int

    def as_dict(self) -> dict[str, object]:
        return {
            "auroc": self.auroc,
            "auroc_ci": list(self.auroc_ci),
            "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
        }


def detection(scores: np.ndarray, labels: np.ndarray, n_boot: int = 1000) -> Detection:
    y = np.asarray(labels).astype(bool)
    return Detection(
        auroc=auroc(scores, y),
        auroc_ci=bootstrap_auroc_ci(scores, y, n_boot=n_boot),
        tpr_at_1pct_fpr=tpr_at_fpr(scores, y, 0.01),
        n_pos=int(y.sum()),
        n_neg=int((~y).sum()),
    )
