"""Thresholds from the benign distribution of each feature's request score."""

from __future__ import annotations

import numpy as np

from detectors.bundle import Bundle, Calibration
from detectors.errors import DataError


def calibration_from_scores(scores: np.ndarray, fpr: float, source: str) -> Calibration:
    s = np.asarray(scores, np.float64)
    s = s[np.isfinite(s)]
    if len(s) < 2:
        raise DataError(
            source, f"calibration needs at least 2 benign records with a score, got {len(s)}"
        )
    return Calibration(
        baseline_mean=float(s.mean()),
        baseline_std=float(max(s.std(ddof=1), 1e-9)),
        threshold=float(np.quantile(s, 1 - fpr, method="higher")),
        fpr=fpr,
        n_benign=len(s),
        source=source,
        quantiles=tuple(float(q) for q in np.quantile(s, np.linspace(0.1, 0.9, 9))),
    )


def apply_calibration(
    bundle: Bundle, scores_by_feature: dict[str, np.ndarray], fpr: float, source: str
) -> Bundle:
    """A copy of ``bundle`` with each named feature's calibration replaced."""
    feats = []
    for f in bundle.spec.features:
        if f.name in scores_by_feature:
            f = f.model_copy(
                update={
                    "calibration": calibration_from_scores(scores_by_feature[f.name], fpr, source)
                }
            )
        feats.append(f)
    return bundle.with_spec(bundle.spec.model_copy(update={"features": tuple(feats)}))
