"""A calibrated bundle of random directions, for benchmarks that need k features of a given width."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detectors import bundle as bundle_io
from detectors.bundle import Calibration, FeatureSpec, ModelRef


def synthetic_bundle(
    path: Path,
    model: ModelRef,
    layer: int,
    k: int,
    threshold: float,
    more_layers: tuple[int, ...] = (),
) -> bundle_io.Bundle:
    """``more_layers``: a multi-layer bundle, feature i reading ``(layer, *more_layers)[i % n]``."""
    rng = np.random.default_rng(0)
    layers = (layer, *more_layers)
    b = bundle_io.empty(model, layer=layer)
    cal = Calibration(
        baseline_mean=0.0,
        baseline_std=1.0,
        threshold=threshold,
        fpr=0.01,
        n_benign=1000,
        source="synthetic",
    )
    for i in range(k):
        at = layers[i % len(layers)]
        spec = FeatureSpec(
            name=f"f{i}",
            method="probe",
            source="synthetic",
            calibration=cal,
            layer=at if at != layer else None,
        )
        b = b.with_feature(spec, rng.normal(size=model.hidden_size))
    bundle_io.save(b, path)
    return b
