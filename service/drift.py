"""Live drift: each model version's recent request scores against the bundle's calibration.

Per (model, model version, LoRA adapter) a ring buffer holds the last ``window`` request scores of every
feature; a scrape turns it into gauges per feature, against the benign baseline the bundle was
calibrated on (``Calibration``: mean, standard deviation, deciles):

- ``misalign_drift_mean_shift_sigmas``: (window mean - baseline mean) / baseline std;
- ``misalign_drift_psi``: population stability index over the ten decile bins (each 10% under
  the baseline);
- ``misalign_drift_ks``: Kolmogorov-Smirnov distance between the window's empirical CDF and the
  baseline CDF, piecewise linear through the deciles;
- ``misalign_drift_window_requests``: scores in the window.

The first three appear only once the window holds ``min_requests`` scores: a drift figure from
ten requests is noise. Features without a calibration have no baseline and get no gauges.
Observing is one row write; the statistics cost O(window) per series and run at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from detectors.bundle import Bundle
from detectors.stats import ks_statistic, psi_of_shares
from service.metrics import ADAPTER_LABEL, BASE, MODEL_LABEL

LABELS = [MODEL_LABEL, "model_version", ADAPTER_LABEL, "bundle", "feature"]


class _Window:
    def __init__(self, size: int, k: int) -> None:
        self.rows = np.full((size, k), np.nan)
        self.n = 0  # rows written, ever

    def add(self, scores: np.ndarray) -> None:
        """``scores [n, k]``; only the last ``size`` of them matter."""
        scores = scores[-len(self.rows) :]
        self.rows[(self.n + np.arange(len(scores))) % len(self.rows)] = scores
        self.n += len(scores)


class BaselineCDF:
    """The benign score distribution as the bundle records it: deciles, mean, spread."""

    def __init__(self, mean: float, std: float, deciles: tuple[float, ...]) -> None:
        self.mean, self.std = mean, std
        q = np.asarray(deciles, np.float64)
        self.edges = q if len(q) == 9 and np.all(np.diff(q) > 0) else np.empty(0)
        if len(self.edges):
            # The tails beyond the first and last decile are taken as wide as their neighbours.
            lo = q[0] - (q[1] - q[0])
            hi = q[-1] + (q[-1] - q[-2])
            self.knots = np.concatenate([[lo], q, [hi]])
            self.levels = np.linspace(0.0, 1.0, 11)

    @property
    def has_deciles(self) -> bool:
        return bool(len(self.edges))

    def cdf(self, x: np.ndarray) -> np.ndarray:
        return np.interp(x, self.knots, self.levels)

    def psi(self, x: np.ndarray) -> float:
        counts = np.bincount(np.searchsorted(self.edges, x, side="right"), minlength=10)
        return psi_of_shares(0.1, counts / len(x))

    def ks(self, x: np.ndarray) -> float:
        return ks_statistic(self.cdf(np.sort(x)))


class DriftTracker(Collector):
    LABELS = LABELS

    def __init__(
        self,
        bundle: Bundle,
        registry: CollectorRegistry | None,
        *,
        window: int = 500,
        min_requests: int = 100,
    ) -> None:
        if not 1 <= min_requests <= window:
            raise ValueError(f"min_requests {min_requests} must be in 1..window ({window})")
        self.bundle_id = bundle.bundle_id
        self.window = window
        self.min_requests = min_requests
        self.features: list[tuple[int, str, BaselineCDF]] = []
        for i, f in enumerate(bundle.spec.features):
            c = f.calibration
            if c is not None:
                self.features.append(
                    (i, f.name, BaselineCDF(c.baseline_mean, c.baseline_std, c.quantiles))
                )
        self.k = bundle.k
        self._series: dict[tuple[str, str, str], _Window] = {}
        if registry is not None:
            registry.register(self)

    def observe(self, model: str, version: str, scores: np.ndarray, adapter: str = BASE) -> None:
        """``scores [n, k]``: finished requests' feature scores (NaN: span had no tokens); an
        adapter's requests drift apart from the base model's (a fine-tune shipped as a LoRA)."""
        key = (model, version, adapter)
        w = self._series.get(key)
        if w is None:
            w = self._series[key] = _Window(self.window, self.k)
        w.add(np.asarray(scores, np.float64).reshape(-1, self.k))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fams = {
            name: GaugeMetricFamily(name, doc, labels=LABELS)
            for name, doc in (
                ("misalign_drift_window_requests", "Request scores in the drift window"),
                (
                    "misalign_drift_mean_shift_sigmas",
                    "Window mean minus the bundle's benign mean, in benign standard deviations",
                ),
                ("misalign_drift_psi", "PSI of the window over the benign deciles"),
                ("misalign_drift_ks", "KS distance of the window from the benign decile CDF"),
            )
        }
        for (model, version, adapter), w in list(self._series.items()):
            rows = w.rows[: min(w.n, self.window)]
            for i, name, base in self.features:
                x = rows[:, i]
                x = x[np.isfinite(x)]
                labels = [model, version, adapter, self.bundle_id, name]
                fams["misalign_drift_window_requests"].add_metric(labels, float(len(x)))
                if len(x) < self.min_requests:
                    continue
                fams["misalign_drift_mean_shift_sigmas"].add_metric(
                    labels, float((x.mean() - base.mean) / base.std)
                )
                if base.has_deciles:
                    fams["misalign_drift_psi"].add_metric(labels, base.psi(x))
                    fams["misalign_drift_ks"].add_metric(labels, base.ks(x))
        yield from fams.values()
