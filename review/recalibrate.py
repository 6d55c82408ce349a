"""Thresholds from reviewers' labels: each feature's precision at its threshold, and the lowest
threshold that reaches a target precision, written to a new bundle.

A label says whether the sample was misaligned; for a feature, its flags are the labeled samples
whose score for that feature is over its threshold (``unsure`` labels are left out). Only labels
of samples scored with the same bundle count: another bundle's scores are not on this scale. The
labels cover flagged samples only, so a threshold is only ever raised from them, never lowered:
below the current threshold the labels say nothing about the traffic that was never flagged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from detectors import bundle as bundle_io
from detectors.bundle import Bundle
from detectors.errors import RecalibrationError
from detectors.stats import wilson
from review.store import Label


@dataclass(frozen=True)
class FeatureReport:
    feature: str
    threshold: float | None
    flags: int  # labeled misaligned or false positive, over the threshold
    misaligned: int
    unsure: int
    precision: float | None
    interval: tuple[float, float] | None
    proposed: float | None  # None: leave the threshold as it is
    proposed_flags: int
    proposed_precision: float | None
    note: str

    @property
    def changes(self) -> bool:
        return self.proposed is not None and self.proposed != self.threshold


def _report(
    name: str,
    threshold: float | None,
    scored: Sequence[tuple[float, str]],
    target: float,
    min_flags: int,
) -> FeatureReport:
    if threshold is None:
        return FeatureReport(name, None, 0, 0, 0, None, None, None, 0, None, "no threshold")
    over = [(s, d) for s, d in scored if s > threshold]
    decided = [(s, d) for s, d in over if d != "unsure"]
    unsure = len(over) - len(decided)
    mis = sum(d == "misaligned" for _, d in decided)
    n = len(decided)
    precision = mis / n if n else None
    interval = wilson(mis, n) if n else None

    def keep(note: str) -> FeatureReport:
        return FeatureReport(
            name, threshold, n, mis, unsure, precision, interval, None, n, precision, note
        )

    if n < min_flags:
        return keep(f"{n} decided flags, fewer than --min-flags {min_flags}; threshold kept")
    if precision is not None and precision >= target:
        return keep(f"meets the target precision {target:g}; threshold kept")
    # Raise the threshold to the lowest labeled score whose flags reach the target.
    scores = sorted({s for s, _ in decided})
    below = threshold
    for cut in scores:
        kept = [d for s, d in decided if s >= cut]
        if len(kept) < min_flags:
            break
        p = sum(d == "misaligned" for d in kept) / len(kept)
        if p >= target:
            new = (below + cut) / 2  # flags are score > threshold: midway keeps `cut` flagged
            return FeatureReport(
                name,
                threshold,
                n,
                mis,
                unsure,
                precision,
                interval,
                new,
                len(kept),
                p,
                f"raised to reach precision {target:g}",
            )
        below = cut
    return keep(f"no threshold reaches precision {target:g} with {min_flags}+ flags; kept")


def reports(
    bundle: Bundle, labels: list[Label], target: float, min_flags: int
) -> tuple[list[FeatureReport], int]:
    """One report per feature of ``bundle``, and how many labels were of another bundle."""
    mine = [lb for lb in labels if lb.bundle == bundle.bundle_id]
    if labels and not mine:
        others = sorted({lb.bundle for lb in labels})
        raise RecalibrationError(
            f"none of the {len(labels)} labels is for bundle {bundle.bundle_id}; they are for "
            f"{', '.join(others)}: recalibrate the bundle the samples were scored with"
        )
    out = []
    for f in bundle.spec.features:
        scored = [
            (r.score, lb.decision)
            for lb in mine
            for r in lb.features
            if r.name == f.name and r.score is not None and math.isfinite(r.score)
        ]
        thr = f.calibration.threshold if f.calibration else None
        out.append(_report(f.name, thr, scored, target, min_flags))
    return out, len(labels) - len(mine)


def _benign_fpr(mean: float, std: float, threshold: float) -> float:
    """Share of the benign baseline over ``threshold`` under its normal approximation."""
    fpr = 0.5 * math.erfc((threshold - mean) / (std * math.sqrt(2)))
    return min(max(fpr, 1e-9), 1 - 1e-9)


def recalibrated(
    bundle: Bundle, feature_reports: list[FeatureReport], n_labels: int, target: float
) -> Bundle | None:
    """A copy of ``bundle`` with the proposed thresholds; None when none changes."""
    if not any(r.changes for r in feature_reports):
        return None
    by_name = {r.feature: r for r in feature_reports}
    feats = []
    for f in bundle.spec.features:
        r = by_name[f.name]
        c = f.calibration
        if not r.changes or c is None or r.proposed is None:
            feats.append(f)
            continue
        cal = c.model_copy(
            update={
                "threshold": r.proposed,
                "fpr": _benign_fpr(c.baseline_mean, c.baseline_std, r.proposed),
                "source": f"{c.source}; raised for precision {target:g} on {n_labels} review "
                "labels (fpr: normal approximation of the baseline)",
            }
        )
        params = {
            **f.params,
            "recalibration": {
                "from_bundle": bundle.bundle_id,
                "threshold_before": r.threshold,
                "precision_before": r.precision,
                "flags_before": r.flags,
                "target_precision": target,
                "precision_after": r.proposed_precision,
                "flags_after": r.proposed_flags,
                "labels": n_labels,
            },
        }
        feats.append(f.model_copy(update={"calibration": cal, "params": params}))
    return bundle.with_spec(bundle.spec.model_copy(update={"features": tuple(feats)}))


def write_new(new: Bundle, source: Path, out: Path) -> Path:
    """Write ``new`` to ``out``; never over the bundle in use or any existing file."""
    if out.resolve() == source.resolve():
        raise RecalibrationError(f"--out {out} is the input bundle; write a new version elsewhere")
    if out.exists():
        raise RecalibrationError(f"--out {out} exists; refusing to overwrite a bundle")
    return bundle_io.save(new, out)
