"""Trace context: the W3C traceparent a request came with reaches its flagged sample, and a score
span, child of the caller's span, reaches an OTLP collector (a real OTLP/gRPC receiver in the
test, tests/support/otlp_receiver.py) from a real sidecar process fed over its gRPC socket."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.steady_load import scrape
from detectors import bundle as bundle_io
from review.store import parse_sample, parse_summary
from service.settings import SettingsError, load_settings
from service.sidecar_process import start_sidecar
from service.vllm_server import free_port
from tests.support.otlp_receiver import otlp_trace_receiver
from tests.support.polling import wait_until
from tests.support.redis_proc import RedisProc
from wire import monitor_pb2 as pb
from wire import monitor_pb2_grpc as pb_grpc
from wire import trace_context
from wire.codec import encode_step
from wire.trace_context import BadTraceParent, parse

BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
GOOD = f"00-{TRACE}-{SPAN}-01"


# -- the header itself --------------------------------------------------------------------------


def test_a_valid_traceparent_parses_and_normalises() -> None:
    tp = parse(GOOD)
    assert (tp.trace_id_hex, f"{tp.span_id:016x}", tp.sampled) == (TRACE, SPAN, True)
    assert tp.header() == GOOD
    assert not parse(f"00-{TRACE}-{SPAN}-00").sampled
    # A later version may carry more fields: the first four are read, version 00 is sent on.
    assert parse(f"01-{TRACE}-{SPAN}-01-what-comes-next").header() == GOOD
    assert parse(f" {GOOD}\t").header() == GOOD  # whitespace around a header value


HOSTILE = {
    "upper case": (f"00-{TRACE.upper()}-{SPAN}-01", "malformed"),
    "short trace id": (f"00-{TRACE[:-1]}-{SPAN}-01", "malformed"),
    "zero trace id": (f"00-{'0' * 32}-{SPAN}-01", "malformed"),
    "zero span id": (f"00-{TRACE}-{'0' * 16}-01", "malformed"),
    "version ff": (f"ff-{TRACE}-{SPAN}-01", "malformed"),
    "00 with a tail": (f"{GOOD}-extra", "malformed"),
    "later version, no dash": (f"01-{TRACE}-{SPAN}-01x", "malformed"),
    "newline injection": (f"{GOOD}\nx-admin: 1", "malformed"),
    "not hex": (f"00-{'g' * 32}-{SPAN}-01", "malformed"),
    "unicode digits": (f"00-{'٣' * 32}-{SPAN}-01", "malformed"),
    "empty fields": ("00---", "malformed"),
    "too long": ("00-" + "a" * 600, "too_long"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_traceparent_is_refused_with_a_reason_and_never_forwarded(name: str) -> None:
    value, reason = HOSTILE[name]
    with pytest.raises(BadTraceParent) as exc:
        parse(value)
    assert exc.value.reason == reason
    assert len(str(exc.value)) < 200  # the message quotes at most a short prefix
    assert trace_context.normalise(value) == trace_context.REFUSED
    assert trace_context.normalise(None) == trace_context.normalise("") == ""


def test_the_tap_sends_only_the_normalised_header_or_refused(recorder) -> None:  # type: ignore[no-untyped-def]
    from tap.publisher import Publisher
    from tap.settings import TapSettings

    rec, addr = recorder
    pub = Publisher(TapSettings(bundle=bundle_io.default_bundle_path(), sidecar=addr), BUNDLE, "m")
    pub.finish("a-0123abcd", "FINISHED_STOPPED", traceparent=f"01-{TRACE}-{SPAN}-01-x")
    pub.finish("b-0123abcd", "FINISHED_STOPPED", traceparent=f"00-{TRACE}-{SPAN}-01\r\nevil: 1")
    pub.finish("c-0123abcd", "FINISHED_STOPPED", None)
    wait_until(lambda: sum(len(b.finished) for b in rec.batches) == 3, 20, "three finishes")
    got = {f.client_request_id: f.traceparent for b in rec.batches for f in b.finished}
    assert got == {"a": GOOD, "b": trace_context.REFUSED, "c": ""}
    assert pub.traceparents_refused == 1


def test_the_runner_hook_reads_the_scheduler_requests_trace_headers() -> None:
    from tap.runner_hook import traceparent_of

    class Req:  # the attribute vLLM's scheduler Request has (vllm.v1.request.Request)
        def __init__(self, headers: object) -> None:
            self.trace_headers = headers

    assert traceparent_of(Req({"traceparent": GOOD, "tracestate": "a=b"})) == GOOD
    assert traceparent_of(Req(None)) is None
    assert traceparent_of(Req({"traceparent": 5})) is None
    assert traceparent_of(object()) is None


def test_vllm_request_keeps_trace_headers_where_the_tap_reads_them() -> None:
    """vLLM 0.32's own scheduler Request, built as the engine builds it, holds the headers."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    from tap.runner_hook import traceparent_of

    req = Request(
        "r-1",
        prompt_token_ids=[1, 2, 3],
        sampling_params=SamplingParams(max_tokens=1),
        pooling_params=None,
        trace_headers={"traceparent": GOOD},
    )
    assert traceparent_of(req) == GOOD


def test_otlp_settings_are_checked() -> None:
    assert load_settings().otlp_endpoint is None  # off by default
    assert load_settings(otlp_endpoint="http://127.0.0.1:4317").otlp_endpoint
    for bad in ("127.0.0.1:4317", "grpc://c:4317", "http://c:4317/v1/traces", "http://"):
        with pytest.raises(SettingsError, match="otlp_endpoint"):
            load_settings(otlp_endpoint=bad)
    with pytest.raises(SettingsError, match="otlp_tls_ca"):
        load_settings(otlp_endpoint="https://c:4317", otlp_tls_ca="/no/such/ca.pem")


def test_review_shows_a_trace_id_only_when_it_is_one() -> None:
    fields = {"request_id": "r", "features": "[]", "trace_id": TRACE}
    assert parse_summary("1-0", fields).trace_id == TRACE
    assert parse_sample("1-0", fields).trace_id == TRACE
    for bad in ("<script>", TRACE.upper(), TRACE + "0"):
        assert parse_sample("1-0", {**fields, "trace_id": bad}).trace_id == ""


# -- a real sidecar, a real OTLP receiver ---------------------------------------------------------


def _request(rid: str, flagged: bool) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows whose scores sit at each feature's benign baseline; flagged: feature 0 well above
    its threshold in the response."""
    n_prompt, n = 6, 18
    base = np.array(
        [f.calibration.baseline_mean if f.calibration else 0.0 for f in BUNDLE.spec.features]
    )
    scores = np.tile(base, (n, 1))
    if flagged:
        c0 = BUNDLE.spec.features[0].calibration
        assert c0 is not None
        scores[n_prompt:, 0] = c0.threshold + 5.0
    roles = (np.arange(n) >= n_prompt).astype(np.int8)
    proj = (scores - BUNDLE.bias).astype(np.float32)
    return rid, np.arange(n), np.arange(10, 10 + n), roles, proj


def _send(address: str, requests: list[tuple[str, bool, str]]) -> None:
    rows = [_request(rid, flagged) for rid, flagged, _ in requests]
    fins = [
        pb.FinishedRequest(
            request_id=rid,
            client_request_id=f"c-{rid}",
            model="m",
            model_version="v7",
            traceparent=tp,
        )
        for rid, _, tp in requests
    ]
    with grpc.insecure_channel(address) as ch:
        pb_grpc.MonitorStub(ch).Ingest(
            iter(
                [
                    encode_step(BUNDLE.bundle_id, BUNDLE.k, rows, step=0),
                    encode_step(BUNDLE.bundle_id, BUNDLE.k, [], step=1, finished=fins),
                ]
            ),
            timeout=20,
        )


def _tp(i: int, flags: str = "01") -> tuple[str, str, str]:
    trace, span = f"{i + 1:032x}", f"{i + 0xABC:016x}"
    return trace, span, f"00-{trace}-{span}-{flags}"


def test_a_real_sidecar_exports_a_score_span_child_of_the_requests_span(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    redis = RedisProc(tmp_path / "redis", persist=False).start()
    request.addfinalizer(redis.stop)
    (ta, sa, tpa), (tb, sb, tpb), (tc, _, tpc) = _tp(1), _tp(2), _tp(3, "00")
    traffic = [
        ("flagged", True, tpa),
        ("ordinary", False, tpb),
        ("unsampled", True, tpc),  # the caller did not sample: no span, the sample has the id
        ("refused", True, trace_context.REFUSED),
        ("hostile", True, f"00-{TRACE.upper()}-{SPAN}-01"),  # a client sends what it likes
        ("long", True, "x" * 5000),
        ("untraced", False, ""),
    ]
    with (
        otlp_trace_receiver() as (receiver, port),
        start_sidecar(
            tmp_path / "sc",
            "--redis-url",
            redis.url,
            env={
                "MISALIGN_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "MISALIGN_OTLP_SERVICE_NAME": "sidecar-under-test",
            },
        ) as sc,
    ):
        t0 = time.time_ns()
        _send(sc.address, traffic)
        wait_until(lambda: len(receiver.named("misalign.score")) >= 2, 30, "two spans")
        wait_until(lambda: redis.client().xlen("misalign:{flagged}") == 5, 20, "five samples")
        m = scrape(sc.metrics_url)
        # the sidecar's own shutdown sends what is left: nothing more is expected
    spans = {
        s.attributes["misalign.client_request_id"]: s for s in receiver.named("misalign.score")
    }
    assert set(spans) == {"c-flagged", "c-ordinary"}
    a, b = spans["c-flagged"], spans["c-ordinary"]
    assert (a.trace_id, a.parent_span_id) == (ta, sa)
    assert (b.trace_id, b.parent_span_id) == (tb, sb)
    assert a.span_id not in (sa, sb) and a.service == "sidecar-under-test"
    assert t0 <= a.start_ns <= a.end_ns <= time.time_ns()
    names = BUNDLE.feature_names
    assert a.attributes["misalign.flagged"] is True and b.attributes["misalign.flagged"] is False
    assert (
        a.attributes[f"misalign.score.{names[0]}"] > BUNDLE.spec.features[0].calibration.threshold
    )
    for s in (a, b):
        assert {f"misalign.score.{n}" for n in names} <= set(s.attributes)
        assert s.attributes["misalign.bundle_id"] == BUNDLE.bundle_id
        assert s.attributes["misalign.model_version"] == "v7"
        assert s.attributes["misalign.model"] == "m"
    assert a.events == [("misalign.flagged", {"misalign.features": [names[0]]})]
    assert b.events == []

    samples = {f["client_request_id"]: f for _, f in redis.client().xrange("misalign:{flagged}")}
    assert set(samples) == {"c-flagged", "c-unsampled", "c-refused", "c-hostile", "c-long"}
    assert (samples["c-flagged"]["trace_id"], samples["c-flagged"]["traceparent"]) == (ta, tpa)
    assert samples["c-unsampled"]["trace_id"] == tc
    for rid in ("c-refused", "c-hostile", "c-long"):
        assert "trace_id" not in samples[rid] and "traceparent" not in samples[rid]
    flat = json.dumps(samples)
    assert TRACE.upper() not in flat and "xxxxx" not in flat  # hostile values never stored

    def count(outcome: str, family: str = "misalign_trace_contexts_total") -> float:
        return m.get(f'{family}{{outcome="{outcome}"}}', 0.0)

    assert [count(o) for o in ("valid", "none", "refused_at_tap", "malformed", "too_long")] == [
        3,
        1,
        1,
        1,
        1,
    ]
    assert count("not_sampled", "misalign_trace_spans_total") == 1


def test_a_collector_that_is_down_never_holds_up_scoring(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Nothing listens at the endpoint: each export retries for otlp_timeout_s on the export
    thread, spans past the queue are dropped and counted, failed exports counted; every request
    is scored meanwhile."""
    redis = RedisProc(tmp_path / "redis", persist=False).start()
    request.addfinalizer(redis.stop)
    port = free_port()
    with (
        start_sidecar(
            tmp_path / "sc",
            "--redis-url",
            redis.url,
            env={
                "MISALIGN_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "MISALIGN_OTLP_QUEUE_SIZE": "4",
                "MISALIGN_OTLP_TIMEOUT_S": "1",
            },
        ) as sc,
    ):
        t0 = time.monotonic()
        for j in range(10):
            _send(sc.address, [(f"r{j}-{i}", False, _tp(j * 10 + i)[2]) for i in range(10)])
        with grpc.insecure_channel(sc.address) as ch:
            stub = pb_grpc.MonitorStub(ch)
            for j in range(10):
                assert stub.GetRequestScore(pb.GetRequestScoreRequest(request_id=f"c-r{j}-9"))
        took = time.monotonic() - t0
        wait_until(
            lambda: (
                scrape(sc.metrics_url).get('misalign_trace_spans_total{outcome="export_failed"}', 0)
                >= 1
            ),
            30,
            "a refused export counted",
        )
        m = scrape(sc.metrics_url)
    dropped = m.get('misalign_trace_spans_total{outcome="dropped_queue_full"}', 0)
    failed = m['misalign_trace_spans_total{outcome="export_failed"}']
    assert dropped >= 1, m
    assert m['misalign_trace_contexts_total{outcome="valid"}'] == 100
    assert m.get('misalign_trace_spans_total{outcome="exported"}', 0) == 0
    assert dropped + failed <= 100
    assert took < 20, took  # 100 requests over 10 streams; a blocked exporter would take minutes
