"""``gate --explain``: the directions along which the candidate's residual stream moved.

Model diffing on the probe set: both models read the same transcripts (each probe with the
candidate's own answer), so what differs is the weights, not the text. Per answer, the difference
of the response-mean residual at the bundle's layer, candidate minus baseline, is a row of ``D``
``[n, d]``; the top right singular vectors of ``D`` (uncentred, so a shift shared by every answer
comes first) are the directions that moved most. Each is reported with its share of ``||D||^2``,
the mean shift along it, its cosine with every bundle feature, and the probe answers that moved
most along it: a shift along a direction no feature covers still shows, with cosines near 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel

from detectors.bundle import Bundle

if TYPE_CHECKING:
    from detectors.activations import ActivationReader


class MovedAnswer(BaseModel):
    index: int
    shift: float  # this answer's activation difference projected on the direction
    prompt: str
    text: str


class MovedDirection(BaseModel):
    rank: int
    share: float  # of the squared activation difference, summed over answers
    mean_shift: float  # mean projection of the per-answer differences (>= 0: sign chosen so)
    cosines: dict[str, float]  # with each bundle feature's direction
    top_answers: list[MovedAnswer]
    vector: list[float]  # unit, in the residual basis of the bundle's layer


class Explanation(BaseModel):
    layer: int
    n_answers: int
    mean_norm: float  # norm of the mean difference
    mean_cosines: dict[str, float]  # the mean difference's cosine with each feature
    directions: list[MovedDirection]


def decompose(
    diff: np.ndarray,
    bundle: Bundle,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    directions: int = 3,
    top: int = 3,
) -> Explanation:
    """The top ``directions`` of the per-answer differences ``diff [n, d]``."""
    diff = np.asarray(diff, np.float64)
    feats = np.asarray(bundle.directions, np.float64)
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    mean = diff.mean(0)
    mean_norm = float(np.linalg.norm(mean))
    _, s, vt = np.linalg.svd(diff, full_matrices=False)
    energy = float(np.sum(s**2))
    out = []
    for r in range(min(directions, int(np.sum(s > 1e-9 * max(s[0], 1e-30))))):
        v = vt[r]
        proj = diff @ v
        if proj.mean() < 0:
            v, proj = -v, -proj
        order = np.argsort(-proj, kind="stable")[:top]
        out.append(
            MovedDirection(
                rank=r + 1,
                share=float(s[r] ** 2 / energy),
                mean_shift=float(proj.mean()),
                cosines={n: float(feats[i] @ v) for i, n in enumerate(bundle.feature_names)},
                top_answers=[
                    MovedAnswer(
                        index=int(i), shift=float(proj[i]), prompt=prompts[i], text=answers[i]
                    )
                    for i in order
                ],
                vector=v.astype(np.float32).tolist(),
            )
        )
    cos_mean = feats @ mean / mean_norm if mean_norm > 0 else np.zeros(len(feats))
    return Explanation(
        layer=bundle.spec.layer,
        n_answers=len(diff),
        mean_norm=mean_norm,
        mean_cosines={n: float(cos_mean[i]) for i, n in enumerate(bundle.feature_names)},
        directions=out,
    )


def explain(
    bundle: Bundle,
    baseline: ActivationReader,
    candidate: ActivationReader,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    directions: int = 3,
    top: int = 3,
    max_tokens: int = 256,
) -> Explanation:
    """Both models read each probe with the candidate's answer; ``decompose`` the differences."""
    from detectors.gate import probe_transcripts
    from detectors.pooled import pooled_activations

    records = probe_transcripts(prompts, answers)
    layer = bundle.spec.layer
    acts = [
        pooled_activations(r, records, [layer], max_tokens=max_tokens, progress=False, cache=False)
        for r in (candidate, baseline)
    ]
    return decompose(
        acts[0][layer] - acts[1][layer], bundle, prompts, answers, directions=directions, top=top
    )


def render_explanation(ex: Explanation, width: int = 90) -> str:
    names = list(ex.mean_cosines)
    lines = [
        f"what moved (layer {ex.layer}, {ex.n_answers} probe answers read by both models): "
        f"mean difference norm {ex.mean_norm:.3f}, cosine with "
        + ", ".join(f"{n} {c:+.2f}" for n, c in ex.mean_cosines.items()),
        f"{'dir':<5}{'share':>7}{'mean shift':>12}" + "".join(f"{'cos ' + n:>24}" for n in names),
    ]
    for d in ex.directions:
        lines.append(
            f"{d.rank:<5}{d.share:>7.1%}{d.mean_shift:>12.3f}"
            + "".join(f"{d.cosines[n]:>24.2f}" for n in names)
        )
        for a in d.top_answers:
            text = " ".join(f"{a.prompt} -> {a.text}".split())
            text = text if len(text) <= width else text[: width - 1] + "…"
            lines.append(f"     #{a.index:<4}{a.shift:>8.3f}  {text}")
    return "\n".join(lines)
