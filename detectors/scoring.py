"""From per-token projections to calibrated request scores and flags (numpy only).

The sidecar runs this on the k numbers per token the tap sends; the offline ``score`` command
runs it on projections it computes itself, so both give the same answer for the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detectors.bundle import Bundle

PROMPT, RESPONSE = 0, 1


def project(bundle: Bundle, acts: np.ndarray) -> np.ndarray:
    """Raw projections ``[t, k]`` of residual activations ``[t, d]`` (no bias, no JumpReLU).

    This is exactly what the tap computes inside the model and sends; ``token_scores`` finishes it.
    """
    return np.asarray(acts, np.float32) @ bundle.directions.T


def token_scores(bundle: Bundle, projections: np.ndarray) -> np.ndarray:
    """Per-token feature scores ``[t, k]`` from raw projections ``[t, k]``."""
    pre = np.asarray(projections, np.float32) + bundle.bias
    jump = np.array([f.kind == "jumprelu" for f in bundle.spec.features])
    if jump.any():
        pre = np.where(jump & (pre <= bundle.jump_threshold), np.float32(0), pre)
    return pre


def rolling_max_means(x: np.ndarray, window: int) -> np.ndarray:
    """Per column of ``x [t, k]``: the max over means of ``window`` consecutive rows (the plain
    mean when there are fewer rows; NaN when there are none)."""
    t = len(x)
    if t == 0:
        return np.full(x.shape[1], np.nan)
    if t <= window:
        return x.mean(axis=0, dtype=np.float64)
    c = np.zeros((t + 1, x.shape[1]))
    np.cumsum(x, axis=0, dtype=np.float64, out=c[1:])
    return (c[window:] - c[:-window]).max(axis=0) / window


def rolling_max_mean(x: np.ndarray, window: int) -> float:
    return float(rolling_max_means(np.asarray(x).reshape(-1, 1), window)[0])


@dataclass(frozen=True)
class FeatureScore:
    name: str
    score: float  # the aggregate the flag is decided on (the feature's configured span and reduce)
    prompt_mean: float
    response_mean: float
    response_max_rolling: float
    threshold: float | None
    z: float | None  # score in baseline standard deviations from the benign mean
    flagged: bool

    def as_dict(self) -> dict[str, object]:
        return {k: _jsonable(v) for k, v in self.__dict__.items()}


def _jsonable(v: object) -> object:
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def score_request(bundle: Bundle, scores: np.ndarray, roles: np.ndarray) -> list[FeatureScore]:
    """One ``FeatureScore`` per feature from token scores ``[t, k]`` and roles ``[t]``.

    Vectorised over features: each span's mean and each (span, window) rolling max is computed
    once for all k columns.
    """
    roles = np.asarray(roles)
    scores = np.asarray(scores)
    spans = {
        "prompt": scores[roles == PROMPT],
        "response": scores[roles == RESPONSE],
        "all": scores,
    }
    means: dict[str, np.ndarray] = {}
    rolls: dict[tuple[str, int], np.ndarray] = {}

    def mean(span: str) -> np.ndarray:
        if span not in means:
            x = spans[span]
            means[span] = (
                x.mean(axis=0, dtype=np.float64) if len(x) else np.full(len(bundle.bias), np.nan)
            )
        return means[span]

    def roll(span: str, window: int) -> np.ndarray:
        if (span, window) not in rolls:
            rolls[span, window] = rolling_max_means(spans[span], window)
        return rolls[span, window]

    prompt_mean, response_mean = mean("prompt"), mean("response")
    out = []
    for i, f in enumerate(bundle.spec.features):
        agg = f.aggregation
        s = float((mean(agg.span) if agg.reduce == "mean" else roll(agg.span, agg.window))[i])
        cal = f.calibration
        thr = cal.threshold if cal else None
        finite = s == s  # not NaN
        out.append(
            FeatureScore(
                name=f.name,
                score=s,
                prompt_mean=float(prompt_mean[i]),
                response_mean=float(response_mean[i]),
                response_max_rolling=float(roll("response", agg.window)[i]),
                threshold=thr,
                z=(s - cal.baseline_mean) / cal.baseline_std if cal and finite else None,
                flagged=bool(thr is not None and finite and s > thr),
            )
        )
    return out
