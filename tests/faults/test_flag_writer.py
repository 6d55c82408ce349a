"""The sidecar's flag writer (`service.flags.FlagQueue`) against a real redis-server that is
killed, stopped, or flooded, at 200 flagged samples/s: every sample sent is in the stream exactly
once or counted in `misalign_queue_dropped_total` (and named in the DEBUG log line that counts it),
never both, never neither; a burst of 1,000 with Redis up loses nothing."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from detectors import bundle as bundle_io
from service.flagged_sample import FlaggedSample, TokenScores
from service.flags import FlagQueue
from service.metrics import Metrics
from service.redis_keys import FLAGGED_STREAM
from service.settings import Settings
from tests.support.harness import report
from tests.support.polling import until
from tests.support.redis_fleet import start_on_free_port
from tests.support.redis_proc import RedisProc

BUNDLE = bundle_io.load(bundle_io.default_bundle_path())
STREAM = FLAGGED_STREAM
RATE = 200.0  # flagged samples per second
BUFFER = 100  # small, so that an outage of a second or two outgrows it
TIMEOUT_S = 0.3  # the writer's socket timeout; the SIGSTOP lasts several times longer


def sample(i: int) -> dict[str, str]:
    """About the size of a short flagged conversation's sample, as its stream entry."""
    return FlaggedSample(
        model="m",
        top_feature="misaligned_persona",
        top_score=1.5 + i % 7,
        prompt_text=f"prompt {i} " * 20,
        tokens=TokenScores(token_ids=list(range(i % 50, i % 50 + 40)), roles=[1] * 40, scores={}),
    ).to_fields()


class Load:
    """Puts ``n`` samples at ``rate`` per second on a fixed schedule, or fewer if stopped;
    ``chunk`` at a time, as the sidecar puts every flagged request an ingest message finished."""

    def __init__(self, queue: FlagQueue, prefix: str, n: int, rate: float, chunk: int = 1) -> None:
        self.queue, self.prefix, self.n, self.rate, self.chunk = queue, prefix, n, rate, chunk
        self.sent: list[str] = []
        self._stop = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(self.n):
            if self._stop:
                return
            rid = f"{self.prefix}-{i}"
            self.queue.put(sample(i), rid)
            self.sent.append(rid)
            if (i + 1) % self.chunk:
                continue
            await asyncio.sleep(max(0.0, t0 + (i + 1) / self.rate - loop.time()))

    def stop(self) -> None:
        self._stop = True


def value(q: FlagQueue, name: str) -> float:
    """A metric's value summed over its labels."""
    return sum(s.value for m in q.metrics.registry.collect() for s in m.samples if s.name == name)


class PausedWhileSending(aioredis.Redis):
    """The real client; once ``armed``, its next pipeline SIGSTOPs Redis just before it is sent,
    so that the stall lands on a batch in flight (not on the writer's idle PING)."""

    redis: RedisProc
    armed = False

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        if self.armed:
            self.armed = False
            send = pipe.execute

            async def execute(raise_on_error: bool = True) -> Any:
                self.redis.pause()
                return await send(raise_on_error)

            pipe.execute = execute  # type: ignore[method-assign]
        return pipe


def make_queue(
    redis: RedisProc,
    buffer_size: int,
    batch_size: int | None = None,
    client_class: type[aioredis.Redis] = aioredis.Redis,
    **wait: int,
) -> FlagQueue:
    # As the sidecar makes its client (service/server.py), with a shorter timeout.
    client = client_class.from_url(
        redis.url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
    )
    extra = {} if batch_size is None else {"batch_size": batch_size}
    return FlagQueue(
        client,
        Metrics(BUNDLE),
        stream=STREAM,
        group="reviewers",
        dead_letter_stream=f"{STREAM}:dead",
        maxlen=100_000,
        buffer_size=buffer_size,
        dedup_ttl_s=3600,
        backoff_max_s=0.2,
        **extra,
        **wait,
    )


def stream_ids(redis: RedisProc) -> list[str]:
    return [fields["request_id"] for _, fields in redis.client().xrange(STREAM)]


def check_exactly_once(
    q: FlagQueue, load: Load, redis: RedisProc, caplog: pytest.LogCaptureFixture
) -> dict[str, int]:
    """Every id sent: in the stream once, or counted dropped once; none both, none neither."""
    ids = stream_ids(redis)
    dropped = [r.request_id for r in caplog.records if hasattr(r, "request_id")]
    counted = value(q, "misalign_queue_dropped_total")
    both = set(ids) & set(dropped)
    neither = set(load.sent) - set(ids) - set(dropped)
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} samples in the stream twice"
    assert set(ids) <= set(load.sent)
    assert len(dropped) == len(set(dropped)) == counted, (len(dropped), counted)
    assert not both, f"{len(both)} counted dropped yet in the stream, e.g. {sorted(both)[:3]}"
    assert not neither, f"{len(neither)} lost with no count, e.g. {sorted(neither)[:3]}"
    return {"in_stream": len(ids), "dropped": len(dropped)}


async def drain(q: FlagQueue, load: Load, task: asyncio.Task[None]) -> None:
    load.stop()
    await asyncio.wait_for(task, 10)
    await until(lambda: value(q, "misalign_queue_buffered") == 0, 30, "the buffer drained")


async def test_redis_sigkill_at_200_flagged_per_s_counts_every_lost_sample(
    tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="service.flags")
    redis = RedisProc(tmp_path / "redis", persist=True).start()  # appendfsync always
    request.addfinalizer(redis.stop)
    q = make_queue(redis, BUFFER)
    await q.start()
    load = Load(q, "kill", n=4000, rate=RATE)  # at most 20 s; stopped once the checks are in
    task = asyncio.create_task(load.run())
    try:
        await until(lambda: value(q, "misalign_queue_pushes_total") >= 100, 10, "first writes")
        await asyncio.to_thread(redis.kill)
        killed_at = len(load.sent)
        await until(lambda: len(load.sent) >= killed_at + 3 * BUFFER, 10, "the outage outgrew")
        assert value(q, "misalign_queue_buffered") == BUFFER
        pushed = value(q, "misalign_queue_pushes_total")
        await asyncio.to_thread(redis.start)  # the same directory: the append-only file
        outage = len(load.sent) - killed_at
        recovery_s = await until(
            lambda: value(q, "misalign_queue_pushes_total") > pushed, 20, "a write after restart"
        )
        # More flagged traffic on the recovered Redis, the buffer draining under it.
        after = len(load.sent)
        await until(lambda: len(load.sent) >= after + 2 * BUFFER, 10, "traffic after restart")
        await drain(q, load, task)
        figures = check_exactly_once(q, load, redis, caplog)
    finally:
        load.stop()
        await q.close()
    assert figures["dropped"] > 0, "the outage must outgrow the buffer to test it"
    report(
        "redis SIGKILL + restart, flag writer",
        load=f"{RATE:g} flagged/s",
        buffer_size=BUFFER,
        sent=len(load.sent),
        sent_during_outage=outage,
        **figures,
        recovery_s=round(recovery_s, 2),
    )


async def test_redis_sigstop_past_the_write_timeout_writes_nothing_twice(
    tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="service.flags")
    redis = RedisProc(tmp_path / "redis", persist=False).start()
    request.addfinalizer(redis.stop)
    q = make_queue(redis, BUFFER, client_class=PausedWhileSending)
    client = q.client
    assert isinstance(client, PausedWhileSending)
    client.redis = redis
    await q.start()
    load = Load(q, "stop", n=4000, rate=RATE)
    task = asyncio.create_task(load.run())
    try:
        await until(lambda: value(q, "misalign_queue_pushes_total") >= 100, 10, "first writes")
        client.armed = True
        await until(lambda: not client.armed, 5, "a batch sent to the stopped Redis")
        stopped_at = len(load.sent)
        await until(
            lambda: (
                value(q, "misalign_queue_push_failures_total") >= 1
                and len(load.sent) >= stopped_at + 3 * BUFFER
            ),
            15,
            "a write timed out and the stall outgrew the buffer",
        )
        stalled = len(load.sent) - stopped_at
        redis.resume()  # what was sent to the stopped Redis runs now
        after = len(load.sent)
        await until(lambda: len(load.sent) >= after + 2 * BUFFER, 10, "traffic after SIGCONT")
        await drain(q, load, task)
        figures = check_exactly_once(q, load, redis, caplog)
    finally:
        load.stop()
        await q.close()
    assert figures["dropped"] > 0, "the stall must outgrow the buffer to test it"
    # The batch that timed out ran when Redis resumed; sent again, dedup kept it to one entry.
    assert value(q, "misalign_queue_duplicates_total") >= 1
    report(
        "redis SIGSTOP + SIGCONT, flag writer",
        load=f"{RATE:g} flagged/s",
        buffer_size=BUFFER,
        write_timeout_s=TIMEOUT_S,
        sent=len(load.sent),
        sent_during_stall=stalled,
        **figures,
        duplicates_skipped=int(value(q, "misalign_queue_duplicates_total")),
        failures=int(value(q, "misalign_queue_push_failures_total")),
    )


def reads_processed(redis: RedisProc) -> int:
    return int(redis.client().info("stats")["total_reads_processed"])


async def test_a_burst_of_1000_with_redis_up_loses_nothing_and_is_batched(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    redis = RedisProc(tmp_path / "redis", persist=False).start()
    request.addfinalizer(redis.stop)
    buffer_size = Settings.model_fields["buffer_size"].default  # the defaults, as shipped
    batch_size = Settings.model_fields["flag_batch_size"].default
    q = make_queue(redis, buffer_size, batch_size)
    await q.start()
    n = 1000
    reads_before = reads_processed(redis)
    load = Load(q, "burst", n=n, rate=2 * n, chunk=20)  # 0.5 s, 50 ingest messages
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        await asyncio.wait_for(load.run(), 5)
        burst_s = loop.time() - t0
        assert burst_s < 1.0, burst_s
        drained_s = await until(
            lambda: value(q, "misalign_queue_buffered") == 0, 30, "the burst written"
        )
    finally:
        await q.close()
    reads = reads_processed(redis) - reads_before - 1  # less this INFO's own read
    ids = stream_ids(redis)
    assert value(q, "misalign_queue_dropped_total") == 0
    assert sorted(ids) == sorted(load.sent), "not every sample of the burst is in the stream once"
    assert value(q, "misalign_queue_pushes_total") == n
    # One round trip per sample was the writer's ceiling; pipelines carry many samples per read.
    assert reads < n / 4, f"Redis read {reads} times for {n} samples: not batched"
    report(
        "burst of 1,000 flagged samples, Redis up",
        burst_s=round(burst_s, 2),
        buffer_size=buffer_size,
        batch_size=batch_size,
        dropped=0,
        in_stream=len(ids),
        redis_reads=reads,
        drained_after_burst_s=round(drained_s, 2),
    )


async def test_wait_counts_a_sample_pushed_only_once_a_replica_holds_it(tmp_path: Path) -> None:
    """``wait_replicas=1`` on a primary with no replica: the samples reach its stream, yet none
    counts as pushed (a failover would lose them) and the batch is resent; once a replica has
    synced, each counts as pushed exactly once, the resends that found their own earlier write
    included (not as duplicates)."""
    primary = start_on_free_port(lambda port: RedisProc(tmp_path / "p", persist=False, port=port))
    replica = None
    q = make_queue(primary, buffer_size=BUFFER, wait_replicas=1, wait_timeout_ms=100)
    try:
        await q.start()
        for i in range(10):
            q.put(sample(i), f"w-{i}")
        await until(lambda: len(stream_ids(primary)) == 10, 10, "the samples on the primary")
        await until(lambda: value(q, "misalign_queue_push_failures_total") >= 3, 10, "resends")
        assert value(q, "misalign_queue_pushes_total") == 0
        assert value(q, "misalign_queue_buffered") == 10
        replica = start_on_free_port(
            lambda port: RedisProc(
                tmp_path / "r",
                persist=False,
                port=port,
                extra=["--replicaof", "127.0.0.1", str(primary.port)],
            )
        )
        await until(lambda: value(q, "misalign_queue_pushes_total") == 10, 20, "pushes")
        assert value(q, "misalign_queue_duplicates_total") == 0
        assert value(q, "misalign_queue_buffered") == 0
        assert sorted(stream_ids(primary)) == sorted(f"w-{i}" for i in range(10))
        assert stream_ids(replica) == stream_ids(primary)
    finally:
        await q.close()
        for node in (replica, primary):
            if node is not None:
                node.stop()
