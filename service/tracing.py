"""Score spans to an OTLP collector: each scored request that came with a W3C ``traceparent``
gets a span ``misalign.score``, a child of the caller's span, carrying its scores and flag.

Off unless ``otlp_endpoint`` is set. Export never holds up scoring: the scoring pass only
appends each span's facts to a bounded queue; a thread of its own makes the SDK's spans (some
hundred microseconds each, which the scoring pass would otherwise pay) and hands them to the
OpenTelemetry SDK's batch processor (a bounded queue and another thread, which sends over
OTLP/gRPC and retries); when either queue is full the new span is dropped and counted
(``misalign_trace_spans_total{outcome="dropped_queue_full"}``), and a batch the collector refused
or never answered is counted as ``export_failed``. The caller's sampling flag is obeyed (the
SDK's parent-based sampler): a traceparent with flags ``00`` gets no span, only its trace id in
the flagged sample.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
    set_span_in_context,
)

from service.metrics import VERSION, Metrics
from wire.trace_context import TraceParent

log = logging.getLogger(__name__)
SPAN_NAME = "misalign.score"
# Client-chosen strings (model names, request ids) are cut to this in span attributes.
MAX_ATTRIBUTE_CHARS = 256


def check_endpoint(value: str) -> str:
    """``http://host:port`` (plaintext) or ``https://host:port`` (TLS); raises ValueError."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"expected http://host:port (plaintext) or https://host:port (TLS) of an OTLP/gRPC "
            f"collector, got {value!r}"
        )
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"an OTLP/gRPC endpoint has no path or query, got {value!r}")
    return value


class _Counting(SpanExporter):
    """The OTLP exporter, counting what it sent and what it could not."""

    def __init__(self, inner: SpanExporter, metrics: Metrics) -> None:
        self.inner = inner
        self._exported = metrics.trace_spans.labels("exported")
        self._failed = metrics.trace_spans.labels("export_failed")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            log.exception("OTLP export raised")
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self._exported.inc(len(spans))
        else:
            self._failed.inc(len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _BoundedBatch(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans it has no room for. (The SDK drops the
    oldest when full, with a log line and no count; here the new one is dropped and counted.)"""

    def __init__(self, exporter: SpanExporter, metrics: Metrics, queue_size: int, **kw: Any):
        super().__init__(exporter, max_queue_size=queue_size, **kw)
        self._cap = queue_size
        self._dropped = metrics.trace_spans.labels("dropped_queue_full")

    def queued(self) -> int:
        # The SDK's deque (thread-safe); read only to count, the SDK does the queueing.
        return len(getattr(self._batch_processor, "_queue", ()))

    def on_end(self, span: ReadableSpan) -> None:
        if self.queued() >= self._cap:
            self._dropped.inc()
            return
        super().on_end(span)


class ScoreTracer:
    def __init__(
        self,
        metrics: Metrics,
        exporter: SpanExporter,
        *,
        service_name: str = "misalign-sidecar",
        queue_size: int = 2048,
        batch_size: int = 512,
        schedule_delay_ms: float = 1000.0,
    ) -> None:
        self.metrics = metrics
        self.processor = _BoundedBatch(
            _Counting(exporter, metrics),
            metrics,
            queue_size,
            max_export_batch_size=min(batch_size, queue_size),
            schedule_delay_millis=schedule_delay_ms,
        )
        # A provider of its own, not the global one: nothing else in the process is traced.
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service_name, "service.version": VERSION}),
            span_limits=SpanLimits(max_attribute_length=MAX_ATTRIBUTE_CHARS),
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("misalign-monitor", VERSION)
        self._not_sampled = metrics.trace_spans.labels("not_sampled")
        self._dropped = metrics.trace_spans.labels("dropped_queue_full")
        self._cap = queue_size
        self._facts: deque[tuple[TraceParent, int, int, dict[str, Any], list[str]]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="misalign-spans", daemon=True)
        self._thread.start()

    @classmethod
    def otlp(
        cls,
        metrics: Metrics,
        endpoint: str,
        *,
        tls_ca: Path | None = None,
        timeout_s: float = 10.0,
        **kw: Any,
    ) -> ScoreTracer:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        secure = urlsplit(endpoint).scheme == "https"
        creds = None
        if secure and tls_ca is not None:
            creds = grpc.ssl_channel_credentials(tls_ca.read_bytes())
        exporter = OTLPSpanExporter(
            endpoint=endpoint, insecure=not secure, credentials=creds, timeout=timeout_s
        )
        return cls(metrics, exporter, **kw)

    def emit(
        self,
        parent: TraceParent,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, Any],
        flagged: list[str],
    ) -> None:
        """Queue one scored request's span (child of the caller's span); never waits."""
        if len(self._facts) >= self._cap:
            self._dropped.inc()
            return
        self._facts.append((parent, start_ns, end_ns, attributes, flagged))
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(0.5)
            self._wake.clear()
            while self._facts:
                self._make(*self._facts.popleft())
            if self._stop:
                return

    def _make(
        self,
        parent: TraceParent,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, Any],
        flagged: list[str],
    ) -> None:
        try:
            ctx = SpanContext(
                parent.trace_id,
                parent.span_id,
                is_remote=True,
                trace_flags=TraceFlags(parent.flags),
            )
            span = self.tracer.start_span(
                SPAN_NAME,
                context=set_span_in_context(NonRecordingSpan(ctx), Context()),
                kind=SpanKind.INTERNAL,
                attributes=attributes,
                start_time=start_ns,
            )
            if not span.is_recording():
                self._not_sampled.inc()
                return
            if flagged:
                span.add_event("misalign.flagged", {"misalign.features": flagged}, timestamp=end_ns)
            span.end(end_time=end_ns)
        except Exception:
            log.exception("could not make the score span of a request")

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (up to ``timeout_s``), then stop the export threads."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout_s)
        self.processor.force_flush(int(timeout_s * 1000))
        self.provider.shutdown()
