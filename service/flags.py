"""Flagged samples to a Redis stream, surviving a Redis that goes away.

Samples wait in a bounded in-memory buffer; a writer task takes up to ``batch_size`` of them out
and sends them in one pipeline (one call of the Lua script per sample, no transaction, so a
cluster client works too), with exponential backoff while Redis is unreachable.

Every sample ends either in the stream exactly once or counted in ``queue_dropped`` (stage
buffer) exactly once:

- Writes are idempotent on request id: the script sets a dedup key and appends to the stream in
  one step, so a sample sent twice is appended once.
- A batch the writer has sent may have reached Redis even when the call failed (a timeout; a
  stopped Redis runs what waits in its socket later), so it is never dropped: it is sent again,
  as it is, until Redis answers for each sample.
- With ``wait_replicas`` > 0 (a Sentinel-managed primary) the batch ends with ``WAIT``: a
  sample counts as pushed only once that many replicas hold it. Until then the batch is kept and
  sent again, so what a primary acknowledged just before a failover, and lost when it became a
  replica, is written anew on the new primary (its dedup key was lost with it).
- When the buffer is full the oldest sample not yet sent is dropped and counted (the new one if
  every place is held by the batch being sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from detectors.errors import MisalignError
from service.metrics import Metrics
from service.redis_conn import ClusterClient, RedisClient, ensure_group
from service.redis_keys import dedup_key

log = logging.getLogger(__name__)

# KEYS[1] stream, KEYS[2] dedup key, KEYS[3] dead-letter stream (one hash slot:
# service/redis_keys.py); ARGV[1] ttl, ARGV[2] maxlen,
# ARGV[3] reviewers' group, ARGV[4] now, ARGV[5..] field/value pairs. Appends once per request
# id, then trims the stream to maxlen. An entry trimmed before reviewers decided on it (never
# read by their group, or read and still pending) is copied to the dead letters first: no sample
# disappears without a decision or a dead-letter entry.
_ADD_ONCE = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  -- A write (value and TTL as they are) so that a WAIT after this call waits for the replicas
  -- to reach this point, past the write that set the key: a resend then vouches for it.
  redis.call('SET', KEYS[2], '1', 'KEEPTTL')
  return false
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 5))
local over = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[2])
if over <= 0 then return id end
local function parse(s)
  local ms, seq = string.match(s, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local last_ms, last_seq = -1, -1
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  if info['name'] == ARGV[3] then last_ms, last_seq = parse(info['last-delivered-id']) end
end
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', over)) do
  local ms, seq = parse(e[1])
  local unread = ms > last_ms or (ms == last_ms and seq > last_seq)
  local pending = not unread and
    #redis.call('XPENDING', KEYS[1], ARGV[3], e[1], e[1], 1) > 0
  if unread or pending then
    local args = {'dead_sample_id', e[1], 'dead_reason',
                  'trimmed from the stream (at its maximum length) before a decision',
                  'dead_claims', -1, 'dead_at', ARGV[4]}
    for i = 1, #e[2] do args[#args + 1] = e[2][i] end
    redis.call('XADD', KEYS[3], '*', unpack(args))
    if pending then redis.call('XACK', KEYS[1], ARGV[3], e[1]) end
  end
  redis.call('XDEL', KEYS[1], e[1])
end
return id
"""


# A batch's bytes on the wire stay below this (a sample of a long conversation is large); a
# single sample above it still goes, alone.
_BATCH_BYTES = 8 * 1024 * 1024


class NotReplicatedError(MisalignError, RedisError):
    """Fewer replicas than ``redis_wait_replicas`` acknowledged a batch: it is sent again."""


@dataclass
class _Sent:
    fields: dict[str, str]
    # The script appended it on an attempt whose WAIT fell short: a later "already there" answer
    # is this write, not a duplicate.
    wrote: bool = False


class FlagQueue:
    def __init__(
        self,
        client: RedisClient,
        metrics: Metrics,
        *,
        stream: str,
        group: str,
        dead_letter_stream: str,
        maxlen: int,
        buffer_size: int,
        dedup_ttl_s: int,
        batch_size: int = 100,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 500,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.stream = stream
        self.group = group
        self.dead_letter_stream = dead_letter_stream
        self.maxlen = maxlen
        self.dedup_ttl_s = dedup_ttl_s
        # Samples never sent: the only ones an overflow may drop.
        self.buffer: deque[dict[str, str]] = deque()
        # The batch taken out of the buffer and sent, until Redis has answered for each sample.
        self._sending: list[_Sent] = []
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.buffer_size = buffer_size
        self.batch_size = min(batch_size, buffer_size)
        metrics.queue_capacity.set(buffer_size)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sha = hashlib.sha1(_ADD_ONCE.encode()).hexdigest()
        self.connected = False

    async def start(self) -> None:
        try:
            await self.ensure_group()
        except RedisError as exc:
            log.warning("redis unreachable at start (%s); flagged samples will be buffered", exc)
        self._task = asyncio.create_task(self._run(), name="flag-queue")

    async def ensure_group(self) -> None:
        await ensure_group(self.client, self.stream, self.group)
        self.connected = True

    @property
    def pending(self) -> int:
        """Samples not yet in Redis: buffered, and sent but not yet answered for."""
        return len(self.buffer) + len(self._sending)

    def put(self, sample: dict[str, str], request_id: str) -> None:
        """Queue a stream entry (``FlaggedSample.to_fields``); never blocks and never raises."""
        fields = {**sample, "request_id": request_id}
        if self.pending >= self.buffer_size:
            if not self.buffer:  # every place is held by the batch being sent
                self._drop(fields)
                return
            self._drop(self.buffer.popleft())
        self.buffer.append(fields)
        self.metrics.queue_buffered.set(self.pending)
        self._wake.set()

    def _drop(self, fields: dict[str, str]) -> None:
        self.metrics.queue_dropped_buffer.inc()
        log.debug(
            "flag buffer full: dropped the sample of request %s",
            fields["request_id"],
            extra={"request_id": fields["request_id"]},
        )

    def _take(self) -> None:
        size = 0
        while self.buffer and len(self._sending) < self.batch_size:
            size += sum(len(k) + len(v) for k, v in self.buffer[0].items())
            if self._sending and size > _BATCH_BYTES:
                break
            self._sending.append(_Sent(self.buffer.popleft()))

    def _call(self, fields: dict[str, str]) -> tuple[list[str], list[str | int | float]]:
        """The script's KEYS and ARGV for one sample."""
        args: list[str | int | float] = [self.dedup_ttl_s, self.maxlen, self.group, time.time()]
        for key, value in fields.items():
            args += [key, value]
        key = dedup_key(self.stream, fields["request_id"])
        return [self.stream, key, self.dead_letter_stream], args

    async def _send(self) -> None:
        """Send the batch in one pipeline; keep in it what Redis did not answer for, and all of
        it while fewer than ``wait_replicas`` replicas acknowledged it."""
        calls = [self._call(sent.fields) for sent in self._sending]
        results: list[Any]
        acked: Any = None
        if isinstance(self.client, ClusterClient):
            # redis-py refuses EVALSHA in a cluster pipeline: the calls go out together instead,
            # over the connection to the one node that holds the {flagged} slot. (No WAIT: the
            # settings refuse redis_wait_replicas with a cluster.)
            results = await asyncio.gather(
                *(self.client.evalsha(self._sha, len(k), *k, *a) for k, a in calls),
                return_exceptions=True,
            )
        else:
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(self._sha, len(keys), *keys, *args)
            if self.wait_replicas:
                # On the pipeline's connection: WAIT covers the writes made on it.
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            results = await pipe.execute(raise_on_error=False)
            if self.wait_replicas:
                acked = results.pop()
        durable = not self.wait_replicas or (isinstance(acked, int) and acked >= self.wait_replicas)
        kept: list[_Sent] = []
        errors: list[Exception] = []
        for sent, result in zip(self._sending, results, strict=True):
            if isinstance(result, Exception):
                kept.append(sent)
                errors.append(result)
            elif not durable:
                sent.wrote = sent.wrote or bool(result)
                kept.append(sent)
            elif result or sent.wrote:
                self.metrics.queue_pushes.inc()
            else:
                self.metrics.queue_duplicates.inc()
        self._sending = kept
        self.metrics.queue_buffered.set(self.pending)
        if errors and all(isinstance(e, NoScriptError) for e in errors):
            # A restarted (or failed-over) Redis has an empty script cache: nothing ran.
            await self.client.script_load(_ADD_ONCE)
        elif errors:
            raise errors[0]
        elif isinstance(acked, Exception):
            raise acked
        elif not durable:
            raise NotReplicatedError(
                f"WAIT: {acked} of {self.wait_replicas} replicas acknowledged the batch within "
                f"{self.wait_timeout_ms} ms (redis_wait_timeout_ms); sending it again"
            )

    async def _run(self) -> None:
        delay = self.backoff_initial_s
        while True:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if not self._sending:
                    # Take samples out only once Redis answers: if it went away while the writer
                    # was idle, they stay in the buffer, where an overflow drops the oldest.
                    if self.connected:
                        await self.client.ping()
                    else:
                        await self.ensure_group()
                        log.info("redis reachable again; draining %d samples", self.pending)
                    self._take()
                elif not self.connected:
                    await self.ensure_group()
                    log.info("redis reachable again; resending %d samples", len(self._sending))
                await self._send()
                delay = self.backoff_initial_s
            except (RedisError, OSError) as exc:
                self.metrics.queue_failures.inc()
                if self.connected:
                    log.warning("redis write failed (%s); buffering, retrying with backoff", exc)
                self.connected = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)

    async def flush(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for the buffer to drain; returns what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.pending and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return self.pending

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.aclose()
