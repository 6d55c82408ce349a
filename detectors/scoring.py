"""From per-token projections to calibrated request scores and flags (numpy only).

The sidecar runs this on the k numbers per token the tap sends; the offline ``score`` command
runs it on projections it computes itself, so both give the same answer for the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from detectors.bundle import Bundle
from detectors.roles import PROMPT, RESPONSE


def project(bundle: Bundle, acts: np.ndarray | Mapping[int, np.ndarray]) -> np.ndarray:
    """Raw projections ``[t, k]`` of residual activations (no bias, no JumpReLU): ``[t, d]`` at
    the bundle's one layer, or layer -> ``[t, d]`` holding every layer the bundle reads.

    This is exactly what the tap computes inside the model and sends (each column after its own
    layer); ``token_scores`` finishes it.
    """
    if not isinstance(acts, Mapping):
        if bundle.tapped_layers not in ([], [bundle.spec.layer]):
            raise ValueError(
                f"the bundle reads layers {bundle.tapped_layers}; pass activations by layer"
            )
        return np.asarray(acts, np.float32) @ bundle.directions.T
    layers = bundle.tapped_layers
    missing = [x for x in layers if x not in acts]
    if missing:
        raise ValueError(f"no activations for layers {missing} the bundle reads")
    if not layers:
        t = len(next(iter(acts.values()))) if acts else 0
        return np.zeros((t, 0), np.float32)
    t = len(acts[layers[0]])
    out = np.empty((t, bundle.k), np.float32)
    for layer in layers:
        cols = bundle.columns_at(layer)
        out[:, cols] = np.asarray(acts[layer], np.float32) @ bundle.directions[cols].T
    return out


def token_scores(bundle: Bundle, projections: np.ndarray) -> np.ndarray:
    """Per-token feature scores ``[t, k]`` from raw projections ``[t, k]``."""
    return Scorer(bundle).token_scores(projections)


def rolling_max_means(x: np.ndarray, window: int) -> np.ndarray:
    """Per column of ``x [t, k]``: the max over means of ``window`` consecutive rows (the plain
    mean when there are fewer rows; NaN when there are none)."""
    t = len(x)
    if t == 0:
        return np.full(x.shape[1], np.nan)
    if t <= window:
        return x.mean(axis=0, dtype=np.float64)
    return window_sums(x, window).max(axis=0) / window


def window_sums(x: np.ndarray, window: int) -> np.ndarray:
    """Float64 sums of ``window`` consecutive rows of ``x [t, k]``: row j sums rows j to
    j + window - 1 (``t - window + 1`` rows; ``window <= t``).

    Summed by doubling (pairs, then pairs of pairs, ...; window's binary digits pick the
    pieces), about log2(window) whole-array additions: a running sum over the rows (one
    addition per element, done one element at a time) took several times as long, and its
    differences lose digits to everything summed before the window.
    """
    x = np.asarray(x, np.float64)
    n = len(x) - window + 1
    out: np.ndarray | None = None
    piece, size, at, w = x, 1, 0, window  # piece[j]: rows j .. j + size - 1 summed
    while w:
        if w & 1:
            part = piece[at : at + n]
            out = part.copy() if out is None else np.add(out, part, out=out)
            at += size
        w >>= 1
        if w:
            piece = piece[:-size] + piece[size:]
            size *= 2
    assert out is not None
    return out


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


def _segment_sums(x: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Float64 column sums of ``x [n, k]`` over the row segments that tile it in order; each
    segment summed on its own, so a request's sums do not depend on the others in its batch.
    Empty segments sum to 0."""
    full = lengths > 0
    if full.all():
        # reduceat sums from each index to the next one given, the last to the end of x
        return np.add.reduceat(x, starts, axis=0, dtype=np.float64)
    out = np.zeros((len(starts), x.shape[1]))
    if full.any():
        out[full] = np.add.reduceat(x, starts[full], axis=0, dtype=np.float64)
    return out


def _segment_means(x: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty segment's mean is NaN
        return _segment_sums(x, offsets[:-1], lengths) / lengths[:, None]


def _segment_rolling_max(
    x: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, window: int
) -> np.ndarray:
    """``rolling_max_means`` of each row segment ``x[offsets[i]:offsets[i + 1]]``, all at once."""
    long = lengths > window
    # a segment no longer than the window takes its mean (none: every entry is set below)
    out = (
        np.empty((len(lengths), x.shape[1])) if long.all() else _segment_means(x, offsets, lengths)
    )
    if long.any():
        sums = window_sums(x, window)  # sums[j]: the window starting at row j
        # a window counts only inside a segment longer than it (a shorter one takes its mean)
        seg_end = np.where(long, offsets[1:], -1).repeat(lengths)[: len(sums)]
        sums[np.arange(window, len(sums) + window) > seg_end] = -np.inf
        out[long] = np.maximum.reduceat(sums, offsets[:-1][long], axis=0) / window
    return out


def _segment_softmax(
    x: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, temperature: float
) -> np.ndarray:
    """Per row segment and column: the mean of ``x`` weighted by ``softmax(x / temperature)``.

    Between the mean (large temperature) and the max (small): a few high-scoring tokens carry the
    request's score without one outlier token deciding it alone. NaN for an empty segment.
    """
    full = lengths > 0
    out = np.full((len(lengths), x.shape[1]), np.nan)
    if not full.any():
        return out
    starts = offsets[:-1][full]
    x64 = np.asarray(x, np.float64)
    peak = np.maximum.reduceat(x64, starts, axis=0)  # per segment, for a stable exp
    seg = np.repeat(np.arange(len(starts)), lengths[full])
    w = np.exp((x64 - peak[seg]) / temperature)
    out[full] = np.add.reduceat(w * x64, starts, axis=0) / np.add.reduceat(w, starts, axis=0)
    return out


def pool_segments(
    x: np.ndarray, offsets: np.ndarray, reduce: str, window: int = 8, temperature: float = 1.0
) -> np.ndarray:
    """One pooled value per row segment ``x[offsets[i]:offsets[i + 1]]`` and column of ``x [n, k]``.

    The one pooling the sidecar, offline ``score``, the bundle build and the detection bench use.
    """
    offsets = np.asarray(offsets, np.int64)
    lengths = offsets[1:] - offsets[:-1]
    if reduce == "mean":
        return _segment_means(x, offsets, lengths)
    if reduce == "max_rolling_mean":
        return _segment_rolling_max(x, offsets, lengths, window)
    if reduce == "softmax":
        return _segment_softmax(x, offsets, lengths, temperature)
    raise ValueError(f"no pooling called {reduce!r}")


@dataclass(frozen=True)
class RequestScores:
    """Scores of r requests scored together: ``[r, k]`` arrays, one row per request."""

    names: list[str]
    score: np.ndarray
    prompt_mean: np.ndarray
    response_mean: np.ndarray
    response_max_rolling: np.ndarray
    threshold: np.ndarray  # [k], NaN where a feature has no calibration
    z: np.ndarray  # NaN where there is no calibration or no score
    flagged: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.score)

    def features(self, i: int) -> list[FeatureScore]:
        """Request ``i`` as one ``FeatureScore`` per feature."""

        def opt(x: float) -> float | None:
            return None if x != x else x

        return [
            FeatureScore(
                name=name,
                score=s,
                prompt_mean=pm,
                response_mean=rm,
                response_max_rolling=rr,
                threshold=opt(t),
                z=opt(z),
                flagged=f,
            )
            for name, s, pm, rm, rr, t, z, f in zip(
                self.names,
                self.score[i].tolist(),
                self.prompt_mean[i].tolist(),
                self.response_mean[i].tolist(),
                self.response_max_rolling[i].tolist(),
                self.threshold.tolist(),
                self.z[i].tolist(),
                self.flagged[i].tolist(),
                strict=True,
            )
        ]


class Scorer:
    """A bundle's scoring, with what depends only on the bundle worked out once: which aggregate
    each feature is scored on, thresholds and baselines as arrays."""

    def __init__(self, bundle: Bundle) -> None:
        feats = bundle.spec.features
        self.names = bundle.feature_names
        k = len(feats)
        self.bias = np.asarray(bundle.bias, np.float32)
        jump = np.array([f.kind == "jumprelu" for f in feats], bool)
        self.jump = jump if jump.any() else None
        self.jump_threshold = np.asarray(bundle.jump_threshold, np.float32)
        self.threshold = np.full(k, np.nan)
        self.base_mean, self.base_std = np.full(k, np.nan), np.full(k, np.nan)
        by_score: dict[tuple[str, str, int, float], list[int]] = {}
        by_window: dict[int, list[int]] = {}
        for i, f in enumerate(feats):
            agg = f.aggregation
            window = agg.window if agg.reduce == "max_rolling_mean" else 0
            temperature = agg.temperature or 0.0  # set only for softmax
            by_score.setdefault((agg.span, agg.reduce, window, temperature), []).append(i)
            by_window.setdefault(agg.window, []).append(i)
            if f.calibration is not None:
                self.threshold[i] = f.calibration.threshold
                self.base_mean[i] = f.calibration.baseline_mean
                self.base_std[i] = f.calibration.baseline_std
        self.score_groups = [(key, np.array(cols)) for key, cols in by_score.items()]
        # Features scored by a head: (column, aggregation key, input columns, weights, bias).
        index = {n: i for i, n in enumerate(self.names)}
        self.heads = [
            (
                i,
                (
                    f.aggregation.span,
                    f.aggregation.reduce,
                    f.aggregation.window if f.aggregation.reduce == "max_rolling_mean" else 0,
                    f.aggregation.temperature or 0.0,
                ),
                np.array([index[n] for n in f.head.inputs], np.int64),
                np.asarray(f.head.weights, np.float64),
                float(f.head.bias),
            )
            for i, f in enumerate(feats)
            if f.head is not None
        ]
        self.window_groups = [(w, np.array(cols)) for w, cols in by_window.items()]

    def token_scores(self, projections: np.ndarray) -> np.ndarray:
        pre = np.asarray(projections, np.float32) + self.bias
        if self.jump is not None:
            pre = np.where(self.jump & (pre <= self.jump_threshold), np.float32(0), pre)
        return pre

    def score(self, scores: np.ndarray, roles: np.ndarray, offsets: np.ndarray) -> RequestScores:
        """Score r requests at once from token scores ``[n, k]`` and roles ``[n]`` of all their
        rows, request i holding rows ``offsets[i]:offsets[i + 1]``.

        Vectorised over features and requests: each span's mean and each (span, window) rolling
        max is computed once for all k columns and all r requests.
        """
        scores = np.asarray(scores)
        roles = np.asarray(roles)
        offsets = np.asarray(offsets, np.int64)
        lengths = offsets[1:] - offsets[:-1]
        r = len(lengths)
        seg: np.ndarray | None = None
        spans: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
            "all": (scores, offsets, lengths)
        }

        def span(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """The span's rows, still grouped by request, their offsets and counts."""
            nonlocal seg
            if name not in spans:
                if seg is None:
                    seg = np.arange(r).repeat(lengths)
                keep = roles == (PROMPT if name == "prompt" else RESPONSE)
                n = np.bincount(seg[keep], minlength=r)
                off = np.zeros(r + 1, np.int64)
                n.cumsum(out=off[1:])
                spans[name] = (scores[keep], off, n)
            return spans[name]

        cache: dict[tuple[str, str, int, float], np.ndarray] = {}

        def aggregate(name: str, reduce: str, window: int, temperature: float = 0.0) -> np.ndarray:
            key = (name, reduce, window, temperature)
            if key not in cache:
                x, off, _ = span(name)
                cache[key] = pool_segments(x, off, reduce, window, temperature)
            return cache[key]

        def by_column(groups: list[tuple[tuple[str, str, int, float], np.ndarray]]) -> np.ndarray:
            if len(groups) == 1:
                return aggregate(*groups[0][0])
            out = np.empty((r, len(self.names)))
            for key, cols in groups:
                out[:, cols] = aggregate(*key)[:, cols]
            return out

        score = by_column(self.score_groups)
        if self.heads:
            score = score.copy()  # by_column may hand back a cached aggregate
            for col, key, inputs, weights, bias in self.heads:
                score[:, col] = aggregate(*key)[:, inputs] @ weights + bias
        rolling = by_column(
            [(("response", "max_rolling_mean", w, 0.0), cols) for w, cols in self.window_groups]
        )
        return RequestScores(
            names=self.names,
            score=score,
            prompt_mean=aggregate("prompt", "mean", 0),
            response_mean=aggregate("response", "mean", 0),
            response_max_rolling=rolling,
            threshold=self.threshold,
            z=(score - self.base_mean) / self.base_std,
            flagged=score > self.threshold,  # False where either is NaN
        )


def score_requests(
    bundle: Bundle, scores: np.ndarray, roles: np.ndarray, offsets: np.ndarray
) -> RequestScores:
    """Score r requests at once (see ``Scorer.score``)."""
    return Scorer(bundle).score(scores, roles, offsets)


def score_request(bundle: Bundle, scores: np.ndarray, roles: np.ndarray) -> list[FeatureScore]:
    """One ``FeatureScore`` per feature from token scores ``[t, k]`` and roles ``[t]``."""
    return score_requests(bundle, scores, roles, np.array([0, len(scores)])).features(0)
