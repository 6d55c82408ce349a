"""The typed client (service/client.py) and the JSON API (service/http_api.py) against a real
sidecar over real sockets (gRPC and HTTP) with a real Redis: long-polled scores that return when
the score lands, the bound on waiters, hostile JSON, and the same auth as the gRPC calls."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from detectors.scoring import score_request, token_scores
from service.client import (
    Busy,
    HttpMonitorClient,
    InvalidArgument,
    MonitorClient,
    ScoreNotFound,
    Unauthenticated,
    Unavailable,
)
from service.server import Sidecar
from tests.support.metrics import metrics_at, sample
from tests.support.pki import make_pki
from tests.support.polling import until
from tests.support.redis_proc import RedisProc
from tests.support.sidecar import (
    BUNDLE,
    K,
    make_sidecar,
    send,
    stream_requests,
    stub,
    synthetic_requests,
    tls_sidecar,
)

TOKEN = "a-token-of-sixteen-chars-or-more"


@pytest.fixture
async def sidecar(tmp_path: Path, redis_server: RedisProc) -> AsyncIterator[Sidecar]:
    sc = await make_sidecar(tmp_path, redis_server.url, http_port=0, score_waiters_max=4)
    yield sc
    await sc.stop()


def grpc_client(sc: Sidecar, **kw: object) -> MonitorClient:
    return MonitorClient(f"127.0.0.1:{sc.tcp_port}", **kw)  # type: ignore[arg-type]


def http_client(sc: Sidecar, **kw: object) -> HttpMonitorClient:
    return HttpMonitorClient(f"http://127.0.0.1:{sc.http_port}", **kw)  # type: ignore[arg-type]


async def call(fn, *args, **kw):  # type: ignore[no-untyped-def]
    """A blocking client call off the event loop, which the in-process sidecar runs on."""
    return await asyncio.to_thread(fn, *args, **kw)


def waits(sc: Sidecar, outcome: str) -> float:
    return sample(
        metrics_at(sc.metrics_port), "misalign_score_waits_total", missing_ok=True, outcome=outcome
    )


def batches_of(reqs, client_prefix: str = "client-"):  # type: ignore[no-untyped-def]
    out = list(stream_requests(BUNDLE.bundle_id, K, reqs))
    for b in out:
        for f in b.finished:
            f.client_request_id = client_prefix + f.request_id
    return out


async def test_get_score_waits_on_the_server_and_returns_when_the_score_lands(
    sidecar: Sidecar,
) -> None:
    """Three callers (gRPC by the client id, gRPC by the tap's id, HTTP by the bare X-Request-Id
    under vLLM's "chatcmpl-" prefix) ask before the request exists; each makes one call that
    is parked on the server until the stream finishes the request, and gets its score."""
    (req,) = synthetic_requests(1, seed=3)
    rid = req[0]
    mc, hc = grpc_client(sidecar), http_client(sidecar)
    t0 = time.monotonic()
    asks = [
        asyncio.create_task(asyncio.to_thread(mc.get_score, f"chatcmpl-{rid}", 20.0)),
        asyncio.create_task(asyncio.to_thread(mc.get_score, rid, 20.0)),
        asyncio.create_task(asyncio.to_thread(hc.get_score, rid, 20.0)),
    ]
    assert sidecar.waiters is not None
    # All three parked: one call each, answered by nothing so far.
    await until(lambda: len(sidecar.waiters) == 3, 10, "len(sidecar.waiters) == 3")  # type: ignore[arg-type]
    assert not any(t.done() for t in asks)
    ch, s = stub(sidecar)
    await send(s, batches_of([req], client_prefix="chatcmpl-"))
    got = await asyncio.wait_for(asyncio.gather(*asks), 10)
    elapsed = time.monotonic() - t0
    want = score_request(BUNDLE, token_scores(BUNDLE, req[4]), req[3])
    for g in got:
        assert g.request_id == rid and g.client_request_id == f"chatcmpl-{rid}"
        assert g.tokens == len(req[3]) and g.bundle_id == BUNDLE.bundle_id
        for f, w in zip(g.features, want, strict=True):
            assert f.name == w.name and f.score == pytest.approx(w.score, rel=1e-5, abs=1e-6)
    assert got[0] == got[1] == got[2]
    assert elapsed < 15  # well inside the 20 s wait: woken by the score, not by the timeout
    assert waits(sidecar, "scored") == 3 and waits(sidecar, "timeout") == 0
    assert len(sidecar.waiters) == 0 and sidecar.waiters.keys_held == 0
    assert sample(metrics_at(sidecar.metrics_port), "misalign_score_waiters") == 0
    # A score already there is answered at once, waiting or not, and counts no wait.
    assert await call(mc.get_score, rid, wait=5) == got[0] == await call(hc.get_score, rid)
    assert waits(sidecar, "scored") == 3
    mc.close()
    await ch.close()


async def test_an_id_never_scored_is_not_found_after_the_wait_and_leaves_nothing_behind(
    sidecar: Sidecar,
) -> None:
    mc, hc = grpc_client(sidecar), http_client(sidecar)
    t0 = time.monotonic()
    with pytest.raises(
        ScoreNotFound, match=r"NOT_FOUND: request_id 'never': not scored within 0.3 s"
    ):
        await call(mc.get_score, "never", wait=0.3)
    assert time.monotonic() - t0 >= 0.3
    with pytest.raises(ScoreNotFound, match="HTTP 404: request_id 'never/seen'"):
        await call(hc.get_score, "never/seen", wait=0.2)  # a '/' in the id survives the path
    with pytest.raises(ScoreNotFound, match="not scored \\("):
        await call(mc.get_score, "never")  # no wait: at once
    # Many distinct ids asked for at once, none ever scored: every entry goes with its waiter.
    many = [asyncio.to_thread(mc.get_score, f"junk-{i}", 0.3) for i in range(4)]
    results = await asyncio.gather(*many, return_exceptions=True)
    assert all(isinstance(r, ScoreNotFound) for r in results), results
    assert sidecar.waiters is not None
    assert len(sidecar.waiters) == 0 and sidecar.waiters.keys_held == 0
    assert waits(sidecar, "timeout") == 6
    mc.close()


async def test_waiters_are_bounded_and_a_wait_beyond_the_maximum_is_refused(
    tmp_path: Path, redis_server: RedisProc
) -> None:
    sc = await make_sidecar(
        tmp_path, redis_server.url, http_port=0, score_waiters_max=2, score_wait_max_s=5
    )
    try:
        assert sc.waiters is not None
        (req,) = synthetic_requests(1, seed=4)
        mc, hc = grpc_client(sc), http_client(sc)
        parked = [asyncio.create_task(asyncio.to_thread(mc.get_score, req[0], 5.0)) for _ in "ab"]
        await until(lambda: len(sc.waiters) == 2, 10, "len(sc.waiters) == 2")  # type: ignore[arg-type]
        with pytest.raises(Busy, match="RESOURCE_EXHAUSTED: 2 callers wait"):
            await call(mc.get_score, "other", wait=1)
        with pytest.raises(Busy, match="HTTP 429"):
            await call(hc.get_score, "other", wait=1)
        # A lookup without a wait is never refused.
        with pytest.raises(ScoreNotFound):
            await call(mc.get_score, "other")
        assert waits(sc, "refused") == 2
        text = metrics_at(sc.metrics_port)
        for rpc in ("GetRequestScore",):
            assert sample(text, "misalign_ingest_errors_total", rpc=rpc, reason="waiters_full") == 2
        ch, s = stub(sc)
        await send(s, batches_of([req]))
        got = await asyncio.wait_for(asyncio.gather(*parked), 10)
        assert got[0].request_id == req[0]
        for bad, field in (
            (6.0, "wait_s: 6 s is more than score_wait_max_s \\(5 s\\)"),
            (-1.0, "wait_s: -1.0; expected seconds >= 0"),
            (float("nan"), "wait_s: nan"),
        ):
            with pytest.raises(InvalidArgument, match=f"INVALID_ARGUMENT: {field}"):
                await call(mc.get_score, req[0], wait=bad)
            with pytest.raises(InvalidArgument, match=f"HTTP 400: {field}"):
                await call(hc.get_score, req[0], wait=bad)
        with pytest.raises(InvalidArgument, match="request_id: empty"):
            await call(mc.get_score, "")
        with pytest.raises(InvalidArgument, match="request_id: 2000 characters, at most 1024"):
            await call(mc.get_score, "x" * 2000, wait=1)
        mc.close()
        await ch.close()
    finally:
        await sc.stop()


async def test_a_waiter_is_answered_unavailable_when_the_sidecar_stops(
    tmp_path: Path, redis_server: RedisProc
) -> None:
    sc = await make_sidecar(tmp_path, redis_server.url, http_port=0)
    assert sc.waiters is not None
    mc, hc = grpc_client(sc), http_client(sc)
    asks = [
        asyncio.create_task(asyncio.to_thread(mc.get_score, "pending", 30.0)),
        asyncio.create_task(asyncio.to_thread(hc.get_score, "pending", 30.0)),
    ]
    await until(lambda: len(sc.waiters) == 2, 10, "len(sc.waiters) == 2")  # type: ignore[arg-type]
    t0 = time.monotonic()
    await sc.stop()
    results = await asyncio.wait_for(asyncio.gather(*asks, return_exceptions=True), 10)
    assert time.monotonic() - t0 < 10  # the 30 s waits did not hold the shutdown up
    assert all(isinstance(r, Unavailable) for r in results), results
    assert "shutting down" in str(results[0])
    mc.close()


async def test_describe_and_score_agree_over_grpc_http_and_offline(sidecar: Sidecar) -> None:
    mc, hc = grpc_client(sidecar), http_client(sidecar)
    info = await call(mc.describe_bundle)
    assert info == await call(hc.describe_bundle)
    assert info.bundle_id == BUNDLE.bundle_id and info.k == K
    assert [f.name for f in info.features] == BUNDLE.feature_names
    calibrated = {f.name for f in BUNDLE.spec.features if f.calibration is not None}
    assert {f.name for f in info.features if f.threshold is not None} == calibrated
    rng = np.random.default_rng(7)
    proj = (rng.normal(scale=0.3, size=(20, K)) - BUNDLE.bias).astype(np.float32)
    proj[:, 0] += 10.0  # flagged
    roles = [0] * 6 + [1] * 14
    g = await call(mc.score, proj, roles, model="m", model_version="v1")
    h = await call(hc.score, proj, roles, model="m", model_version="v1")
    want = score_request(BUNDLE, token_scores(BUNDLE, proj), np.asarray(roles, np.int8))
    assert g.flagged and h.flagged and g.tokens == h.tokens == 20
    for a, b, w in zip(g.features, h.features, want, strict=True):
        assert a.name == b.name == w.name
        assert a.score == pytest.approx(w.score, rel=1e-5) and b.score == pytest.approx(
            w.score, rel=1e-5
        )
        assert a.flagged == b.flagged == w.flagged
    with pytest.raises(InvalidArgument, match="is not the loaded bundle"):
        await call(mc.score, proj, roles, bundle_id="000000000000")
    with pytest.raises(InvalidArgument, match="HTTP 400: bundle_id '000000000000' is not"):
        await call(hc.score, proj, roles, bundle_id="000000000000")
    mc.close()


async def post(sc: Sidecar, path: str, data: bytes, ctype: str = "application/json", **kw: object):  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{sc.http_port}{path}"
        async with session.post(url, data=data, headers={"Content-Type": ctype}, **kw) as r:  # type: ignore[arg-type]
            return r.status, await r.json()


async def get(sc: Sidecar, path: str, method: str = "GET"):  # type: ignore[no-untyped-def]
    url = f"http://127.0.0.1:{sc.http_port}{path}"
    async with aiohttp.ClientSession() as session, session.request(method, url) as r:
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{", 400, "body: not JSON"),
        (
            b"[" * 50_000 + b"]" * 50_000,
            400,
            "body: not JSON",
        ),  # nesting deeper than Python's stack
        (b"[1, 2]", 400, "body: Input should be a valid dictionary"),
        (
            b'{"projections": [[NaN, 0, 0]], "is_response": [1]}',
            400,
            "projections.0.0: Input should be a finite number",
        ),
        (
            b'{"projections": [[Infinity, 0, 0]], "is_response": [1]}',
            400,
            "projections.0.0: Input should be a finite number",
        ),
        (b'{"projections": [[1e39, 0, 0]], "is_response": [1]}', 400, "beyond"),
        (
            b'{"projections": "abc", "is_response": [1]}',
            400,
            "projections: Input should be a valid list",
        ),
        (
            b'{"projections": [["1", 0, 0]], "is_response": [1]}',
            400,
            "projections.0.0: Input should be a valid number",
        ),
        (
            b'{"projections": [[0, 0]], "is_response": [1]}',
            400,
            "projections[0]: 2 values, expected k = 3",
        ),
        (
            b'{"projections": [], "is_response": []}',
            400,
            "projections: List should have at least 1 item",
        ),
        (
            b'{"projections": [[0, 0, 0]], "is_response": [2]}',
            400,
            "is_response.0: Input should be less than or equal to 1",
        ),
        (
            b'{"projections": [[0, 0, 0]], "is_response": [true]}',
            400,
            "is_response.0: Input should be a valid integer",
        ),
        (
            b'{"projections": [[0, 0, 0]], "is_response": [1, 0]}',
            400,
            "is_response: 2 rows, projections has 1",
        ),
        (
            b'{"projections": [[0, 0, 0]], "is_response": [1], "token_ids": [-1]}',
            400,
            "token_ids.0: Input should be greater than or equal to 0",
        ),
        (
            b'{"projections": [[0, 0, 0]], "is_response": [1], "extra": 1}',
            400,
            "extra: Extra inputs are not permitted",
        ),
        (b'{"is_response": [1]}', 400, "projections: Field required"),
        (
            b'{"projections": [[0, 0, 0]], "is_response": [1], "model": 5}',
            400,
            "model: Input should be a valid string",
        ),
    ],
)
async def test_hostile_score_bodies_get_400_naming_the_field(
    sidecar: Sidecar, body: bytes, status: int, message: str
) -> None:
    assert K == 3  # the messages above are for the shipped bundle's width
    got_status, got = await post(sidecar, "/v1/score", body)
    assert got_status == status, got
    assert got["error"]["status"] == status and message in got["error"]["message"], got
    text = metrics_at(sidecar.metrics_port)
    assert (
        sample(text, "misalign_ingest_errors_total", rpc="Score", reason=got["error"]["reason"])
        == 1
    )


async def test_http_limits_paths_methods_and_queries(
    tmp_path: Path, redis_server: RedisProc
) -> None:
    sc = await make_sidecar(tmp_path, redis_server.url, http_port=0, http_max_body_bytes=4096)
    try:
        huge = json.dumps({"projections": [[0.5, 0.5, 0.5]] * 1000, "is_response": [1] * 1000})
        status, got = await post(sc, "/v1/score", huge.encode())
        assert status == 413 and "body:" in got["error"]["message"], got
        status, got = await post(sc, "/v1/score", b"{}", ctype="text/plain")
        assert status == 415 and "expected application/json" in got["error"]["message"]
        for path, code, message in (
            ("/v1/scores/x?wait_s=abc", 400, "wait_s: 'abc' is not a number of seconds"),
            ("/v1/scores/x?wait=1", 400, "query: unknown parameter 'wait'; only wait_s"),
            ("/v1/scores/x?wait_s=inf", 400, "wait_s: inf"),
            ("/v1/nothing", 404, "GET /v1/nothing: Not Found"),
        ):
            status, got = await get(sc, path)
            assert status == code and message in got["error"]["message"], (path, got)
        status, got = await get(sc, "/v1/bundle", method="DELETE")
        assert status == 405 and "DELETE /v1/bundle" in got["error"]["message"]
    finally:
        await sc.stop()


async def test_the_api_token_guards_grpc_and_http_client_calls(
    tmp_path: Path, redis_server: RedisProc
) -> None:
    sc = await make_sidecar(tmp_path, redis_server.url, http_port=0, api_token=TOKEN)
    try:
        for client in (grpc_client(sc), http_client(sc)):
            with pytest.raises(Unauthenticated, match="Bearer <api_token>"):
                await call(client.describe_bundle)
        for client in (
            grpc_client(sc, token="wrong-token-wrong-token"),
            http_client(sc, token="x"),
        ):
            with pytest.raises(Unauthenticated):
                await call(client.get_score, "anything", wait=1)
        for client in (grpc_client(sc, token=TOKEN), http_client(sc, token=TOKEN)):
            assert (await call(client.describe_bundle)).bundle_id == BUNDLE.bundle_id
            with pytest.raises(ScoreNotFound):
                await call(client.get_score, "anything")
        text = metrics_at(sc.metrics_port)
        # gRPC and HTTP refusals under the rpc's name
        for rpc in ("DescribeBundle", "GetRequestScore"):
            assert (
                sample(text, "misalign_ingest_errors_total", rpc=rpc, reason="unauthenticated") == 2
            )
    finally:
        await sc.stop()


async def test_https_with_a_client_certificate_needs_no_token(
    tmp_path: Path, redis_server: RedisProc
) -> None:
    pki = make_pki(tmp_path / "pki")
    sc = await tls_sidecar(
        tmp_path, redis_server.url, pki, http_port=0, tls_client_ca=pki["ca.pem"], api_token=TOKEN
    )
    try:
        url = f"https://localhost:{sc.http_port}"
        ctx = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        # No client certificate: the handshake fails (tls_client_ca requires one).
        with pytest.raises(Unavailable):
            await call(HttpMonitorClient(url, ssl_context=ctx, token=TOKEN).describe_bundle)
        ctx.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
        info = await call(HttpMonitorClient(url, ssl_context=ctx).describe_bundle)
        assert info.bundle_id == BUNDLE.bundle_id
        # The gRPC client with the same certificate over mTLS.
        mc = MonitorClient(
            f"localhost:{sc.tcp_port}",
            root_certificates=pki["ca.pem"].read_bytes(),
            certificate_chain=pki["client.pem"].read_bytes(),
            private_key=pki["client.key"].read_bytes(),
        )
        assert await call(mc.describe_bundle) == info
        mc.close()
    finally:
        await sc.stop()


async def test_json_api_is_off_by_default_and_a_taken_port_is_a_settings_error(
    tmp_path: Path, redis_server: RedisProc
) -> None:
    from service.settings import Settings, SettingsError

    sc = await make_sidecar(tmp_path, redis_server.url)
    try:
        assert sc.http_port is None and sc.http is None
        with pytest.raises(SettingsError, match="setting 'http_port': cannot listen"):
            await make_sidecar(tmp_path / "b", redis_server.url, http_port=sc.metrics_port)
    finally:
        await sc.stop()
    with pytest.raises(ValueError, match="http_port 9000 is also metrics_port"):
        Settings(http_port=9000, metrics_port=9000, state_dir=tmp_path)
    with pytest.raises(ValueError, match=r"api_token on a plaintext listener on 0\.0\.0\.0"):
        Settings(
            grpc_port=None,
            unix_socket=tmp_path / "s",
            http_port=9001,
            grpc_host="0.0.0.0",
            api_token=TOKEN,
        )
