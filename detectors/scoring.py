"""From per-token projections to calibrated request scores and flags (numpy only).

The sidecar runs this on the k numbers per token the tap sends; the offline ``score`` command
runs it on projections it computes itself, so both give the same answer for the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detectors.bundle import Aggregation, Bundle

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


def rolling_max_mean(x: np.ndarray, window: int) -> float:
    """Max over the means of ``window`` consecutive values; the plain mean when shorter."""
    if len(x) == 0:
        return float("nan")
    if len(x) <= window:
        return float(x.mean())
    c = np.concatenate([[0.0], np.cumsum(x, dtype=np.float64)])
    return float(((c[window:] - c[:-window]) / window).max())


def reduce(x: np.ndarray, agg: Aggregation) -> float:
    if agg.reduce == "mean":
        return float(x.mean()) if len(x) else float("nan")
    return rolling_max_mean(x, agg.window)


def select_span(roles: np.ndarray, span: str) -> np.ndarray:
    if span == "all":
        return np.ones(len(roles), bool)
    return roles == (PROMPT if span == "prompt" else RESPONSE)


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
    """One ``FeatureScore`` per feature from token scores ``[t, k]`` and roles ``[t]``."""
    out = []
    roles = np.asarray(roles)
    for i, f in enumerate(bundle.spec.features):
        col = scores[:, i]
        agg = f.aggregation
        s = reduce(col[select_span(roles, agg.span)], agg)
        prompt = col[roles == PROMPT]
        resp = col[roles == RESPONSE]
        cal = f.calibration
        thr = cal.threshold if cal else None
        z = (s - cal.baseline_mean) / cal.baseline_std if cal and np.isfinite(s) else None
        out.append(
            FeatureScore(
                name=f.name,
                score=s,
                prompt_mean=float(prompt.mean()) if len(prompt) else float("nan"),
                response_mean=float(resp.mean()) if len(resp) else float("nan"),
                response_max_rolling=rolling_max_mean(resp, agg.window),
                threshold=thr,
                z=z,
                flagged=bool(thr is not None and np.isfinite(s) and s > thr),
            )
        )
    return out
