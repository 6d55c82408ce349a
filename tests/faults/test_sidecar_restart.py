"""The sidecar stalled (SIGSTOP) and killed (SIGKILL) then restarted under streaming load from the
tap's own publisher: the engine's calls into the tap never wait, every dropped row is counted and
reported exactly once the sidecar is back, and scoring resumes on reconnect."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.steady_load import EngineLoad, labeled, scrape
from detectors import bundle as bundle_io
from service.sidecar_process import SidecarProcess, start_sidecar
from service.vllm_server import free_port
from tap.publisher import Publisher
from tap.settings import TapSettings
from tests.support.harness import report
from tests.support.polling import wait_until
from tests.support.redis_proc import RedisProc
from wire import monitor_pb2 as pb
from wire import monitor_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow  # about a minute: the stall lasts until the tap's queue is full
BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
STEPS_PER_S = 50.0


class Engine:
    """Plays the engine's side of the tap: every step handed to the publisher, timed."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.load = EngineLoad(BUNDLE, live=64, lifetime=24, prefill=8, flag_every=0, prefix="e")
        self.phase = "up"
        self.call_s: dict[str, list[float]] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for msg in self.load.steps(STEPS_PER_S):
            # The arrays a runner hook has on the host after a step.
            ids, offsets = list(msg.request_ids), np.array(msg.row_offsets)
            pos = np.frombuffer(msg.positions, "<u4")
            tok = np.frombuffer(msg.token_ids, "<u4")
            roles = np.frombuffer(msg.is_response, np.int8)
            proj = np.frombuffer(msg.projections, "<f4").reshape(len(roles), msg.k)
            t0 = time.perf_counter()
            self.publisher.submit(ids, offsets, pos, tok, roles, proj)
            for fr in msg.finished:
                self.publisher.finish(fr.request_id, "stop")
            self.call_s.setdefault(self.phase, []).append(time.perf_counter() - t0)

    def p99_ms(self, phase: str) -> float:
        return float(np.percentile(np.array(self.call_s[phase]) * 1e3, 99))


def scored(sc: SidecarProcess) -> float:
    return scrape(sc.metrics_url).get("misalign_requests_scored_total", 0.0)


def test_sidecar_stalled_killed_and_restarted_under_tap_load(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    redis = RedisProc(tmp_path / "redis", persist=False).start()
    request.addfinalizer(redis.stop)
    started: list[SidecarProcess] = []
    request.addfinalizer(lambda: [p.stop() for p in started])
    port = free_port()

    def start() -> SidecarProcess:
        started.append(start_sidecar(tmp_path / "sc", "--redis-url", redis.url, grpc_port=port))
        return started[-1]

    sc = start()
    publisher = Publisher(
        TapSettings(sidecar=f"127.0.0.1:{port}", queue_size=32, backoff_max_s=1.0),
        BUNDLE,
        "m",
    )
    engine = Engine(publisher)
    try:
        wait_until(lambda: scored(sc) >= 60, 60, "scoring with the sidecar up")

        engine.phase = "stalled"
        sc.proc.send_signal(signal.SIGSTOP)
        # Sockets and HTTP/2 windows absorb the first seconds; then the tap's queue fills.
        stall_to_drop_s = wait_until(
            lambda: publisher.rows_dropped["queue_full"] > 0, 90, "the tap dropping while stalled"
        )
        first = publisher.rows_dropped["queue_full"]
        wait_until(lambda: publisher.rows_dropped["queue_full"] > first, 30, "more drops stalled")
        sc.proc.send_signal(signal.SIGCONT)
        engine.phase = "up-again"
        before = scored(sc)
        wait_until(lambda: scored(sc) > before + 10, 30, "scoring after SIGCONT")

        engine.phase = "killed"
        sc.proc.kill()
        sc.proc.wait(10)
        t_kill = time.monotonic()
        wait_until(
            lambda: publisher.rows_dropped["sidecar_unavailable"] > 0, 30, "drops while it is down"
        )
        t_start = time.monotonic()
        sc = start()
        engine.phase = "restarted"
        ready_s = time.monotonic() - t_start
        resumed_s = wait_until(lambda: scored(sc) > 0, 30, "scoring on the restarted sidecar")
        wait_until(lambda: scored(sc) >= 20, 30, "traffic on the restarted sidecar")
    finally:
        engine.load.stop()
        engine.thread.join(60)
    # The tail of the load: its finishes and cumulative drop counts reach the new sidecar.
    wait_until(lambda: publisher.queue.empty() and publisher._in_flight is None, 20, "tap drained")
    tap_rows = sum(publisher.rows_dropped.values())
    tap_steps = sum(publisher.steps_dropped.values())
    wait_until(
        lambda: (
            labeled(scrape(sc.metrics_url), "misalign_steps_dropped_total", side="inference")
            == tap_steps
        ),
        20,
        "the tap's drop counts at the sidecar",
    )
    m = scrape(sc.metrics_url)
    assert labeled(m, "misalign_rows_dropped_total", side="inference") == tap_rows
    assert labeled(m, "misalign_steps_dropped_total", side="inference") == tap_steps
    assert m.get("misalign_ingest_errors_total", 0.0) == 0
    # The last requests, which ran wholly after the reconnect, are scored and found by id.
    with grpc.insecure_channel(sc.address) as ch:
        stub = pb_grpc.MonitorStub(ch)
        for rid in engine.load.finished[-5:]:
            got = stub.GetRequestScore(pb.GetRequestScoreRequest(request_id=rid), timeout=5)
            assert got.tokens > 0
    sc.stop()
    redis.stop()

    for phase in ("stalled", "killed"):
        # The engine's call into the tap never waits on the sidecar: waiting would show as the
        # length of the stall (tens of seconds), not as scheduling noise on a busy machine.
        calls = np.array(engine.call_s[phase]) * 1e3
        assert engine.p99_ms(phase) < 50 and calls.max() < 500, (phase, calls.max())
    report(
        "sidecar SIGSTOP until the tap drops, then SIGKILL + restart once the tap drops",
        load=f"tap publisher, {STEPS_PER_S:g} steps/s x 64 requests, "
        f"{len(engine.load.finished)} finished",
        engine_call_p99_ms={p: round(engine.p99_ms(p), 3) for p in engine.call_s},
        engine_call_max_ms={p: round(max(v) * 1e3, 2) for p, v in engine.call_s.items()},
        stall_to_first_drop_s=round(stall_to_drop_s, 2),
        rows_dropped_by_tap=dict(publisher.rows_dropped),
        rows_dropped_metric=tap_rows,
        sidecar_ready_s=round(ready_s, 2),
        scoring_resumed_after_ready_s=round(resumed_s, 2),
        kill_to_scoring_s=round(t_start - t_kill + ready_s + resumed_s, 2),
    )
