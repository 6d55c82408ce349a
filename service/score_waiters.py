"""Long-polled score lookups: a caller asks for a request's score and waits, up to a bound, for it
to be scored, instead of asking again and again.

Each waiter is one future under the id it asked for; the monitor's ``on_scored`` hook wakes the
waiters of every id a scored request answers to. Memory is bounded by ``score_waiters_max``
(one more caller is refused, and counted), and a waiter's entry goes when it returns, times out
or its caller leaves, so ids asked for and never scored leave nothing behind.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable

from detectors.errors import BadInput
from service.metrics import Metrics
from service.monitor import Monitor
from wire import monitor_pb2 as pb

MAX_ID_CHARS = 1024  # longer than any id vLLM makes; a longer one is refused, not looked up
# vLLM's OpenAI-compatible server names a request "chatcmpl-<X-Request-Id>" (completions:
# "cmpl-"); Monitor.lookup accepts the bare X-Request-Id for both, so a waiter does too.
_PREFIXES = ("chatcmpl-", "cmpl-")


class WaitersFull(Exception):
    """``score_waiters_max`` callers are waiting already."""


class ShuttingDown(Exception):
    """The sidecar is stopping: a waiter is answered now (ask another replica, or again)."""


def _keys(request_id: str) -> set[str]:
    """The ids a caller may have asked for to get this request's score."""
    keys = {request_id}
    for p in _PREFIXES:
        if request_id.startswith(p):
            keys.add(request_id[len(p) :])
    return keys


class ScoreWaiters:
    def __init__(self, monitor: Monitor, metrics: Metrics, max_wait_s: float, limit: int) -> None:
        self.monitor = monitor
        self.max_wait_s = max_wait_s
        self.limit = limit
        self._outcome = {
            o: metrics.score_waits.labels(o) for o in ("scored", "timeout", "cancelled", "refused")
        }
        self._gauge = metrics.score_waiters
        self._by_key: dict[str, list[asyncio.Future[None]]] = {}
        self._count = 0
        self._closed = False
        monitor.on_scored = self.notify

    def __len__(self) -> int:
        """Callers waiting now."""
        return self._count

    @property
    def keys_held(self) -> int:
        """Distinct ids waited on now (tests: nothing is left behind)."""
        return len(self._by_key)

    def check(self, request_id: str, wait_s: float) -> None:
        """A caller's request id and wait, refused with a message naming the field."""
        if not request_id:
            raise BadInput(
                "request_id", "request_id: empty; expected the id the tap sent or X-Request-Id"
            )
        if len(request_id) > MAX_ID_CHARS:
            raise BadInput(
                "request_id", f"request_id: {len(request_id)} characters, at most {MAX_ID_CHARS}"
            )
        if not math.isfinite(wait_s) or wait_s < 0:
            raise BadInput("wait_s", f"wait_s: {wait_s!r}; expected seconds >= 0")
        if wait_s > self.max_wait_s:
            raise BadInput(
                "wait_s",
                f"wait_s: {wait_s:g} s is more than score_wait_max_s ({self.max_wait_s:g} s)",
            )

    async def get(self, request_id: str, wait_s: float) -> pb.RequestScore | None:
        """The score of ``request_id``, waiting up to ``wait_s`` for it; None if not scored by
        then. Raises ``BadInput`` (request id, wait) and ``WaitersFull``."""
        self.check(request_id, wait_s)
        hit = self.monitor.lookup(request_id)
        if hit is not None or wait_s == 0:
            return hit
        if self._count >= self.limit:
            self._outcome["refused"].inc()
            raise WaitersFull(
                f"{self._count} callers wait for scores already (score_waiters_max); "
                "ask again later or with wait_s 0"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        outcome = "cancelled"
        try:
            while hit is None:
                if self._closed:
                    outcome = "timeout"  # answered early, without the score
                    raise ShuttingDown("the sidecar is shutting down; ask again (another replica)")
                left = deadline - loop.time()
                if left <= 0:
                    outcome = "timeout"
                    return None
                await self._wait(request_id, left, loop)
                # Woken by a score under one of its ids (or timed out): the lookup decides.
                hit = self.monitor.lookup(request_id)
            outcome = "scored"
            return hit
        finally:
            self._outcome[outcome].inc()

    async def _wait(self, key: str, timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        fut: asyncio.Future[None] = loop.create_future()
        waiting = self._by_key.setdefault(key, [])
        waiting.append(fut)
        self._count += 1
        self._gauge.inc()
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            self._count -= 1
            self._gauge.dec()
            # notify() pops the whole list when it wakes it; otherwise take this one out.
            rest = self._by_key.get(key)
            if rest is not None:
                if fut in rest:
                    rest.remove(fut)
                if not rest:
                    del self._by_key[key]

    def not_found(self, request_id: str, wait_s: float) -> str:
        waited = f" within {wait_s:g} s" if wait_s else ""
        return (
            f"request_id {request_id!r}: not scored{waited} (unknown, not finished, or older "
            f"than the last {self.monitor.recent_limit} scores kept)"
        )

    def close(self) -> None:
        """Answer every waiter now, and any later caller at once (shutdown)."""
        self._closed = True
        for futs in self._by_key.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)
        self._by_key.clear()

    def notify(self, ids: Iterable[str]) -> None:
        """Wake the waiters of these ids (request and client ids of requests just scored)."""
        if not self._by_key:
            return  # the scoring path pays one check when nobody waits
        for rid in ids:
            if not rid:
                continue
            for key in _keys(rid):
                for fut in self._by_key.pop(key, ()):
                    if not fut.done():
                        fut.set_result(None)
