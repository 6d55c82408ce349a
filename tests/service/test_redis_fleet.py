"""Beyond one Redis: a real three-node Redis Cluster and a real Sentinel-managed primary and
replica (tests/support/redis_fleet.py), reached by the real sidecar, review store and CLI through
``redis+cluster://`` and ``redis+sentinel://`` URLs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.steady_load import EngineLoad, scrape
from detectors import bundle as bundle_io
from review.store import ReviewStore
from service.redis_keys import DEAD_LETTER_STREAM, FLAGGED_STREAM, LABELS_STREAM
from service.sidecar_process import SidecarProcess, start_sidecar
from tests.support import ROOT
from tests.support.harness import Feeder, report, settled
from tests.support.polling import wait_until
from tests.support.redis_fleet import SERVICE, LocalCluster, LocalSentinel, tcp

BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
GROUP = "reviewers"


def store(url: str, max_deliveries: int = 5) -> ReviewStore:
    return ReviewStore.from_url(
        url,
        stream=FLAGGED_STREAM,
        group=GROUP,
        dead_stream=DEAD_LETTER_STREAM,
        labels_stream=LABELS_STREAM,
        claim_idle_s=60,
        max_deliveries=max_deliveries,
    )


def flag_some(sc: SidecarProcess, n: int) -> list[str]:
    load = EngineLoad(BUNDLE, live=n, lifetime=4, prefill=4, flag_every=1, prefix="cl")
    feeder = Feeder(sc.address, load, None)
    wait_until(lambda: len(load.finished) >= n, 20, "requests finished")
    feeder.finish()
    return load.flagged


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "misalign_monitor.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_cluster_sidecar_review_store_and_cli(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster")
    try:
        with start_sidecar(tmp_path / "sc", "--redis-url", cluster.url) as sc:
            flagged = flag_some(sc, 4)

            async def review() -> tuple[list[str], str, str]:
                s = store(cluster.url, max_deliveries=1)
                try:
                    queue = await s.queue()
                    ids = [r.request_id for r in queue]
                    first, second, third = (r.id for r in queue[:3])
                    assert await s.claim(first, "alice") == 1
                    await s.decide(first, "alice", "misaligned", "on a cluster")
                    # bob walks away: his claim aged past claim_idle_s (XCLAIM ... IDLE), and
                    # with max_deliveries=1 the sample goes to the dead letters.
                    assert await s.claim(second, "bob") == 1
                    await s.client.execute_command(
                        "XCLAIM", FLAGGED_STREAM, GROUP, "bob", 0, second, "IDLE", 10**7, "JUSTID"
                    )
                    assert await s.refresh() == 1
                    [dead] = await s.dead_letters()
                    assert dead.sample_id == second and dead.claims == 1
                    assert dead.sample.request_id in flagged
                    counts = await s.counts()
                    assert (counts.backlog, counts.dead_letters) == (len(queue) - 2, 1)
                    return ids, first, third
                finally:
                    await s.close()

            wait_until(
                lambda: scrape(sc.metrics_url)["misalign_queue_pushes_total"] == len(flagged),
                20,
                "flagged samples pushed to the cluster",
            )
            ids, decided, third = asyncio.run(review())
            assert sorted(ids) == sorted(flagged)
            # The sidecar's review gauges read the cluster too.
            wait_until(
                lambda: scrape(sc.metrics_url)["misalign_review_dead_letter"] == 1,
                20,
                "the dead-letter gauge",
            )
        # The CLI decides a sample on the cluster, then exports both labels.
        out = cli(
            "review", "label", third, "unsure", "--reviewer", "carol", "--redis-url", cluster.url
        )
        assert out.returncode == 0 and f"labelled {third} unsure as carol" in out.stdout, out.stderr
        out = cli("labels", "export", "--redis-url", cluster.url)
        assert out.returncode == 0, out.stderr
        labels = [line for line in out.stdout.splitlines() if line]
        assert len(labels) == 2 and decided in out.stdout and '"reviewer":"carol"' in out.stdout
        # Every key lives on one node: the hash tag keeps each script in one slot.
        holders = [n.port for n in cluster.nodes if n.client().dbsize() > 0]
        assert len(holders) == 1
    finally:
        cluster.stop()


def test_sentinel_failover_under_traffic_loses_nothing_uncounted(tmp_path: Path) -> None:
    """SIGKILL of the primary while flagged samples flow: the Sentinel promotes the replica, the
    sidecar asks it for the new primary and writes on. A sample counts as pushed once a replica
    acknowledged it (WAIT 1): the spare replica, which the failover points at the new primary,
    acknowledges the writes there. What could not be written waited in the buffer. Every flagged sample ends in the stream exactly once or
    is counted in misalign_queue_dropped_total."""
    fleet = LocalSentinel(tmp_path / "sentinel", spare=True)
    try:
        old = fleet.primary_port()
        with start_sidecar(tmp_path / "sc", "--redis-url", fleet.url) as sc:
            metrics = lambda: scrape(sc.metrics_url)  # noqa: E731
            load = EngineLoad(BUNDLE, live=16, lifetime=12, prefill=4, flag_every=2, prefix="f")
            feeder = Feeder(sc.address, load, 40.0)
            try:
                wait_until(
                    lambda: metrics()["misalign_queue_pushes_total"] >= 20, 30, "first pushes"
                )
                pushed_before = metrics()["misalign_queue_pushes_total"]
                t_kill = time.monotonic()
                fleet.primary.kill()
                failover_s = wait_until(lambda: fleet.primary_port() != old, 30, "a new primary")
                new = fleet.primary_port()
                assert new in {r.port for r in fleet.replicas}
                wait_until(
                    lambda: metrics()["misalign_queue_pushes_total"] > pushed_before + 20,
                    30,
                    "pushes to the new primary",
                )
                recovery_s = time.monotonic() - t_kill
                failures = metrics()["misalign_queue_push_failures_total"]
            finally:
                feeder.finish()
            m = settled(metrics, load)
        entries = tcp(new).xrange(FLAGGED_STREAM)
        ids = [fields["request_id"] for _, fields in entries]
        assert len(ids) == len(set(ids)), "a sample reached the stream twice"
        assert set(ids) <= set(load.flagged)
        missing = set(load.flagged) - set(ids)
        assert len(missing) == m["misalign_queue_dropped_total"], (len(missing), m)
        assert failures >= 1, "the kill did not interrupt a write: nothing was tested"

        async def review_queue() -> list[str]:  # the review store finds the new primary too
            s = store(fleet.url)
            try:
                return [r.request_id for r in await s.queue()]
            finally:
                await s.close()

        assert sorted(asyncio.run(review_queue())) == sorted(ids)
        report(
            "sentinel failover (primary SIGKILL)",
            flagged=len(load.flagged),
            in_stream=len(ids),
            dropped_metric=m["misalign_queue_dropped_total"],
            lost_uncounted=len(missing) - m["misalign_queue_dropped_total"],
            push_failures=failures,
            failover_s=round(failover_s, 2),
            recovery_s=round(recovery_s, 2),
        )
    finally:
        fleet.stop()


def test_planned_sentinel_failover_loses_nothing_uncounted(tmp_path: Path) -> None:
    """``SENTINEL FAILOVER`` while flagged samples flow. The old primary is not down: it takes
    writes until the sidecar has moved (about a second after the replica's promotion), and what
    it took after the promotion is lost when it becomes a replica. Each batch ends with ``WAIT 1``
    (the default for a sentinel URL): in that window no replica acknowledges it, so the sidecar
    counts nothing pushed and sends the batch again to the new primary, which has neither the
    samples nor their dedup keys and writes them anew; they count as pushed once the new primary
    has a replica (the old one, demoted). Every flagged sample ends in the new primary's stream
    exactly once or is counted in misalign_queue_dropped_total."""
    fleet = LocalSentinel(tmp_path / "sentinel")
    try:
        old = fleet.primary_port()
        assert fleet.replica is not None and fleet.sentinel is not None
        new = fleet.replica.port
        with start_sidecar(tmp_path / "sc", "--redis-url", fleet.url) as sc:
            metrics = lambda: scrape(sc.metrics_url)  # noqa: E731
            load = EngineLoad(BUNDLE, live=16, lifetime=12, prefill=4, flag_every=2, prefix="p")
            feeder = Feeder(sc.address, load, 40.0)
            try:
                wait_until(
                    lambda: metrics()["misalign_queue_pushes_total"] >= 20, 30, "first pushes"
                )
                failures_before = metrics()["misalign_queue_push_failures_total"]
                n_failover = len(load.flagged)
                t0 = time.monotonic()
                tcp(fleet.sentinel.port).execute_command("SENTINEL", "FAILOVER", SERVICE)
                switch_s = wait_until(lambda: fleet.primary_port() == new, 30, "the switch")
                on_new = tcp(new).xlen(FLAGGED_STREAM)
                wait_until(
                    lambda: tcp(new).xlen(FLAGGED_STREAM) > on_new, 30, "a write on the new primary"
                )
                moved_s = time.monotonic() - t0
                n_moved = len(load.flagged)
                wait_until(lambda: tcp(new).xlen(FLAGGED_STREAM) > on_new + 20, 30, "writes go on")
            finally:
                feeder.finish()
            wait_until(lambda: metrics()["misalign_queue_buffered"] == 0, 40, "the buffer empty")
            drained_s = time.monotonic() - t0  # the last resend acknowledged by the demoted one
            wait_until(
                lambda: metrics()["misalign_requests_scored_total"] == len(load.finished),
                30,
                "every finished request scored",
            )
            m = metrics()
        ids = [f["request_id"] for _, f in tcp(new).xrange(FLAGGED_STREAM)]
        assert len(ids) == len(set(ids)), "a sample reached the stream twice"
        assert set(ids) <= set(load.flagged)
        missing = set(load.flagged) - set(ids)
        assert len(missing) == m["misalign_queue_dropped_total"], (len(missing), m)
        # Counted pushed: exactly what is in the stream (the resends counted once, not as
        # duplicates, and nothing counted that the old primary lost).
        assert m["misalign_queue_pushes_total"] == len(ids), (m, len(ids))
        resends = m["misalign_queue_push_failures_total"] - failures_before
        assert resends >= 1, "no batch fell in the switch window: nothing was tested"
        # Moved within the switch plus one WAIT timeout and a re-ask, long before the demotion.
        assert moved_s < switch_s + 2.5, (moved_s, switch_s)
        report(
            "sentinel failover (SENTINEL FAILOVER, old primary up, WAIT 1)",
            flagged=len(load.flagged),
            in_stream=len(ids),
            dropped_metric=m["misalign_queue_dropped_total"],
            lost_uncounted=len(missing) - m["misalign_queue_dropped_total"],
            flagged_in_switch_window=n_moved - n_failover,
            resent_batches=resends,
            switch_s=round(switch_s, 2),
            moved_s=round(moved_s, 2),
            drained_s=round(drained_s, 2),
            old_primary=old,
        )
    finally:
        fleet.stop()


@pytest.mark.parametrize("kind", ["cluster", "sentinel"])
def test_unreachable_fleet_is_a_clear_error(kind: str) -> None:
    """No node answers: the CLI says so in one line (a cluster client's own exception, outside
    redis-py's RedisError tree, is turned into one), naming the URL without its secret."""
    from service.vllm_server import free_port

    port = free_port()
    url = (
        f"redis+cluster://:pw-fleet-9@127.0.0.1:{port}"
        if kind == "cluster"
        else f"redis+sentinel://127.0.0.1:{port}/svc?sentinel_password=pw-fleet-9"
    )
    out = cli("review", "list", "--redis-url", url)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and f"127.0.0.1:{port}" in out.stderr, out.stderr
    assert "pw-fleet-9" not in out.stdout + out.stderr
