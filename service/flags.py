"""Flagged samples to a Redis stream, surviving a Redis that goes away.

Samples wait in a bounded in-memory buffer; a writer task drains it with exponential backoff
while Redis is unreachable. When the buffer is full the oldest sample is dropped and counted.
Writes are idempotent on request id: a Lua script sets a dedup key and appends to the stream in
one step, so a replayed request is never queued twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import Any

from redis.exceptions import RedisError, ResponseError

from service.metrics import Metrics
from service.redis_conn import RedisClient
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
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.stream = stream
        self.group = group
        self.dead_letter_stream = dead_letter_stream
        self.maxlen = maxlen
        self.dedup_ttl_s = dedup_ttl_s
        self.buffer: deque[dict[str, str]] = deque()
        self.buffer_size = buffer_size
        metrics.queue_capacity.set(buffer_size)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._script = client.register_script(_ADD_ONCE)
        self.connected = False

    async def start(self) -> None:
        try:
            await self.ensure_group()
        except RedisError as exc:
            log.warning("redis unreachable at start (%s); flagged samples will be buffered", exc)
        self._task = asyncio.create_task(self._run(), name="flag-queue")

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.connected = True

    def put(self, sample: dict[str, Any], request_id: str) -> None:
        """Queue a sample; never blocks and never raises."""
        fields = {"request_id": request_id}
        for key, value in sample.items():
            fields[key] = value if isinstance(value, str) else json.dumps(value)
        if len(self.buffer) >= self.buffer_size:
            self.buffer.popleft()
            self.metrics.queue_dropped.inc()
        self.buffer.append(fields)
        self.metrics.queue_buffered.set(len(self.buffer))
        self._wake.set()

    async def _write(self, fields: dict[str, str]) -> None:
        args: list[str | int | float] = [self.dedup_ttl_s, self.maxlen, self.group, time.time()]
        for key, value in fields.items():
            args += [key, value]
        key = dedup_key(self.stream, fields["request_id"])
        added = await self._script(keys=[self.stream, key, self.dead_letter_stream], args=args)
        if added:
            self.metrics.queue_pushes.inc()
        else:
            self.metrics.queue_duplicates.inc()

    async def _run(self) -> None:
        delay = self.backoff_initial_s
        while True:
            if not self.buffer:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if not self.connected:
                    await self.ensure_group()
                    log.info(
                        "redis reachable again; draining %d buffered samples", len(self.buffer)
                    )
                await self._write(self.buffer[0])
                self.buffer.popleft()
                self.metrics.queue_buffered.set(len(self.buffer))
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
        while self.buffer and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return len(self.buffer)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.aclose()
