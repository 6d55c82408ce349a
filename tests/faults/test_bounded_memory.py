"""Memory stays bounded under requests that never finish, a flood of distinct request ids and very
long requests: the sidecar's RSS is sampled as the flood goes on and must level off.

The sidecar runs with small bounds (2,000 running requests, 2,048 rows each, 3 s idle timeout,
2,000 recent scores) so each bound is reached early in the flood; past that point RSS must not
follow the number of ids sent.
"""

from __future__ import annotations

import csv
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.steady_load import labeled, rss_mb, scrape
from detectors import bundle as bundle_io
from service.sidecar_process import start_sidecar
from tests.support.harness import report
from tests.support.polling import wait_until
from tests.support.redis_proc import RedisProc
from wire import monitor_pb2 as pb
from wire import monitor_pb2_grpc as pb_grpc
from wire.codec import encode_step

BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
K = BUNDLE.k
MAX_REQUESTS, MAX_TOKENS, TIMEOUT_S, RECENT = 2000, 2048, 3.0, 2000
IDS_PER_STEP = 500
N_IDS = 60_000


def rows(
    rid: str, start: int, n: int
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pos = np.arange(start, start + n)
    proj = np.zeros((n, K), np.float32) - BUNDLE.bias.astype(np.float32)
    return rid, pos, pos % 1000 + 100, (pos >= 4).astype(np.int8), proj


def finish(rid: str) -> pb.FinishedRequest:
    return pb.FinishedRequest(request_id=rid, model="m", model_version="v1", finish_reason="stop")


def test_memory_levels_off_under_floods_of_ids_and_long_requests(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    redis = RedisProc(tmp_path / "redis", persist=False).start()
    request.addfinalizer(redis.stop)
    env = {
        "MISALIGN_MAX_REQUESTS": str(MAX_REQUESTS),
        "MISALIGN_MAX_TOKENS_PER_REQUEST": str(MAX_TOKENS),
        "MISALIGN_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
        "MISALIGN_RECENT_SCORES": str(RECENT),
    }
    curve: list[tuple[str, int, float]] = []  # phase, ids sent so far, RSS MB
    with start_sidecar(tmp_path / "sc", "--redis-url", redis.url, env=env) as sc:
        channel = grpc.insecure_channel(sc.address)
        ingest = pb_grpc.MonitorStub(channel).Ingest

        def flood(phase: str, n_ids: int, finished: bool) -> None:
            def steps():  # type: ignore[no-untyped-def]
                for s in range(0, n_ids, IDS_PER_STEP):
                    ids = [f"{phase}-{i}" for i in range(s, min(s + IDS_PER_STEP, n_ids))]
                    yield encode_step(
                        BUNDLE.bundle_id,
                        K,
                        [rows(rid, 0, 6) for rid in ids],
                        finished=[finish(r) for r in ids] if finished else [],
                    )
                    if (s // IDS_PER_STEP) % 20 == 19:
                        curve.append((phase, s + IDS_PER_STEP, rss_mb(sc.pid)))

            ingest(steps(), timeout=300)
            curve.append((phase, n_ids, rss_mb(sc.pid)))

        rss0 = rss_mb(sc.pid)
        # 1. ids that never finish: beyond MAX_REQUESTS they are refused and counted.
        flood("open", N_IDS, finished=False)
        m = scrape(sc.metrics_url)
        active = m["misalign_active_requests"]
        assert 0 < active <= MAX_REQUESTS
        capacity = labeled(m, "misalign_rows_dropped_total", side="sidecar", reason="capacity")
        # Every id was either refused at capacity, is running, or has already expired.
        expired = labeled(m, "misalign_requests_expired_total")
        assert capacity == (N_IDS - active - expired) * 6
        expired_s = wait_until(
            lambda: scrape(sc.metrics_url)["misalign_active_requests"] == 0,
            TIMEOUT_S * 4,
            "idle requests expired",
        )
        accepted = N_IDS - capacity / 6
        assert labeled(scrape(sc.metrics_url), "misalign_requests_expired_total") == accepted

        # 2. distinct ids that do finish: recent scores and the finished-id set are bounded.
        flood("done", N_IDS, finished=True)
        assert scrape(sc.metrics_url)["misalign_requests_scored_total"] == N_IDS

        # 3. very long requests: rows past MAX_TOKENS are refused, per request.
        def long_steps():  # type: ignore[no-untyped-def]
            for c in range(0, 20_000, 500):
                yield encode_step(
                    BUNDLE.bundle_id, K, [rows(f"long-{j}", c, 500) for j in range(20)]
                )
            yield encode_step(
                BUNDLE.bundle_id, K, [], finished=[finish(f"long-{j}") for j in range(20)]
            )

        ingest(long_steps(), timeout=300)
        curve.append(("long", 20, rss_mb(sc.pid)))
        m = scrape(sc.metrics_url)
        too_long = labeled(m, "misalign_rows_dropped_total", side="sidecar", reason="too_long")
        kept = MAX_TOKENS // 500 * 500  # a chunk that would pass the cap is refused whole
        assert too_long == 20 * (20_000 - kept)
        with grpc.insecure_channel(sc.address) as ch:
            got = pb_grpc.MonitorStub(ch).GetRequestScore(
                pb.GetRequestScoreRequest(request_id="long-0"), timeout=5
            )
        assert got.tokens == kept
        # The flood again, on a warm process: RSS must not follow the ids.
        rss_before_second = rss_mb(sc.pid)
        flood("open2", N_IDS, finished=False)
        flood("done2", N_IDS, finished=True)
        rss_end = rss_mb(sc.pid)
        channel.close()
    redis.stop()

    with open(tmp_path / "rss_curve.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("phase", "ids_sent", "rss_mb"), *curve])
    open_curve = [r for p, _, r in curve if p == "open"]
    done_curve = [r for p, _, r in curve if p == "done"]
    # Once a bound is reached, the second half of each flood costs (almost) nothing more.
    assert open_curve[-1] - open_curve[len(open_curve) // 2] < 8, open_curve
    assert done_curve[-1] - done_curve[len(done_curve) // 2] < 8, done_curve
    assert rss_end - rss_before_second < 8, (rss_before_second, rss_end)
    report(
        f"flood: 2 x {N_IDS:,} never-finishing ids, 2 x {N_IDS:,} finished ids, 20 requests of 20,000 rows",
        load=f"bounds max_requests={MAX_REQUESTS}, max_tokens={MAX_TOKENS}, "
        f"timeout={TIMEOUT_S:g} s, recent={RECENT}",
        rss_start_mb=round(rss0, 1),
        rss_curve_mb=[(p, n, round(r, 1)) for p, n, r in curve],
        rss_second_round_growth_mb=round(rss_end - rss_before_second, 2),
        capacity_rows_dropped=capacity,
        too_long_rows_dropped=too_long,
        expiry_s=round(expired_s, 2),
    )
