"""Score files for the gate as ``misalign-monitor score`` writes them, from chosen distributions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from detectors import bundle as bundle_io

BUNDLE = bundle_io.load(bundle_io.default_bundle_path())


def write_scores(
    path: Path, scores: np.ndarray, ids: list[str] | None = None, texts: list[str] | None = None
) -> Path:
    """Lines as `misalign-monitor score` writes them, for ``scores [n, k]`` (thresholds
    included), with an ``id`` and a ``text`` per line where given."""
    limits = {f.name: f.calibration.threshold for f in BUNDLE.spec.features if f.calibration}
    with path.open("w") as f:
        for i, row in enumerate(scores):
            feats = {
                n: {"name": n, "score": float(s), "threshold": limits[n]}
                for n, s in zip(BUNDLE.feature_names, row, strict=True)
            }
            line: dict[str, object] = {"index": i, "bundle": BUNDLE.bundle_id, "features": feats}
            if ids is not None and texts is not None:
                line |= {"id": ids[i], "text": texts[i]}
            f.write(json.dumps(line) + "\n")
    return path


def draws(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, BUNDLE.k)) + np.array([shift, 0.0, 0.0])
