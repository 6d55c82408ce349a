"""Redis killed (SIGKILL) and restarted under load: nothing lost within the buffer bound, nothing
written twice, and the count beyond the bound exact in `misalign_queue_dropped_total`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.steady_load import EngineLoad, scrape
from detectors import bundle as bundle_io
from service.sidecar_process import start_sidecar
from tests.support.harness import Feeder, report
from tests.support.polling import wait_until
from tests.support.redis_proc import RedisProc

BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
BUFFER = 40
STEPS_PER_S = 40.0
OUTAGE_FLAGGED = 3 * BUFFER  # Redis stays down until this many samples were flagged


def test_redis_killed_and_restarted_under_load(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    redis = RedisProc(tmp_path / "redis", persist=True).start()
    request.addfinalizer(redis.stop)
    env = {"MISALIGN_BUFFER_SIZE": str(BUFFER)}
    with start_sidecar(tmp_path / "sc", "--redis-url", redis.url, env=env) as sc:
        metrics = lambda: scrape(sc.metrics_url)  # noqa: E731
        load = EngineLoad(BUNDLE, live=32, lifetime=24, prefill=8, flag_every=3, prefix="q")
        feeder = Feeder(sc.address, load, STEPS_PER_S)
        try:
            wait_until(lambda: redis.client().xlen("misalign:{flagged}") >= 10, 30, "first pushes")
            redis.kill()
            flagged_before = len(load.flagged)
            outage_s = wait_until(
                lambda: len(load.flagged) - flagged_before >= OUTAGE_FLAGGED,
                60,
                "the outage outgrowing the buffer",
            )
            m = metrics()
            assert m["misalign_queue_buffered"] == BUFFER
            assert m["misalign_queue_push_failures_total"] >= 1
            redis.start()  # the same directory: the append-only file brings the stream back
            recovery_s = wait_until(
                lambda: metrics()["misalign_queue_pushes_total"] > m["misalign_queue_pushes_total"],
                30,
                "the first push after the restart",
            )
            flagged_outage = len(load.flagged) - flagged_before  # up to the first write again
            drained_s = wait_until(
                lambda: metrics()["misalign_queue_buffered"] < 5, 30, "the buffer drained"
            )
            after = len(load.flagged)  # more flagged traffic on the recovered Redis
            wait_until(lambda: len(load.flagged) >= after + BUFFER, 60, "traffic after the restart")
        finally:
            feeder.finish()
        wait_until(
            lambda: metrics()["misalign_requests_scored_total"] == len(load.finished),
            30,
            "every finished request scored",
        )
        wait_until(lambda: metrics()["misalign_queue_buffered"] == 0, 30, "the buffer empty")
        m = metrics()

    ids = [fields["request_id"] for _, fields in redis.client().xrange("misalign:{flagged}")]
    redis.stop()
    assert len(ids) == len(set(ids)), "a sample reached the stream twice"
    assert set(ids) <= set(load.flagged), "a sample that was not flagged reached the stream"
    missing = [i for i, rid in enumerate(load.flagged) if rid not in set(ids)]
    dropped = m["misalign_queue_dropped_total"]
    assert len(missing) == dropped > 0, (len(missing), dropped)
    # What was lost is the oldest of the outage's samples, none from before or after it.
    assert flagged_before - 5 <= min(missing) and max(missing) < flagged_before + flagged_outage
    # The buffer drops one stretch of the oldest; a sample thread starved of CPU (a loaded
    # machine) may also drop from its own backlog, anywhere, counted apart (stage build). The
    # stretch is in the sidecar's order, which a scoring batch may permute by a few places
    # against the engine's finish order: holes of up to 3 places do not split it.
    in_buffer = m['misalign_queue_dropped_total{stage="buffer"}']
    runs = np.split(np.array(missing), np.flatnonzero(np.diff(missing) > 4) + 1)
    assert max(len(r) for r in runs) >= in_buffer > 0, "the buffer's drops are not one stretch"
    report(
        "redis SIGKILL + restart",
        load=f"{STEPS_PER_S:g} steps/s x 32 requests, {len(load.finished)} finished, "
        f"{len(load.flagged)} flagged (1 in 3)",
        outage_s=round(outage_s, 2),
        flagged_during_outage=flagged_outage,
        buffer_size=BUFFER,
        lost=len(missing),
        dropped_metric=dropped,
        dropped_building=m['misalign_queue_dropped_total{stage="build"}'],
        duplicates_in_stream=len(ids) - len(set(ids)),
        dedup_skips=m.get("misalign_queue_duplicates_total", 0.0),
        recovery_s=round(recovery_s, 2),
        drained_s=round(drained_s, 2),
    )
