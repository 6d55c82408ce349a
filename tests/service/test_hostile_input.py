"""Hostile and malformed input, generated (hypothesis): the ingest path, the bundle loader and the
gRPC server each refuse it with their own clear error, change nothing, and keep serving.

How many inputs each property tried is printed at the end of the module (`pytest -s`).
"""

from __future__ import annotations

import pickle
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from detectors import bundle as bundle_io
from detectors.bundle import Bundle, BundleError
from detectors.errors import BadInput
from service.metrics import Metrics
from service.monitor import Monitor
from service.sidecar_process import SidecarProcess, start_sidecar
from tests.support.redis_proc import RedisProc
from wire import monitor_pb2 as pb
from wire.codec import encode_step

BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
K = BUNDLE.k
RAW = bundle_io.default_bundle_path().read_bytes()
TRIED: Counter[str] = Counter()
SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@pytest.fixture(scope="module", autouse=True)
def _count_inputs() -> Iterator[None]:
    yield
    print(f"\nhostile inputs tried: {dict(TRIED)}, {sum(TRIED.values())} in all")


def monitor() -> Monitor:
    return Monitor(BUNDLE, Metrics(BUNDLE), None, max_requests=64, max_tokens=256)


def tokens(m: Monitor) -> float:
    value = m.metrics.registry.get_sample_value(
        "misalign_tokens_ingested_total", {"bundle": BUNDLE.bundle_id}
    )
    return value or 0.0


def ingest_or_refuse(m: Monitor, msg: pb.StepBatch) -> None:
    """Either the batch applies, or it raises BadInput and nothing changed."""
    before = (len(m.store), tokens(m))
    try:
        m.ingest(msg)
    except BadInput as exc:
        assert exc.reason and str(exc)
        assert (len(m.store), tokens(m)) == before
    assert len(m.store) <= 64


# -- the ingest path ------------------------------------------------------------------------

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
u32 = st.integers(0, 2**32 - 1)


@st.composite
def batches(draw: st.DrawFn) -> pb.StepBatch:
    """StepBatches near the valid ones: right or wrong k and bundle id, row counts that agree or
    not, NaN/Inf, huge offsets, roles other than 0/1, duplicate or empty ids."""
    n = draw(st.integers(0, 12))
    k = draw(st.sampled_from([K, K, K, 0, K + 1, 2**32 - 1]))
    rows = n if draw(st.booleans()) else draw(st.integers(0, 14))
    n_proj = rows * k if k < 64 and draw(st.booleans()) else draw(st.integers(0, 40))
    proj = draw(st.lists(floats, min_size=n_proj, max_size=n_proj))
    ids = draw(st.lists(st.sampled_from(["a", "b", "c", "", "d" * 300]), max_size=4))
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=len(ids), max_size=len(ids))))
    consistent = [0, *cuts[:-1], n] if ids else [0]
    offsets = draw(st.one_of(st.just(consistent), st.lists(u32, max_size=6)))
    return pb.StepBatch(
        bundle_id=draw(st.sampled_from([BUNDLE.bundle_id, "", "deadbeef0000", "\x00\xff"])),
        step=draw(st.integers(0, 2**64 - 1)),
        request_ids=ids,
        row_offsets=offsets,
        positions=draw(st.binary(max_size=4 * rows + 3)),
        token_ids=np.array(draw(st.lists(u32, min_size=rows, max_size=rows)), "<u4").tobytes(),
        is_response=draw(st.binary(min_size=rows, max_size=rows)),
        k=k,
        projections=np.array(proj, "<f4").tobytes(),
        finished=[
            pb.FinishedRequest(request_id=r)
            for r in draw(st.lists(st.sampled_from(["a", "b", "zzz"]), max_size=3))
        ],
    )


@SETTINGS
@given(batches())
# Found by this property: a request listed with no rows, sent to an empty store.
@example(pb.StepBatch(bundle_id=BUNDLE.bundle_id, request_ids=["a"], row_offsets=[0, 0], k=K))
def test_malformed_batches_are_refused_whole(msg: pb.StepBatch) -> None:
    TRIED["ingest: structured batches"] += 1
    ingest_or_refuse(monitor(), msg)


@SETTINGS
@given(st.binary(max_size=512))
def test_random_bytes_never_get_past_decoding_unchecked(data: bytes) -> None:
    TRIED["ingest: random bytes"] += 1
    try:
        msg = pb.StepBatch.FromString(data)
    except DecodeError:
        return
    ingest_or_refuse(monitor(), msg)


def valid_batch(seed: int, n_req: int) -> pb.StepBatch:
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n_req):
        m = int(rng.integers(1, 9))
        reqs.append(
            (
                f"r{i}",
                np.arange(m),
                rng.integers(0, 50_000, m),
                (np.arange(m) > 2).astype(np.int8),
                rng.normal(size=(m, K)).astype(np.float32),
            )
        )
    return encode_step(BUNDLE.bundle_id, K, reqs, step=seed)


@SETTINGS
@given(st.integers(0, 2**31), st.integers(1, 6), st.data())
def test_truncated_valid_batches(seed: int, n_req: int, data: st.DataObject) -> None:
    TRIED["ingest: truncated valid batches"] += 1
    raw = valid_batch(seed, n_req).SerializeToString()
    cut = data.draw(st.integers(0, len(raw) - 1))
    try:
        msg = pb.StepBatch.FromString(raw[:cut])
    except DecodeError:
        return
    ingest_or_refuse(monitor(), msg)


@SETTINGS
@given(st.integers(0, 2**31), st.integers(1, 6))
def test_valid_batches_apply(seed: int, n_req: int) -> None:
    """The other side of the properties above: what is well formed is taken, row for row."""
    TRIED["ingest: valid batches"] += 1
    m = monitor()
    msg = valid_batch(seed, n_req)
    m.ingest(msg)
    assert len(m.store) == n_req
    assert tokens(m) == len(msg.is_response)


# -- the bundle loader -----------------------------------------------------------------------


def write(tmp: Path, data: bytes) -> Path:
    p = tmp / "b.safetensors"
    p.write_bytes(data)
    return p


def same_bundle(b: Bundle) -> bool:
    return b.content_hash == BUNDLE.content_hash and np.array_equal(b.directions, BUNDLE.directions)


@SETTINGS
@given(st.binary(max_size=2048))
def test_bundle_loader_random_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    TRIED["bundle: random bytes"] += 1
    with pytest.raises(BundleError, match=r"b\.safetensors"):
        bundle_io.load(write(tmp_path_factory.mktemp("b"), data))


@SETTINGS
@given(st.data())
def test_bundle_loader_truncated_or_tampered(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    TRIED["bundle: truncated or one byte changed"] += 1
    raw = bytearray(RAW)
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255).filter(lambda v, i=i: v != RAW[i]))
    try:
        b = bundle_io.load(write(tmp_path_factory.mktemp("b"), bytes(raw)))
    except BundleError as exc:
        assert "b.safetensors" in str(exc)
        return
    # A change to the header's padding or JSON spacing leaves the same bundle: nothing else may load.
    assert same_bundle(b)


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.marker),))  # type: ignore[attr-defined]


def test_pickled_payload_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = str(marker)  # type: ignore[attr-defined]
    for proto in (2, 4, 5):
        TRIED["bundle: pickles"] += 1
        with pytest.raises(BundleError, match="pickles are never loaded"):
            bundle_io.load(write(tmp_path, pickle.dumps({"directions": payload}, protocol=proto)))
    assert not marker.exists()


@pytest.mark.parametrize("declared", [2**62, 2**40, len(RAW) + 1, 10**9])
def test_huge_declared_header_is_refused_without_reading_it(tmp_path: Path, declared: int) -> None:
    TRIED["bundle: huge declared header"] += 1
    with pytest.raises(BundleError, match="not a safetensors file"):
        bundle_io.load(write(tmp_path, struct.pack("<Q", declared) + RAW[8:]))


@pytest.mark.parametrize(
    ("tensor", "shape"),
    [
        ("directions", (K, 577)),
        ("directions", (K + 1, 576)),
        ("bias", (K + 1,)),
        ("jump_threshold", (1,)),
    ],
)
def test_wrong_shapes_with_a_matching_hash(
    tmp_path: Path, tensor: str, shape: tuple[int, ...]
) -> None:
    """The hash is recomputed over the bad tensors, so only the shape check can catch them."""
    TRIED["bundle: wrong shapes"] += 1
    t = {
        "directions": BUNDLE.directions,
        "bias": BUNDLE.bias,
        "jump_threshold": BUNDLE.jump_threshold,
    }
    t[tensor] = np.ones(shape, np.float32)
    bad = Bundle(BUNDLE.spec, t["directions"], t["bias"], t["jump_threshold"], None)
    meta = dict(_metadata(bundle_io.default_bundle_path()), content_hash=bad.content_hash)
    save_file(t, str(tmp_path / "b.safetensors"), metadata=meta)
    with pytest.raises(BundleError, match=rf"b\.safetensors.*{tensor}"):
        bundle_io.load(tmp_path / "b.safetensors")


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        return dict(fh.metadata())


# -- the gRPC server, with bytes no client library would send -------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    tmp = tmp_path_factory.mktemp("hostile-grpc")
    redis = RedisProc(tmp / "redis", persist=False).start()
    try:
        with start_sidecar(tmp / "sc", "--redis-url", redis.url) as sc:
            yield sc
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def channel(server: SidecarProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@SETTINGS
@given(st.lists(st.binary(max_size=256), min_size=1, max_size=4))
def test_raw_bytes_on_the_ingest_stream(channel: grpc.Channel, messages: list[bytes]) -> None:
    TRIED["grpc: raw Ingest streams"] += 1
    ingest = channel.stream_unary(
        "/misalign.v1.Monitor/Ingest", request_serializer=None, response_deserializer=None
    )
    try:
        ingest(iter(messages), timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())


@SETTINGS
@given(st.binary(max_size=256))
def test_raw_bytes_on_unary_calls(channel: grpc.Channel, data: bytes) -> None:
    TRIED["grpc: raw unary calls"] += 1
    for method, ok in (("Score", ()), ("GetRequestScore", (grpc.StatusCode.NOT_FOUND,))):
        call = channel.unary_unary(
            f"/misalign.v1.Monitor/{method}", request_serializer=None, response_deserializer=None
        )
        try:
            call(data, timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, *ok), (method, exc.code())


def test_the_server_still_serves_after_the_hostile_calls(
    server: SidecarProcess, channel: grpc.Channel
) -> None:
    """Runs after the properties above (file order): same process, still healthy and scoring."""
    assert server.proc.poll() is None
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    from wire import monitor_pb2_grpc as pb_grpc

    msg = valid_batch(1, 1)
    score = pb_grpc.MonitorStub(channel).Score(
        pb.ScoreRequest(
            bundle_id=BUNDLE.bundle_id,
            k=K,
            projections=msg.projections,
            is_response=msg.is_response,
            token_ids=msg.token_ids,
        ),
        timeout=5,
    )
    assert score.tokens == len(msg.is_response)
    from bench.steady_load import labeled, scrape

    errors = scrape(server.metrics_url)
    assert labeled(errors, "misalign_ingest_errors_total", reason="malformed") > 0
