"""Prometheus metrics of the sidecar, on an explicit registry.

Labels are bounded: model, model version, LoRA adapter, bundle, feature, and fixed reason
strings. Never a request id or text. Model and model version come from the client, so they pass
through ``LabelValues`` first: the operator's allow-list, or the first few distinct values seen,
each at most ``max_chars`` long; any other value is reported as ``other`` and counted in
``misalign_label_values_refused_total{label}``. The adapter (vLLM's LoRA name, which a server with
runtime LoRA loading lets clients choose) is kept only when the operator lists it
(``label_adapters``); the base model's requests carry ``adapter=""``, which Prometheus stores as
no label at all, so a deployment without adapters has the series it had before. Drop reasons and mitigation modes a sender reports
are kept only when they are ones this code knows (``DROP_REASONS``, ``MITIGATION_MODES``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from detectors.bundle import Bundle

VERSION = "0.1.0"
# The model's label, named as vLLM names it on its own metrics (vllm:num_requests_running and the
# rest), so a misalignment rate joins vLLM's request metrics `on (model_name)` as it is.
MODEL_LABEL = "model_name"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
OTHER = "other"
# Why rows or steps were dropped: by the tap (tap/publisher.py, tap/runner_hook.py) and by the
# sidecar's store (service/ingest.py).
DROP_REASONS = frozenset(
    {
        "queue_full",
        "sidecar_unavailable",
        "tap_error",
        "not_captured",
        "capacity",
        "too_long",
        "after_finish",
    }
)
MITIGATION_MODES = frozenset({"ablate", "steer"})  # tap/mitigation.py
# The LoRA adapter's label (tap/runner_hook.py sends vLLM's lora_name; "" the base model).
ADAPTER_LABEL = "adapter"
BASE = ""


@dataclass(frozen=True)
class LabelLimits:
    """What client-chosen label values may become series (settings ``label_*``)."""

    models: tuple[str, ...] = ()  # allowed; empty: the first ``max_models`` seen
    model_versions: tuple[str, ...] = ()
    max_models: int = 8
    max_model_versions: int = 16
    max_chars: int = 64
    adapters: tuple[str, ...] = ()  # kept; any other adapter is "other", the base model ""


class LabelValues:
    """One client-chosen label: a value is kept when allowed, or (no allow-list) while fewer than
    ``cap`` distinct values have been kept; anything else, and anything longer than
    ``max_chars``, becomes ``other`` and is counted."""

    def __init__(
        self,
        label: str,
        allowed: tuple[str, ...],
        cap: int,
        max_chars: int,
        refused: Counter,
        *,
        open_: bool | None = None,
    ) -> None:
        self._kept: set[str] = set(allowed)
        # Without an allow-list the first ``cap`` values are kept, unless ``open_`` is False.
        self._open = not allowed if open_ is None else open_
        self.cap = cap
        self.max_chars = max_chars
        self._refused = refused.labels(label)

    def __call__(self, value: str) -> str:
        if value in self._kept:
            return value
        if self._open and len(value) <= self.max_chars and len(self._kept) < self.cap:
            self._kept.add(value)
            return value
        self._refused.inc()
        return OTHER


def score_buckets(bundle: Bundle) -> tuple[float, ...]:
    """Buckets spanning the calibrated scores, with every feature's threshold as a bucket edge."""
    edges = {float(x) for x in np.round(np.linspace(-10, 10, 41), 3)}
    for f in bundle.spec.features:
        c = f.calibration
        if c is not None:
            edges.add(round(c.threshold, 6))
            edges.update(round(q, 6) for q in c.quantiles)
    return tuple(sorted(edges))


class ScoreHistograms(Collector):
    """``misalign_request_score`` for all k features at once: one numpy update per request, the
    Prometheus families built at scrape time. Per-feature client histograms cost k locked updates
    per request, which dominated scoring."""

    LABELS = (MODEL_LABEL, "model_version", ADAPTER_LABEL, "bundle", "feature")

    def __init__(self, features: list[str], bundle_id: str, buckets: tuple[float, ...]) -> None:
        self.features = features
        self.bundle_id = bundle_id
        self.edges = np.asarray(buckets, np.float64)
        self._series: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}

    def observe(self, model: str, version: str, scores: np.ndarray, adapter: str = BASE) -> None:
        """``scores [k]``, or ``[r, k]`` for r requests; NaN (no tokens in the span) is not
        observed."""
        series = self._series.get((model, version, adapter))
        if series is None:
            k = len(self.features)
            series = self._series[model, version, adapter] = (
                np.zeros((k, len(self.edges) + 1), np.int64),
                np.zeros(k, np.float64),
            )
        counts, sums = series
        scores = np.asarray(scores, np.float64).reshape(-1, len(self.features))
        ok = ~np.isnan(scores)
        feats = np.nonzero(ok)[1]
        # bucket counts by (feature, bucket) in one bincount (np.add.at is many times slower)
        cell = feats * counts.shape[1] + np.searchsorted(self.edges, scores[ok], side="left")
        counts += np.bincount(cell, minlength=counts.size).reshape(counts.shape)
        sums += np.where(ok, scores, 0.0).sum(axis=0)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(
            "misalign_request_score",
            "Request score per feature (the flag's aggregate)",
            labels=self.LABELS,
        )
        for (model, version, adapter), (counts, sums) in list(self._series.items()):
            cum = np.cumsum(counts, axis=1)
            for i, name in enumerate(self.features):
                buckets = [(_le(e), float(c)) for e, c in zip(self.edges, cum[i, :-1], strict=True)]
                buckets.append(("+Inf", float(cum[i, -1])))
                labels = [model, version, adapter, self.bundle_id, name]
                fam.add_metric(labels, buckets, None)
                # add_metric leaves out _count and _sum when buckets go below zero (an OpenMetrics
                # rule); the Prometheus text format has them, and rate(sum)/rate(count) needs them.
                named = dict(zip(fam._labelnames, labels, strict=True))
                fam.samples.append(Sample(fam.name + "_count", named, float(cum[i, -1])))
                fam.samples.append(Sample(fam.name + "_sum", named, float(sums[i])))
        yield fam


def _le(edge: float) -> str:
    return repr(float(edge))


class Metrics:
    def __init__(
        self,
        bundle: Bundle,
        registry: CollectorRegistry | None = None,
        limits: LabelLimits = LabelLimits(),
    ) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.labels_refused = Counter(
            "misalign_label_values_refused_total",
            "Label values a client sent that are reported as 'other': not allowed, past the cap "
            "on distinct values, too long, or not a known reason or mode",
            ("label",),
            registry=r,
        )
        self.model = LabelValues(
            MODEL_LABEL, limits.models, limits.max_models, limits.max_chars, self.labels_refused
        )
        self.model_version = LabelValues(
            "model_version",
            limits.model_versions,
            limits.max_model_versions,
            limits.max_chars,
            self.labels_refused,
        )
        self.adapter = LabelValues(
            ADAPTER_LABEL,
            (BASE, *limits.adapters),
            len(limits.adapters) + 1,
            limits.max_chars,
            self.labels_refused,
            open_=False,
        )
        req = (MODEL_LABEL, "model_version", ADAPTER_LABEL, "bundle")
        feat = (*req, "feature")
        self.request_score = ScoreHistograms(
            bundle.feature_names, bundle.bundle_id, score_buckets(bundle)
        )
        r.register(self.request_score)
        self.requests_scored = Counter(
            "misalign_requests_scored_total", "Requests scored", req, registry=r
        )
        self.requests_mitigated = Counter(
            "misalign_requests_mitigated_total",
            "Requests with token rows the tap mitigated (tap.mitigation), by mode and whether flagged",
            (*req, "mode", "flagged"),
            registry=r,
        )
        self.tokens_mitigated = Counter(
            "misalign_tokens_mitigated_total",
            "Token rows whose residual stream the tap changed",
            req,
            registry=r,
        )
        self.requests_flagged = Counter(
            "misalign_requests_flagged_total",
            "Requests flagged, by feature that passed its threshold",
            feat,
            registry=r,
        )
        self.tokens_ingested = Counter(
            "misalign_tokens_ingested_total", "Token rows ingested", ("bundle",), registry=r
        )
        self.steps_ingested = Counter(
            "misalign_steps_ingested_total", "Engine step batches ingested", ("bundle",), registry=r
        )
        self.rows_dropped = Counter(
            "misalign_rows_dropped_total",
            "Token rows lost before scoring, by where and why",
            ("side", "reason"),
            registry=r,
        )
        self.steps_dropped = Counter(
            "misalign_steps_dropped_total",
            "Engine steps lost before scoring, by where and why",
            ("side", "reason"),
            registry=r,
        )
        self.ingest_errors = Counter(
            "misalign_ingest_errors_total",
            "Malformed messages refused, by the field at fault",
            ("rpc", "reason"),
            registry=r,
        )
        self.finishes_ignored = Counter(
            "misalign_finishes_ignored_total",
            "Finish notices not scored: request never seen (or expired) or already finished",
            ("reason",),
            registry=r,
        )
        self.requests_expired = Counter(
            "misalign_requests_expired_total",
            "Requests dropped unfinished (timeout or capacity)",
            ("reason",),
            registry=r,
        )
        self.active_requests = Gauge(
            "misalign_active_requests", "Requests with rows and no finish yet", registry=r
        )
        self.scoring_latency = Histogram(
            "misalign_scoring_latency_seconds",
            "From a finish arriving to its score being available",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.score_waits = Counter(
            "misalign_score_waits_total",
            "Score lookups that waited for the request to be scored (GetRequestScore wait_s, "
            "GET /v1/scores wait_s), by outcome: scored, timeout, cancelled (the caller left), "
            "refused (score_waiters_max callers already waiting)",
            ("outcome",),
            registry=r,
        )
        self.score_waiters = Gauge(
            "misalign_score_waiters", "Callers waiting for a score now", registry=r
        )
        self.queue_pushes = Counter(
            "misalign_queue_pushes_total", "Flagged samples written to the Redis stream", registry=r
        )
        self.queue_duplicates = Counter(
            "misalign_queue_duplicates_total",
            "Flagged samples not written: request already queued",
            registry=r,
        )
        self.queue_failures = Counter(
            "misalign_queue_push_failures_total", "Failed attempts to write to Redis", registry=r
        )
        self.queue_buffered = Gauge(
            "misalign_queue_buffered", "Flagged samples waiting in memory for Redis", registry=r
        )
        # The alert on the buffer filling compares misalign_queue_buffered with this.
        self.queue_capacity = Gauge(
            "misalign_queue_buffer_capacity",
            "Flagged samples the memory buffer holds before it drops the oldest",
            registry=r,
        )
        queue_dropped = Counter(
            "misalign_queue_dropped_total",
            "Flagged samples dropped: stage=build, more than buffer_size waited to be built "
            "(redaction, text) on the sample thread; stage=buffer, the buffer was full",
            ["stage"],
            registry=r,
        )
        # Two places drop, for different reasons (a starved sample thread, an absent Redis):
        # an operator needs to tell them apart.
        self.queue_dropped_build = queue_dropped.labels("build")
        self.queue_dropped_buffer = queue_dropped.labels("buffer")
        self._refused_reason = self.labels_refused.labels("reason")
        self._refused_mode = self.labels_refused.labels("mode")
        self.samples_clipped = Counter(
            "misalign_sample_text_clipped_total",
            "Flagged samples whose text was too long to keep whole (head and tail kept)",
            ("field",),
            registry=r,
        )
        self.sample_failures = Counter(
            "misalign_sample_build_failures_total",
            "Flagged samples lost because building them (detokenise, redact) raised",
            registry=r,
        )
        # Trace context (service/tracing.py): finishes by what their traceparent was, and the
        # spans sent to the OTLP collector, or lost (queue full, export failed).
        self.trace_contexts = Counter(
            "misalign_trace_contexts_total",
            "Finished requests by their W3C traceparent: valid, none, refused by the tap, or "
            "refused here (malformed, too_long)",
            ("outcome",),
            registry=r,
        )
        self.trace_spans = Counter(
            "misalign_trace_spans_total",
            "Score spans for the OTLP collector: exported, not_sampled (the caller's flag), "
            "dropped_queue_full, export_failed",
            ("outcome",),
            registry=r,
        )
        self.build_info = Info("misalign_build", "Sidecar build", registry=r)
        self.build_info.info({"version": VERSION})
        self.bundle_info = Info("misalign_bundle", "Loaded direction bundle", registry=r)
        self.bundle_info.info(
            {
                "bundle": bundle.bundle_id,
                MODEL_LABEL: bundle.spec.model.name,
                "layer": str(bundle.spec.layer),
                "features": ",".join(bundle.feature_names),
            }
        )
        self.feature_threshold = Gauge(
            "misalign_feature_threshold",
            "Calibrated threshold of each feature",
            ("bundle", "feature"),
            registry=r,
        )
        for f in bundle.spec.features:
            if f.calibration is not None:
                self.feature_threshold.labels(bundle.bundle_id, f.name).set(f.calibration.threshold)

    def drop_reason(self, reason: str) -> str:
        if reason in DROP_REASONS:
            return reason
        self._refused_reason.inc()
        return OTHER

    def mitigation_mode(self, mode: str) -> str:
        if mode in MITIGATION_MODES:
            return mode
        self._refused_mode.inc()
        return OTHER
