"""gRPC over TLS and mutual TLS, with certificates the test makes; who may call what on which
listener (service/auth.py), the real tap Publisher over mTLS, the plaintext health port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from detectors import bundle as bundle_io
from service.redis_keys import FLAGGED_STREAM
from service.server import SERVICE_NAME, Sidecar, start
from service.settings import Settings
from tap.publisher import Publisher
from tap.settings import TapSettings
from tests.support.pki import make_pki
from tests.support.polling import until
from tests.support.redis_proc import RedisProc
from tests.support.sidecar import tls_sidecar
from wire import monitor_pb2 as pb
from wire import monitor_pb2_grpc as pb_grpc
from wire.codec import encode_step


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
async def test_tls_and_mutual_tls(tmp_path: Path, redis_server: RedisProc, mutual: bool) -> None:
    pki = make_pki(tmp_path / "pki")
    sc = await start(
        Settings(
            grpc_port=0,
            metrics_port=0,
            redis_url=redis_server.url,
            state_dir=tmp_path / "state",
            tls_cert=pki["server.pem"],
            tls_key=pki["server.key"],
            tls_client_ca=pki["ca.pem"] if mutual else None,
        )
    )
    target = f"localhost:{sc.tcp_port}"
    try:
        ca = pki["ca.pem"].read_bytes()
        client = (
            (pki["client.key"].read_bytes(), pki["client.pem"].read_bytes())
            if mutual
            else (None, None)
        )
        creds = grpc.ssl_channel_credentials(ca, *client)
        async with grpc.aio.secure_channel(target, creds) as ch:
            info = await pb_grpc.MonitorStub(ch).DescribeBundle(
                pb.DescribeBundleRequest(), timeout=10
            )
            assert info.bundle_id
        async with grpc.aio.insecure_channel(target) as ch:  # plaintext is refused
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.MonitorStub(ch).DescribeBundle(pb.DescribeBundleRequest(), timeout=3)
        if mutual:  # a client without a certificate is refused
            async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca)) as ch:
                with pytest.raises(grpc.aio.AioRpcError):
                    await pb_grpc.MonitorStub(ch).DescribeBundle(
                        pb.DescribeBundleRequest(), timeout=3
                    )
    finally:
        await sc.stop()


# -- who may ingest: the tap over the Unix socket or mTLS; health for probes ------------------

BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
TOKEN = "s3cret-token-for-client-calls"


def flagged_request(
    rid: str,
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One step with all of a request's rows, its projections far over the first threshold."""
    n = 12
    proj = (np.full((n, BUNDLE.k), 0.0) - BUNDLE.bias).astype(np.float32)
    proj[:, 0] += 10.0
    roles = (np.arange(n) >= 4).astype(np.int8)
    return [rid], np.array([0, n]), np.arange(n), np.arange(10, 10 + n), roles, proj


def publish(publisher: Publisher, rid: str) -> None:
    publisher.submit(*flagged_request(rid))
    publisher.finish(rid, "stop")


def refused(sc: Sidecar, rpc: str) -> float:
    value = sc.metrics.registry.get_sample_value(
        "misalign_ingest_errors_total", {"rpc": rpc, "reason": "unauthenticated"}
    )
    return value or 0.0


async def test_the_tap_publisher_reaches_a_tls_sidecar_over_mtls_and_the_unix_socket(
    tmp_path: Path,
    redis_server: RedisProc,
) -> None:
    """TLS on, the sidecar requiring client certificates: the real tap Publisher gets through
    over TCP with its certificate, and over the Unix socket in plaintext; one with a certificate
    from another CA gets nowhere, and nothing of its reaches the review queue."""
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other")
    sc = await tls_sidecar(tmp_path, redis_server.url, pki, tls_client_ca=pki["ca.pem"])
    r = redis_server.client()
    publishers: list[Publisher] = []

    def tap(sidecar: str, pki_: dict[str, Path] | None, **tls: Any) -> Publisher:
        if pki_ is not None:
            tls |= dict(
                tls_ca=pki["ca.pem"], tls_cert=pki_["client.pem"], tls_key=pki_["client.key"]
            )
        publishers.append(
            Publisher(TapSettings(sidecar=sidecar, backoff_max_s=0.2, **tls), BUNDLE, "m")
        )
        return publishers[-1]

    try:
        publish(tap(f"localhost:{sc.tcp_port}", pki), "over-mtls")
        await until(lambda: r.xlen(FLAGGED_STREAM) == 1, 20, "the mTLS tap's flagged sample")
        publish(tap(f"unix:{sc.settings.unix_socket}", None), "over-socket")
        await until(lambda: r.xlen(FLAGGED_STREAM) == 2, 20, "the socket tap's flagged sample")
        # By address, the certificate's name given (it names localhost, not 127.0.0.1).
        via_ip = f"127.0.0.1:{sc.tcp_port}"
        publish(tap(via_ip, pki, tls_server_name="localhost"), "by-address")
        await until(lambda: r.xlen(FLAGGED_STREAM) == 3, 20, "the by-address tap's sample")
        assert {e[1]["request_id"] for e in r.xrange(FLAGGED_STREAM)} == {
            "over-mtls",
            "over-socket",
            "by-address",
        }

        stranger = tap(f"localhost:{sc.tcp_port}", other)  # verifies the server, is not trusted
        publish(stranger, "forged")
        await until(
            lambda: stranger.steps_dropped["sidecar_unavailable"] == 2, 20, "the stranger's drops"
        )
        assert not stranger.connected and sc.monitor.lookup("forged") is None
        assert r.xlen(FLAGGED_STREAM) == 3
    finally:
        await sc.stop()


async def test_ingest_without_a_client_certificate_and_calls_without_the_token_are_refused(
    tmp_path: Path,
    redis_server: RedisProc,
) -> None:
    """TLS without client certificates, a bearer token for client calls: Ingest over TCP is
    refused (UNAUTHENTICATED, counted) and none of its samples reach Redis; a client call needs
    the token, a wrong one is refused."""
    pki = make_pki(tmp_path / "pki")
    sc = await tls_sidecar(tmp_path, redis_server.url, pki, api_token=TOKEN)
    creds = grpc.ssl_channel_credentials(pki["ca.pem"].read_bytes())
    try:
        async with grpc.aio.secure_channel(f"localhost:{sc.tcp_port}", creds) as ch:
            stub = pb_grpc.MonitorStub(ch)
            rid, _, pos, tok, roles, proj = flagged_request("forged")
            batch = encode_step(BUNDLE.bundle_id, BUNDLE.k, [(rid[0], pos, tok, roles, proj)])
            done = pb.FinishedRequest(request_id="forged", model="m", finish_reason="stop")
            finish = encode_step(BUNDLE.bundle_id, BUNDLE.k, [], step=1, finished=[done])

            async def forged() -> AsyncIterator[pb.StepBatch]:
                yield batch
                yield finish

            for md in (None, (("authorization", f"Bearer {TOKEN}"),)):  # a token is no way in
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Ingest(forged(), metadata=md, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "needs a client certificate" in str(err.value.details())
            assert refused(sc, "Ingest") == 2

            ask = pb.GetRequestScoreRequest(request_id="forged")
            for md in (None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GetRequestScore(ask, metadata=md, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert refused(sc, "GetRequestScore") == 3
            good = (("authorization", f"Bearer {TOKEN}"),)
            with pytest.raises(grpc.aio.AioRpcError) as err:  # let in: the request is unknown
                await stub.GetRequestScore(ask, metadata=good, timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            info = await stub.DescribeBundle(pb.DescribeBundleRequest(), metadata=good, timeout=10)
            assert info.bundle_id == BUNDLE.bundle_id
        assert sc.monitor.lookup("forged") is None
        assert sc.metrics.registry.get_sample_value("misalign_steps_ingested_total") in (None, 0.0)
        assert redis_server.client().xlen(FLAGGED_STREAM) == 0
    finally:
        await sc.stop()


async def test_plaintext_ingest_over_tcp_only_on_a_loopback_listener(
    tmp_path: Path, redis_server: RedisProc
) -> None:
    """Bound beyond loopback without TLS, the TCP listener takes no Ingest (the tap uses the
    Unix socket or mTLS); the Unix socket still does."""
    sc = await start(
        Settings(
            grpc_host="0.0.0.0",
            grpc_port=0,
            metrics_port=0,
            redis_url=redis_server.url,
            state_dir=tmp_path / "state",
            unix_socket=tmp_path / "monitor.sock",
        )
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.tcp_port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.MonitorStub(ch).Ingest(iter(()), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with grpc.aio.insecure_channel(f"unix:{sc.settings.unix_socket}") as ch:
            summary = await pb_grpc.MonitorStub(ch).Ingest(iter(()), timeout=10)
            assert summary.steps == 0
        assert refused(sc, "Ingest") == 1
    finally:
        await sc.stop()


async def test_health_answers_in_plaintext_on_its_own_port_while_the_main_port_needs_mtls(
    tmp_path: Path,
    redis_server: RedisProc,
) -> None:
    pki = make_pki(tmp_path / "pki")
    sc = await tls_sidecar(
        tmp_path, redis_server.url, pki, tls_client_ca=pki["ca.pem"], health_port=0
    )
    try:
        assert sc.health_port not in (None, 0, sc.tcp_port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.health_port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", SERVICE_NAME):
                resp = await health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=10
                )
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            # Nothing else is served there: not Ingest, not the client calls.
            for call in (
                pb_grpc.MonitorStub(ch).Ingest(iter(()), timeout=10),
                pb_grpc.MonitorStub(ch).DescribeBundle(pb.DescribeBundleRequest(), timeout=10),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.tcp_port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:  # the main port speaks only TLS
                await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # Shutting down, the probe port says NOT_SERVING first (then closes with the rest).
        await sc.health.enter_graceful_shutdown()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.health_port}") as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
            )
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await sc.stop()
