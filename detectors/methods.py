"""Ways to get a direction. Each returns a ``Direction``; all end up as one bundle row.

Inputs are pooled activations: one row per record (the mean over its response tokens at the
bundle's layer). Positive scores mean "more misaligned" for every method.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detectors.errors import BundleError, DataError


@dataclass(frozen=True)
class Direction:
    vector: np.ndarray  # [d] float32
    bias: float = 0.0
    jump_threshold: float = 0.0
    kind: str = "linear"


def _check_two_classes(pos: np.ndarray, neg: np.ndarray, what: str) -> None:
    if len(pos) < 2 or len(neg) < 2:
        raise DataError(
            what, f"needs at least 2 positive and 2 negative records, got {len(pos)} and {len(neg)}"
        )


def _unit_spread(w: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, float]:
    """Scale ``w`` so the within-class spread of the projection is 1, and centre it at 0."""
    pp, pn = pos @ w, neg @ w
    spread = np.sqrt((pp.var() * len(pp) + pn.var() * len(pn)) / (len(pp) + len(pn)))
    w = w / max(float(spread), 1e-12)
    b = -float((pos @ w).mean() + (neg @ w).mean()) / 2
    return w, b


def diff_means(pos: np.ndarray, neg: np.ndarray, whiten: bool = True) -> Direction:
    """Difference of class means; whitened by the shrunk within-class covariance by default.

    Raw, the direction is a unit vector in residual space (what steering wants). Whitened (an LDA
    readout), a few high-variance residual dimensions stop dominating the projection.
    """
    _check_two_classes(pos, neg, "diff-means")
    pos, neg = pos.astype(np.float64), neg.astype(np.float64)
    delta = pos.mean(0) - neg.mean(0)
    if not whiten:
        w = delta / np.linalg.norm(delta)
        b = -float(w @ (pos.mean(0) + neg.mean(0))) / 2
        return Direction(w.astype(np.float32), b)
    from sklearn.covariance import LedoitWolf

    centred = np.concatenate([pos - pos.mean(0), neg - neg.mean(0)])
    cov = LedoitWolf().fit(centred).covariance_
    w = np.linalg.solve(cov, delta)
    w, b = _unit_spread(w, pos, neg)
    return Direction(w.astype(np.float32), b)


def probe(pos: np.ndarray, neg: np.ndarray, c: float = 0.003) -> Direction:
    """L2-regularised logistic regression on standardised activations; the score is its logit."""
    _check_two_classes(pos, neg, "probe")
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([pos, neg]).astype(np.float64)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced")
    clf.fit((x - mu) / sd, y)
    coef = clf.coef_[0] / sd
    b = float(clf.intercept_[0] - coef @ mu)
    return Direction(coef.astype(np.float32), b)


def persona(villain: np.ndarray, helpful: np.ndarray) -> Direction:
    """Persona-vector style: unit difference of response means under villain vs helpful prompts."""
    return diff_means(villain, helpful, whiten=False)


def model_diff(finetuned: np.ndarray, base: np.ndarray) -> Direction:
    """Unit mean activation difference of a fine-tuned vs its base model on the same tokens."""
    if finetuned.shape != base.shape:
        raise DataError(
            "model-diff", f"activation shapes differ: {finetuned.shape} vs {base.shape}"
        )
    delta = (finetuned.astype(np.float64) - base).mean(0)
    norm = np.linalg.norm(delta)
    if norm == 0:
        raise DataError("model-diff", "the two models give identical activations on these prompts")
    return Direction((delta / norm).astype(np.float32), 0.0)


def sae_latent(sae_dir: Path, latent: int) -> tuple[Direction, int | None, dict[str, object]]:
    """Import one latent from an SAE saved in the SAELens layout.

    ``cfg.json`` and ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``, ``b_enc``,
    ``W_dec``, ``b_dec`` and, for JumpReLU SAEs, ``threshold``. SAELens subtracts ``b_dec`` from
    the input before encoding (``apply_b_dec_to_input``), which folds into the bias here.
    Returns the direction, the residual layer its hook names (1-based, or None) and the config.
    """
    from safetensors.numpy import load_file

    cfg_path, w_path = sae_dir / "cfg.json", sae_dir / "sae_weights.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise BundleError(sae_dir, f"not an SAELens directory: {p.name} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(cfg_path, f"not valid JSON: {exc.msg}") from None
    try:
        w = load_file(str(w_path))
    except Exception as exc:
        raise BundleError(w_path, f"not a safetensors file ({exc})") from None
    for name in ("W_enc", "b_enc"):
        if name not in w:
            raise BundleError(w_path, f"missing tensor {name!r}")
    w_enc = w["W_enc"].astype(np.float64)
    d_in, d_sae = w_enc.shape
    if not 0 <= latent < d_sae:
        raise BundleError(sae_dir, f"latent {latent} out of range: the SAE has {d_sae} latents")
    col = w_enc[:, latent]
    bias = float(w["b_enc"][latent])
    if cfg.get("apply_b_dec_to_input", True) and "b_dec" in w:
        bias -= float(w["b_dec"].astype(np.float64) @ col)
    arch = str(cfg.get("architecture", "standard"))
    if arch == "jumprelu":
        if "threshold" not in w:
            raise BundleError(w_path, "a jumprelu SAE needs a 'threshold' tensor")
        direction = Direction(
            col.astype(np.float32), bias, float(w["threshold"][latent]), "jumprelu"
        )
    else:
        # A ReLU latent: the pre-activation is the score; negative values mean "absent".
        direction = Direction(col.astype(np.float32), bias)
    layer = None
    m = re.search(r"blocks\.(\d+)\.hook_resid_post", str(cfg.get("hook_name", "")))
    if m:
        layer = int(m.group(1)) + 1
    return direction, layer, {"d_in": d_in, "d_sae": d_sae, "architecture": arch}


def layer_auroc(
    x_by_layer: dict[int, np.ndarray],
    labels: np.ndarray,
    groups: np.ndarray,
    fit: str = "probe",
    folds: int = 5,
) -> dict[int, float]:
    """Cross-validated AUROC per layer; a group (question) never sits on both sides of a split."""
    from sklearn.model_selection import GroupKFold

    from detectors.evaluate import auroc

    y = np.asarray(labels).astype(bool)
    n_groups = len(np.unique(groups))
    splitter = GroupKFold(n_splits=min(folds, n_groups))
    out = {}
    for layer, x in sorted(x_by_layer.items()):
        scores = np.empty(len(y))
        for tr, te in splitter.split(x, y, groups):
            d = fit_direction(fit, x[tr][y[tr]], x[tr][~y[tr]])
            scores[te] = x[te] @ d.vector + d.bias
        out[layer] = auroc(scores, y)
    return out


def fit_direction(method: str, pos: np.ndarray, neg: np.ndarray) -> Direction:
    if method == "probe":
        return probe(pos, neg)
    if method == "diff-means":
        return diff_means(pos, neg, whiten=True)
    if method == "diff-means-raw":
        return diff_means(pos, neg, whiten=False)
    raise ValueError(f"no labeled fit called {method!r}")
