"""The inference server keeps serving, with unchanged output, whatever the sidecar does (slow).

One real vLLM OpenAI-compatible server with the tap; the sidecar is absent at start, then comes
up, is stalled with SIGSTOP, killed with SIGKILL mid-run, and comes back. Greedy answers must be
the same in every phase; drops are counted by the tap and reported once the sidecar is back.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pytest

from detectors import bundle as bundle_io
from detectors.transcripts import DEMO_CONVERSATIONS
from service import vllm_server
from service.processes import stop_process
from service.sidecar_process import SidecarProcess, start_sidecar
from tests.support.metrics import metric
from tests.support.polling import wait_until
from tests.support.redis_proc import RedisProc

pytestmark = pytest.mark.slow
BUNDLE = bundle_io.default_bundle_path()


def test_vllm_serves_through_sidecar_absence_stall_and_kill(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    rows = [json.loads(x) for x in DEMO_CONVERSATIONS.read_text().splitlines()]
    prompts = [r["messages"][:-1] for r in rows[:4]]
    grpc_port, api_port = vllm_server.free_port(), vllm_server.free_port()
    redis_server = RedisProc(tmp_path / "redis", persist=False).start()

    def start() -> SidecarProcess:
        return start_sidecar(
            tmp_path / "sidecar", "--redis-url", redis_server.url, grpc_port=grpc_port
        )

    sidecar: SidecarProcess | None = None
    with open(tmp_path / "vllm.log", "wb") as log:
        vllm = vllm_server.start(
            smollm2_dir, api_port, log, bundle=BUNDLE, sidecar=f"127.0.0.1:{grpc_port}"
        )
        try:
            vllm_server.wait_ready(api_port, vllm)

            def ask(tag: str) -> list[str]:
                return [
                    vllm_server.chat(api_port, m, f"{tag}-{i}", 24)["choices"][0]["message"][
                        "content"
                    ]
                    for i, m in enumerate(prompts)
                ]

            absent = ask("absent")  # no sidecar at all
            sidecar = start()
            # The tap reconnects with backoff; requests sent once it is back are scored.
            wait_until(
                lambda: (
                    ask("up")
                    and metric(sidecar.metrics_port, "misalign_requests_scored_total") >= 4
                ),
                120,
                "ask('up') and metric(sidecar.metrics_port, 'misalign_requests_scored_total') >= 4",
            )
            assert ask("up2") == absent
            dropped = metric(sidecar.metrics_port, "misalign_rows_dropped_total", side="inference")
            assert dropped > 0  # what the tap could not send while the sidecar was away, reported

            sidecar.proc.send_signal(signal.SIGSTOP)  # stalled: the stream stops being read
            try:
                assert ask("stalled") == absent
            finally:
                sidecar.proc.send_signal(signal.SIGCONT)

            results: list[list[str]] = []
            steps = metric(sidecar.metrics_port, "misalign_steps_ingested_total")
            t = threading.Thread(target=lambda: results.append(ask("killed")))
            t.start()
            wait_until(  # the requests are running: their steps reach the sidecar
                lambda: metric(sidecar.metrics_port, "misalign_steps_ingested_total") > steps,
                60,
                "steps of the 'killed' requests at the sidecar",
            )
            sidecar.proc.kill()  # SIGKILL mid-run
            sidecar.proc.wait(10)
            t.join(300)
            assert results == [absent]

            sidecar = start()
            wait_until(
                lambda: (
                    ask("back")
                    and metric(sidecar.metrics_port, "misalign_requests_scored_total") >= 4
                ),
                120,
                "ask('back') and metric(sidecar.metrics_port, 'misalign_requests_scored_total') >= 4",
            )
            assert metric(sidecar.metrics_port, "misalign_rows_dropped_total", side="inference") > 0
            assert vllm.poll() is None
        finally:
            stop_process(vllm, 60)
            if sidecar is not None:
                sidecar.stop()
            redis_server.stop()
