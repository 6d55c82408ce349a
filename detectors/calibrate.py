"""Thresholds from the benign distribution of each feature's request score."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from detectors.bundle import Bundle, Calibration
from detectors.errors import DataError
from detectors.transcripts import Message, Transcript

if TYPE_CHECKING:
    from detectors.activations import ActivationReader


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


def served_answers(
    reader: ActivationReader,
    records: list[Transcript],
    source: object,
    new_tokens: int = 64,
    batch_size: int = 8,
) -> list[Transcript]:
    """The conversations of ``records`` with each final answer replaced by the model's own
    greedy answer to the same prompt: benign traffic as the served model writes it.

    A threshold drawn from someone else's answers sits where that text scores, not where this
    model's ordinary answers do (the live demo flagged 1 villain answer in 4 with the shipped
    bundle's EM-answer calibration). Greedy, so the same model gives the same calibration.
    """
    from detectors.extract import generate

    convs = []
    for i, r in enumerate(records):
        if r.messages is None:
            raise DataError(
                source,
                "generating answers needs 'messages' (a chat), this record has 'text'",
                i + 1,
            )
        convs.append(r.prompt_messages)
    answers = generate(reader, convs, new_tokens, batch_size)
    out = []
    for r, a in zip(records, answers, strict=True):
        assert r.messages is not None
        msgs = (*r.messages[:-1], Message(role="assistant", content=a.strip() or "..."))
        out.append(r.model_copy(update={"messages": msgs, "label": 0}))
    return out
