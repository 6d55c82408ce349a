"""Live drift gauges: the statistics, then a real sidecar process fed over real gRPC."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from detectors import bundle as bundle_io
from detectors.errors import SettingsError
from service.drift import BaselineCDF, DriftTracker
from service.settings import load_settings
from service.sidecar_process import start_sidecar
from tests.support.sidecar import request_rows, stream_requests
from wire import monitor_pb2_grpc as pb_grpc

BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
GAUGES = ("misalign_drift_mean_shift_sigmas", "misalign_drift_psi", "misalign_drift_ks")


def baseline_draws(n: int, seed: int, shift_sigmas: float = 0.0) -> np.ndarray:
    """Request scores ``[n, k]`` drawn from each feature's calibrated benign distribution
    (inverse of the decile CDF), moved by ``shift_sigmas`` baseline standard deviations."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, BUNDLE.k))
    for i, f in enumerate(BUNDLE.spec.features):
        c = f.calibration
        assert c is not None
        base = BaselineCDF(c.baseline_mean, c.baseline_std, c.quantiles)
        out[:, i] = (
            np.interp(rng.random(n), base.levels, base.knots) + shift_sigmas * c.baseline_std
        )
    return out


def gauges(registry_text: str) -> dict[tuple[str, str], float]:
    """(metric, feature) -> value, for the drift gauges of model m / version v1."""
    out = {}
    for fam in text_string_to_metric_families(registry_text):
        if fam.name.startswith("misalign_drift_"):
            for s in fam.samples:
                assert s.labels["model_version"] == "v1"
                out[s.name, s.labels["feature"]] = s.value
    return out


def scrape(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    from prometheus_client import generate_latest

    return gauges(generate_latest(registry).decode())


def test_statistics_absent_below_minimum_then_small_then_moved() -> None:
    reg = CollectorRegistry()
    drift = DriftTracker(BUNDLE, reg, window=400, min_requests=100)
    drift.observe("m", "v1", baseline_draws(99, 0))
    g = scrape(reg)
    assert g["misalign_drift_window_requests", "toxic"] == 99
    assert not any(name in GAUGES for name, _ in g)
    drift.observe("m", "v1", baseline_draws(301, 1))
    g = scrape(reg)
    for f in BUNDLE.feature_names:
        assert g["misalign_drift_window_requests", f] == 400
        assert abs(g["misalign_drift_mean_shift_sigmas", f]) < 0.25
        assert g["misalign_drift_psi", f] < 0.1
        assert g["misalign_drift_ks", f] < 0.1
    # The window slides: 400 shifted requests push the benign ones out entirely.
    drift.observe("m", "v1", baseline_draws(400, 2, shift_sigmas=1.5))
    g = scrape(reg)
    for f in BUNDLE.feature_names:
        assert 1.2 < g["misalign_drift_mean_shift_sigmas", f] < 1.8
        assert g["misalign_drift_psi", f] > 0.5
        assert g["misalign_drift_ks", f] > 0.4


def test_ks_matches_a_direct_computation() -> None:
    base = BaselineCDF(0.0, 1.0, tuple(np.linspace(-1.6, 1.6, 9)))
    x = np.array([-3.0, -0.5, 0.1, 0.2, 2.5])
    grid = np.linspace(-5, 5, 200_001)
    emp = np.searchsorted(np.sort(x), grid, side="right") / len(x)
    assert base.ks(x) == pytest.approx(np.abs(emp - base.cdf(grid)).max(), abs=1e-4)


def test_min_requests_above_window_is_refused() -> None:
    with pytest.raises(SettingsError, match="drift_min_requests must not exceed drift_window"):
        load_settings(drift_window=50, drift_min_requests=60)


def send(address: str, scores: np.ndarray, start: int) -> None:
    """One request per row of ``scores``: 4 prompt rows, 6 response rows whose projections make
    the response mean of feature i equal ``scores[row, i]``."""
    reqs = []
    for j, s in enumerate(scores):
        proj = np.tile((s - BUNDLE.bias).astype(np.float32), (10, 1))
        reqs.append(request_rows(f"r-{start + j}", proj, 4, seed=j))
    with grpc.insecure_channel(address) as ch:
        summary = pb_grpc.MonitorStub(ch).Ingest(
            stream_requests(BUNDLE.bundle_id, BUNDLE.k, reqs, chunk=4), timeout=60
        )
    assert summary.finished == len(scores)


def test_gauges_move_in_a_real_sidecar_when_the_traffic_shifts(tmp_path: Path) -> None:
    env = {"MISALIGN_DRIFT_WINDOW": "200", "MISALIGN_DRIFT_MIN_REQUESTS": "50"}
    with start_sidecar(tmp_path, env=env) as sidecar:

        def read() -> dict[tuple[str, str], float]:
            with urllib.request.urlopen(sidecar.metrics_url, timeout=10) as resp:
                return gauges(resp.read().decode())

        send(sidecar.address, baseline_draws(30, 10), 0)
        g = read()
        assert g["misalign_drift_window_requests", "misaligned_persona"] == 30
        assert not any(name in GAUGES for name, _ in g)

        send(sidecar.address, baseline_draws(170, 11), 30)
        g = read()
        for f in BUNDLE.feature_names:
            assert g["misalign_drift_window_requests", f] == 200
            assert abs(g["misalign_drift_mean_shift_sigmas", f]) < 0.3
            assert g["misalign_drift_psi", f] < 0.15
            assert g["misalign_drift_ks", f] < 0.15

        send(sidecar.address, baseline_draws(200, 12, shift_sigmas=2.0), 200)
        g = read()
        for f in BUNDLE.feature_names:
            assert g["misalign_drift_mean_shift_sigmas", f] > 1.6
            assert g["misalign_drift_psi", f] > 1.0
            assert g["misalign_drift_ks", f] > 0.5
