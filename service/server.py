"""The sidecar process: gRPC (TCP, TLS optional, and/or a plaintext Unix socket), a plaintext
health-only port for probes, /metrics, the flag queue. Who may call what: service/auth.py."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from detectors import bundle as bundle_io
from detectors.errors import BadInput, SettingsError
from service import redaction, redis_conn
from service.auth import AccessPolicy, AuthInterceptor, server_credentials
from service.drift import DriftTracker
from service.embedded_redis import EmbeddedRedis
from service.flags import FlagQueue
from service.http_api import HttpListener, start_http
from service.metrics import LabelLimits, Metrics
from service.monitor import Monitor, default_tokenizer_path, load_tokenizer
from service.review_gauges import ReviewGauges, refresh_review_gauges
from service.sample_worker import SampleWorker
from service.score_waiters import ScoreWaiters, ShuttingDown, WaitersFull
from service.settings import Settings
from service.wire_guard import MalformedMessageInterceptor, receive_limit
from wire import monitor_pb2 as pb
from wire import monitor_pb2_grpc as pb_grpc
from wire.codec import decode_rows

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Monitor"].full_name


class MonitorServicer(pb_grpc.MonitorServicer):
    def __init__(
        self, monitor: Monitor, waiters: ScoreWaiters, score_delay_s: float = 0.005
    ) -> None:
        self.monitor = monitor
        self.waiters = waiters
        # Requests finished in a step wait this long for those of the next steps, so that under
        # load one scoring pass covers several steps; a lookup of a waiting one scores it at once.
        self.score_delay_s = score_delay_s
        self._flush_timer: asyncio.TimerHandle | None = None

    def _flush(self) -> None:
        self._flush_timer = None
        self.monitor.flush()

    def _flush_soon(self) -> None:
        if self.monitor.pending and self._flush_timer is None:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(self.score_delay_s, self._flush)

    async def _refuse(self, context: grpc.aio.ServicerContext, rpc: str, exc: BadInput) -> None:
        self.monitor.metrics.ingest_errors.labels(rpc, exc.reason).inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Ingest(
        self, request_iterator: AsyncIterator[pb.StepBatch], context: grpc.aio.ServicerContext
    ) -> pb.IngestSummary:
        steps = rows = finished = 0
        try:
            async for msg in request_iterator:
                try:
                    finished += self.monitor.ingest(msg)
                except BadInput as exc:
                    await self._refuse(
                        context, "Ingest", BadInput(exc.reason, f"step {msg.step}: {exc}")
                    )
                self._flush_soon()
                steps += 1
                rows += len(msg.is_response)
        finally:
            self.monitor.flush()  # a stream that ends leaves nothing waiting
            if self.monitor.samples is not None:  # its flagged samples in the queue, too
                await self.monitor.samples.built()
        return pb.IngestSummary(steps=steps, rows=rows, finished=finished)

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.RequestScore:
        try:
            rows = decode_rows(
                self.monitor.bundle_id,
                self.monitor.bundle.k,
                request.bundle_id,
                request.k,
                request.projections,
                request.is_response,
                request.token_ids,
            )
        except BadInput as exc:
            await self._refuse(context, "Score", exc)
        if len(rows.roles) == 0:
            await self._refuse(context, "Score", BadInput("row_count", "no rows to score"))
        return self.monitor.score_rows(rows, request.model, request.model_version)

    async def GetRequestScore(
        self, request: pb.GetRequestScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.RequestScore:
        rid, wait_s = request.request_id, request.wait_s
        try:
            hit = await self.waiters.get(rid, wait_s)
        except BadInput as exc:
            await self._refuse(context, "GetRequestScore", exc)
        except WaitersFull as exc:
            self.monitor.metrics.ingest_errors.labels("GetRequestScore", "waiters_full").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ShuttingDown as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if hit is None:
            self.monitor.metrics.ingest_errors.labels("GetRequestScore", "unknown_request").inc()
            await context.abort(grpc.StatusCode.NOT_FOUND, self.waiters.not_found(rid, wait_s))
        assert hit is not None  # abort raises
        return hit

    async def DescribeBundle(
        self, request: pb.DescribeBundleRequest, context: grpc.aio.ServicerContext
    ) -> pb.BundleInfo:
        return self.describe()

    def describe(self) -> pb.BundleInfo:
        b = self.monitor.bundle
        feats = []
        for f in b.spec.features:
            c = f.calibration
            feats.append(
                pb.FeatureInfo(
                    name=f.name,
                    method=f.method,
                    kind=f.kind,
                    span=f.aggregation.span,
                    reduce=f.aggregation.reduce,
                    window=f.aggregation.window,
                    threshold=c.threshold if c else float("nan"),
                    has_threshold=c is not None,
                )
            )
        return pb.BundleInfo(
            bundle_id=b.bundle_id,
            content_hash=b.content_hash,
            model=b.spec.model.name,
            hidden_size=b.spec.model.hidden_size,
            num_layers=b.spec.model.num_layers,
            layer=b.spec.layer,
            hook=b.spec.hook,
            format_version=bundle_io.FORMAT_VERSION,
            features=feats,
        )


@dataclass
class Sidecar:
    settings: Settings
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    monitor: Monitor
    queue: FlagQueue
    metrics: Metrics
    tcp_port: int | None
    metrics_port: int
    embedded: EmbeddedRedis | None
    http_server: object
    health_server: grpc.aio.Server | None = None  # the plaintext health-only port
    health_port: int | None = None
    waiters: ScoreWaiters | None = None
    http: HttpListener | None = None  # the JSON API (http_port)
    http_port: int | None = None
    _expire_task: asyncio.Task[None] | None = None
    _review_task: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        """Graceful: NOT_SERVING, stop accepting, let streams drain, flush the flag queue."""
        await self.health.enter_graceful_shutdown()
        if self.waiters is not None:
            # Long polls answer now (UNAVAILABLE, 503) rather than hold the drain up.
            self.waiters.close()
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(self.settings.shutdown_grace_s)
        if self.health_server is not None:
            await self.health_server.stop(0)
        self.monitor.flush()
        if self.monitor.samples is not None:
            await self.monitor.samples.drain()
        if self._expire_task:
            self._expire_task.cancel()
        if self._review_task:
            self._review_task.cancel()
        if self.monitor.tracer is not None:  # blocks while it sends: off the event loop
            await asyncio.to_thread(self.monitor.tracer.shutdown, self.settings.shutdown_grace_s)
        left = await self.queue.flush(self.settings.shutdown_grace_s)
        if left:
            log.warning("%d flagged samples could not reach redis before shutdown", left)
        await self.queue.close()
        shutdown = getattr(self.http_server, "shutdown", None)
        if shutdown:
            shutdown()
        if self.embedded:
            self.embedded.stop()
        if self.settings.unix_socket:
            self.settings.unix_socket.unlink(missing_ok=True)


def _listen(server: grpc.aio.Server, addr: str, setting: str, creds: Any = None) -> int:
    """Bind ``addr``; a port taken or an address not this host's is a settings mistake."""
    try:
        return server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)
    except RuntimeError as exc:
        raise SettingsError(f"setting '{setting}': cannot listen on {addr} ({exc})") from None


async def start(settings: Settings) -> Sidecar:
    bundle = bundle_io.load(settings.bundle)
    metrics = Metrics(
        bundle,
        limits=LabelLimits(
            tuple(settings.label_models),
            tuple(settings.label_model_versions),
            settings.label_max_models,
            settings.label_max_model_versions,
            settings.label_max_chars,
            tuple(settings.label_adapters),
        ),
    )
    # Listeners first: a port taken is refused before a process (embedded Redis) is started.
    opts = [
        ("grpc.max_receive_message_length", receive_limit(settings.max_message_bytes)),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    prefix = f"/{SERVICE_NAME}/"
    access = AuthInterceptor(AccessPolicy.from_settings(settings), metrics, prefix)
    guard = MalformedMessageInterceptor(metrics, prefix, settings.max_message_bytes)
    # The first interceptor runs first: a refused caller's bytes are never decoded.
    server = grpc.aio.server(options=opts, interceptors=[access, guard])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    tcp_port = None
    if settings.grpc_port is not None:
        if settings.grpc_port:
            _check_free(settings.grpc_host, settings.grpc_port, "grpc_port")
        addr = f"{settings.grpc_host}:{settings.grpc_port}"
        tcp_port = _listen(server, addr, "grpc_port", server_credentials(settings))
    if settings.unix_socket is not None:
        settings.unix_socket.parent.mkdir(parents=True, exist_ok=True)
        settings.unix_socket.unlink(missing_ok=True)
        # Plaintext: the socket's permissions guard it, and the tap speaks no TLS to it.
        _listen(server, f"unix:{settings.unix_socket}", "unix_socket")
    health_server = health_port = None
    if settings.health_port is not None:
        # A server of its own holding only the health service: probes get no other method.
        if settings.health_port:
            _check_free(settings.grpc_host, settings.health_port, "health_port")
        health_server = grpc.aio.server(options=opts)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        addr = f"{settings.grpc_host}:{settings.health_port}"
        health_port = _listen(health_server, addr, "health_port")
    if settings.http_port:  # bound once the monitor exists; refused here if taken
        _check_free(settings.grpc_host, settings.http_port, "http_port")
    try:
        http_server, _thread = start_http_server(
            settings.metrics_port, addr=settings.metrics_host, registry=metrics.registry
        )
    except OSError as exc:
        addr = f"{settings.metrics_host}:{settings.metrics_port}"
        raise SettingsError(f"setting 'metrics_port': cannot listen on {addr} ({exc})") from None
    embedded = None
    url = redis_conn.redis_url(settings)
    if url is None:
        embedded = EmbeddedRedis(settings.state_dir)
        url = embedded.start()
    auth = redis_conn.client_options(settings)
    client = redis_conn.connect(url, auth, timeout_s=2)
    queue = FlagQueue(
        client,
        metrics,
        stream=settings.stream,
        group=settings.group,
        dead_letter_stream=settings.dead_letter_stream,
        maxlen=settings.stream_maxlen,
        buffer_size=settings.buffer_size,
        batch_size=settings.flag_batch_size,
        dedup_ttl_s=settings.dedup_ttl_s,
        wait_replicas=redis_conn.wait_replicas(settings, url),
        wait_timeout_ms=settings.redis_wait_timeout_ms,
    )
    await queue.start()
    tok_path = settings.tokenizer or default_tokenizer_path(bundle)
    tracer = None
    if settings.otlp_endpoint is not None:
        from service.tracing import ScoreTracer  # the OpenTelemetry SDK only when asked for

        tracer = ScoreTracer.otlp(
            metrics,
            settings.otlp_endpoint,
            tls_ca=settings.otlp_tls_ca,
            timeout_s=settings.otlp_timeout_s,
            service_name=settings.otlp_service_name,
            queue_size=settings.otlp_queue_size,
        )
    monitor = Monitor(
        bundle,
        metrics,
        queue,
        max_requests=settings.max_requests,
        max_tokens=settings.max_tokens_per_request,
        max_rows=settings.max_rows,
        timeout_s=settings.request_timeout_s,
        recent_scores=settings.recent_scores,
        tokenizer=load_tokenizer(tok_path),
        redactor=redaction.from_settings(
            settings.redact, list(settings.redact_builtin), settings.redact_patterns
        ),
        drift=DriftTracker(
            bundle,
            metrics.registry,
            window=settings.drift_window,
            min_requests=settings.drift_min_requests,
        ),
        samples=SampleWorker(queue, metrics, settings.buffer_size),
        sample_text_chars=settings.sample_text_chars,
        tracer=tracer,
    )
    waiters = ScoreWaiters(monitor, metrics, settings.score_wait_max_s, settings.score_waiters_max)
    servicer = MonitorServicer(monitor, waiters, settings.score_delay_ms / 1e3)
    pb_grpc.add_MonitorServicer_to_server(servicer, server)
    http = None
    if settings.http_port is not None:
        http = await start_http(settings, monitor, waiters, metrics, servicer.describe)
    await server.start()
    if health_server is not None:
        await health_server.start()
    if settings.unix_socket is not None:
        os.chmod(settings.unix_socket, settings.unix_socket_mode)
    metrics_port = http_server.server_port
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    sidecar = Sidecar(
        settings,
        server,
        health_servicer,
        monitor,
        queue,
        metrics,
        tcp_port,
        metrics_port,
        embedded,
        http_server,
        health_server,
        health_port,
        waiters,
        http,
        http.port if http is not None else None,
    )
    sidecar._expire_task = asyncio.create_task(_expire_loop(monitor, settings.request_timeout_s))
    sidecar._review_task = asyncio.create_task(
        refresh_review_gauges(
            client,
            ReviewGauges(metrics.registry),
            stream=settings.stream,
            group=settings.group,
            dead_stream=settings.dead_letter_stream,
            period_s=settings.review.backlog_refresh_s,
        )
    )
    log.info(
        "serving bundle %s (%s, layer %d) on %s%s%s; metrics on http://%s:%d/metrics; flags to "
        "%s%s",
        bundle.bundle_id,
        bundle.spec.model.name,
        bundle.spec.layer,
        f"{settings.grpc_host}:{tcp_port}" if tcp_port is not None else "",
        f" unix:{settings.unix_socket}" if settings.unix_socket else "",
        f"; health on {settings.grpc_host}:{health_port}" if health_port is not None else "",
        settings.metrics_host,
        metrics_port,
        "embedded redis" if embedded else redis_conn.redact_url(url),
        f"; score spans to {settings.otlp_endpoint}" if tracer is not None else "",
    )
    if http is not None:
        scheme = "https" if settings.tls_cert else "http"
        log.info("JSON API on %s://%s:%d/v1/", scheme, settings.grpc_host, http.port)
    return sidecar


def _check_free(host: str, port: int, setting: str) -> None:
    """Bind the address once without SO_REUSEPORT, which grpc sets: with it, a port another
    process holds the same way is shared without a word (two sidecars splitting one port's
    traffic), and a port taken otherwise fails in grpc's C core with a log line of its own."""
    try:
        addrs = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise SettingsError(f"setting 'grpc_host': cannot resolve {host!r} ({exc})") from None
    for family, kind, proto, _, addr in addrs:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                raise SettingsError(
                    f"setting '{setting}': cannot listen on {host}:{port} ({exc.strerror or exc})"
                ) from None


async def _expire_loop(monitor: Monitor, timeout_s: float) -> None:
    period = min(max(timeout_s / 10, 0.05), 10.0)
    while True:
        await asyncio.sleep(period)
        monitor.expire()


async def serve(settings: Settings, ready_file: str | None = None) -> None:
    sidecar = await start(settings)
    # What start-up made (modules, grpc, the bundle, the tokenizer) lives as long as the process:
    # leave it out of the collector's passes, whose full sweeps otherwise land as pauses of
    # several ms in the finish -> score latency.
    gc.collect()
    gc.freeze()
    if ready_file:
        with open(ready_file, "w") as fh:
            fh.write(f"{sidecar.tcp_port or 0} {sidecar.metrics_port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    t0 = time.monotonic()
    log.info("shutting down: NOT_SERVING, draining streams, flushing flagged samples")
    await sidecar.stop()
    log.info("stopped in %.2f s", time.monotonic() - t0)
