"""The JSON API: the client calls of the gRPC service over HTTP (``http_port``), for callers that
have no gRPC stack.

- ``GET /v1/scores/{request_id}?wait_s=S``: a finished request's score, by the tap's id or the
  client-visible id (X-Request-Id), waiting up to S seconds (at most ``score_wait_max_s``) for it
  to be scored; 404 when it is not scored by then.
- ``GET /v1/bundle``: the loaded bundle.
- ``POST /v1/score``: score token rows (``service.api_models.ScoreBody``).

Authentication as for gRPC client calls (service/auth.py): the TCP listener's TLS, a client
certificate when ``tls_client_ca`` is set (a caller holding one needs no token), otherwise
``Authorization: Bearer <api_token>`` when ``api_token`` is set. Every body is hostile: at most
``http_max_body_bytes`` (413), JSON (400), the shape ``ScoreBody`` says, with finite numbers and
rows of the bundle's width (400 naming the field). Errors are JSON:
``{"error": {"status": 400, "reason": "...", "message": "..."}}``; refusals are counted in
``misalign_ingest_errors_total{rpc, reason}`` like gRPC's.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from aiohttp import web
from pydantic import ValidationError

from detectors.errors import BadInput
from service.api_models import BundleInfo, RequestScore, ScoreBody
from service.auth import api_token
from service.metrics import Metrics
from service.monitor import Monitor
from service.score_waiters import ScoreWaiters, ShuttingDown, WaitersFull
from service.settings import Settings
from wire import monitor_pb2 as pb
from wire.codec import MAX_PROJECTION, decode_rows
from wire.tls_files import read_pem

log = logging.getLogger(__name__)
_RPC = {"scores": "GetRequestScore", "bundle": "DescribeBundle", "score": "Score"}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def _error(status: int, reason: str, message: str) -> web.Response:
    body = {"error": {"status": status, "reason": reason, "message": message}}
    return web.json_response(body, status=status)


def _rpc_of(request: web.Request) -> str:
    parts = request.path.strip("/").split("/")
    return _RPC.get(parts[1] if len(parts) > 1 else "", "unknown")


@dataclass
class JsonApi:
    monitor: Monitor
    waiters: ScoreWaiters
    metrics: Metrics
    describe: Callable[[], pb.BundleInfo]
    token: bytes | None

    def app(self, max_body_bytes: int) -> web.Application:
        app = web.Application(
            client_max_size=max_body_bytes, middlewares=[self._errors, self._auth]
        )
        app.router.add_get("/v1/scores/{request_id:.+}", self.get_score)
        app.router.add_get("/v1/bundle", self.bundle)
        app.router.add_post("/v1/score", self.score)
        return app

    def _count(self, request: web.Request, reason: str) -> None:
        self.metrics.ingest_errors.labels(_rpc_of(request), reason).inc()

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every refusal as JSON naming what was wrong, and counted."""
        try:
            return await handler(request)
        except ApiError as exc:
            self._count(request, exc.reason)
            return _error(exc.status, exc.reason, str(exc))
        except web.HTTPRequestEntityTooLarge as exc:
            self._count(request, "too_large")
            return _error(413, "too_large", f"body: {exc.text}")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            reason = {404: "no_such_path", 405: "wrong_method"}.get(exc.status, "bad_request")
            self._count(request, reason)
            what = f"{request.method} {request.path}"
            return _error(exc.status, reason, f"{what}: {exc.reason}; see docs/sidecar.md")

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.token is None:
            return await handler(request)
        transport = request.transport
        if transport is not None and transport.get_extra_info("peercert"):
            return await handler(request)  # the handshake verified it against tls_client_ca
        sent = request.headers.get("Authorization", "").encode()
        if hmac.compare_digest(sent, b"Bearer " + self.token):
            return await handler(request)
        raise ApiError(
            401,
            "unauthenticated",
            f"{_rpc_of(request)} needs 'Authorization: Bearer <api_token>' (or a client "
            "certificate)",
        )

    async def get_score(self, request: web.Request) -> web.Response:
        rid = request.match_info["request_id"]
        unknown = sorted(set(request.query) - {"wait_s"})
        if unknown:
            raise ApiError(
                400, "bad_query", f"query: unknown parameter {unknown[0]!r}; only wait_s"
            )
        text = request.query.get("wait_s", "0")
        try:
            wait_s = float(text)
        except ValueError:
            raise ApiError(
                400, "wait_s", f"wait_s: {text[:40]!r} is not a number of seconds"
            ) from None
        try:
            hit = await self.waiters.get(rid, wait_s)
        except BadInput as exc:
            raise ApiError(400, exc.reason, str(exc)) from None
        except WaitersFull as exc:
            self._count(request, "waiters_full")
            resp = _error(429, "waiters_full", str(exc))
            resp.headers["Retry-After"] = "1"
            return resp
        except ShuttingDown as exc:
            raise ApiError(503, "shutting_down", str(exc)) from None
        if hit is None:
            raise ApiError(404, "unknown_request", self.waiters.not_found(rid, wait_s))
        return _json(RequestScore.from_proto(hit).model_dump_json())

    async def bundle(self, request: web.Request) -> web.Response:
        return _json(BundleInfo.from_proto(self.describe()).model_dump_json())

    async def score(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            raise ApiError(
                415,
                "content_type",
                f"Content-Type: {request.content_type!r}, expected application/json",
            )
        raw = await request.read()
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, "bad_json", f"body: not JSON ({str(exc)[:200]})") from None
        try:
            body = ScoreBody.model_validate(data)
        except ValidationError as exc:
            raise ApiError(400, "bad_field", _validation_message(exc)) from None
        k = self.monitor.bundle.k
        n = len(body.projections)
        for i, row in enumerate(body.projections):
            if len(row) != k:
                raise ApiError(
                    400,
                    "wrong_width",
                    f"projections[{i}]: {len(row)} values, expected k = {k} (the loaded bundle's "
                    "features, GET /v1/bundle)",
                )
        if len(body.is_response) != n:
            raise ApiError(
                400,
                "row_count",
                f"is_response: {len(body.is_response)} rows, projections has {n}",
            )
        if body.token_ids is not None and len(body.token_ids) != n:
            raise ApiError(
                400, "row_count", f"token_ids: {len(body.token_ids)} rows, projections has {n}"
            )
        tokens = body.token_ids if body.token_ids is not None else [0] * n
        try:
            wide = np.asarray(body.projections, dtype=np.float64)
            # Checked before float32, where a value past its range would read as infinity.
            far = np.flatnonzero((np.abs(wide) > MAX_PROJECTION).any(axis=1))
            if len(far):
                raise BadInput(
                    "out_of_range",
                    f"projections[{int(far[0])}] holds a value beyond +-{MAX_PROJECTION:g}, "
                    "which no activation reaches",
                )
            proj = wide.astype("<f4")
            rows = decode_rows(
                self.monitor.bundle_id,
                k,
                body.bundle_id,
                k,
                proj.tobytes(),
                np.asarray(body.is_response, dtype=np.int8).tobytes(),
                np.asarray(tokens, dtype="<u4").tobytes(),
            )
        except BadInput as exc:
            raise ApiError(400, exc.reason, str(exc)) from None
        result = self.monitor.score_rows(rows, body.model, body.model_version)
        return _json(RequestScore.from_proto(result).model_dump_json())


def _json(text: str) -> web.Response:
    return web.Response(text=text, content_type="application/json")


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def ssl_context(s: Settings) -> ssl.SSLContext | None:
    """The TCP listener's TLS for HTTPS (None: plaintext), client certificates as for gRPC."""
    if s.tls_cert is None or s.tls_key is None:
        return None
    read_pem(s.tls_cert, "certificate", "tls_cert")  # a clear error before ssl's own
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(s.tls_cert), str(s.tls_key))
    if s.tls_client_ca is not None:
        ctx.load_verify_locations(cafile=str(s.tls_client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass
class HttpListener:
    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_http(
    s: Settings,
    monitor: Monitor,
    waiters: ScoreWaiters,
    metrics: Metrics,
    describe: Callable[[], pb.BundleInfo],
) -> HttpListener:
    from service.settings import SettingsError

    assert s.http_port is not None
    api = JsonApi(monitor, waiters, metrics, describe, api_token(s))
    # Long polls are ended by ScoreWaiters.close() before this runs; a short timeout is enough.
    runner = web.AppRunner(api.app(s.http_max_body_bytes), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, s.grpc_host, s.http_port, ssl_context=ssl_context(s))
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        addr = f"{s.grpc_host}:{s.http_port}"
        raise SettingsError(
            f"setting 'http_port': cannot listen on {addr} ({exc.strerror or exc})"
        ) from None
    port = int(runner.addresses[0][1])
    return HttpListener(runner, port)
