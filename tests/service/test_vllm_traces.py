"""A chat completion sent to vLLM's OpenAI server with a W3C ``traceparent`` ends, through the
tap and a real sidecar, in a score span of that trace at an OTLP receiver (slow: one vLLM).

vLLM 0.32 keeps a request's trace headers only when started with ``--otlp-traces-endpoint``
(``AsyncLLM.add_request`` drops them otherwise), so it is started so, exporting its own
``llm_request`` span to the same receiver: both spans are children of the caller's span.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.steady_load import scrape
from detectors import bundle as bundle_io
from detectors.transcripts import DEMO_CONVERSATIONS
from service import vllm_server
from service.processes import stop_process
from service.sidecar_process import start_sidecar
from tests.support.otlp_receiver import otlp_trace_receiver
from tests.support.polling import wait_until
from tests.support.redis_proc import RedisProc
from tests.support.vllm_runs import BUNDLE

pytestmark = pytest.mark.slow
FEATURES = bundle_io.load(BUNDLE).feature_names
TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


def test_a_chat_completions_traceparent_reaches_the_score_span_and_the_flagged_sample(
    tmp_path: Path, smollm2_dir: Path, request: pytest.FixtureRequest
) -> None:
    redis = RedisProc(tmp_path / "redis", persist=False).start()
    request.addfinalizer(redis.stop)
    convs = [json.loads(x) for x in DEMO_CONVERSATIONS.read_text().splitlines()]
    port = vllm_server.free_port()
    with (
        otlp_trace_receiver() as (receiver, otlp_port),
        start_sidecar(
            tmp_path / "sc",
            "--redis-url",
            redis.url,
            env={"MISALIGN_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}"},
        ) as sc,
        open(tmp_path / "vllm.log", "wb") as log,
    ):
        proc = vllm_server.start(
            smollm2_dir,
            port,
            log,
            bundle=BUNDLE,
            sidecar=sc.address,
            extra_args=["--otlp-traces-endpoint", f"http://127.0.0.1:{otlp_port}"],
            env_overrides={"OTEL_BSP_SCHEDULE_DELAY": "200"},
            log_stats=True,  # vLLM's tracing reads the request stats (an assert without them)
        )
        try:
            vllm_server.wait_ready(port, proc)
            traced = {"traceparent": f"00-{TRACE}-{SPAN}-01"}
            hostile = {"traceparent": f"00-{TRACE.upper()}-{SPAN}-01"}
            for name, headers in (("traced", traced), ("hostile", hostile)):
                # every demo conversation, so that one is flagged and the sample is checked too
                for i, conv in enumerate(convs):
                    vllm_server.chat(
                        port, conv["messages"][:-1], f"{name}-{i}", 24, headers=headers
                    )
            ours = lambda: [s for s in receiver.named("misalign.score") if s.trace_id == TRACE]  # noqa: E731
            theirs = lambda: [s for s in receiver.named("llm_request") if s.trace_id == TRACE]  # noqa: E731
            wait_until(
                lambda: len(ours()) == len(convs) and len(theirs()) == len(convs),
                60,
                "the score spans and vLLM's own spans",
            )
            # the hostile finishes are not in any span: wait for the sidecar to have read them all
            refused = 'misalign_trace_contexts_total{outcome="refused_at_tap"}'
            wait_until(
                lambda: scrape(sc.metrics_url).get(refused, 0) >= len(convs),
                60,
                "the hostile requests' finishes at the sidecar",
            )
            m = scrape(sc.metrics_url)
        finally:
            stop_process(proc, 60)
    spans = ours()
    assert {s.parent_span_id for s in spans} == {SPAN}
    assert {s.parent_span_id for s in theirs()} == {SPAN}  # vLLM's own span: the same parent
    ids = {s.attributes["misalign.client_request_id"] for s in spans}
    assert all(i.startswith("chatcmpl-traced-") for i in ids), ids  # the hostile ones: none
    assert all(f"misalign.score.{n}" in s.attributes for s in spans for n in FEATURES)
    assert m['misalign_trace_contexts_total{outcome="valid"}'] == len(convs)
    assert m[refused] == len(convs)
    # SmolLM2's 24-token answers to the demo prompts are rarely flagged (none were in the runs
    # here): the flagged sample's trace id is checked for as many as the spans say were, and
    # with flagged traffic in tests/service/test_traces.py.
    flagged = [s for s in spans if s.attributes["misalign.flagged"]]
    wait_until(lambda: redis.client().xlen("misalign:{flagged}") >= len(flagged), 20, "samples")
    samples = [f for _, f in redis.client().xrange("misalign:{flagged}")]
    traced_samples = [f for f in samples if f["client_request_id"].startswith("chatcmpl-traced-")]
    assert len(traced_samples) == len(flagged)
    assert all(f["trace_id"] == TRACE for f in traced_samples)
    assert all("trace_id" not in f for f in samples if "hostile" in f["client_request_id"])
