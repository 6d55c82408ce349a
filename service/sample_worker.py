"""Flagged samples built off the event loop.

Building a flagged sample detokenises its text and redacts it (service/redaction.py): work that
grows with the request's length, and that an end user chooses the input of. On the event loop it
would stall health checks and every ingest stream while it runs; here it runs on a thread of its
own and the sample is handed to the flag queue back on the loop. A thread, not a process: the
built-in patterns make each regular-expression call short (linear, over a bounded text), and the
thread gives the loop the GIL back between them.

At most ``backlog`` samples wait to be built; past that the oldest waiting is dropped and
counted in ``misalign_queue_dropped_total{stage="build"}``, as the flag queue drops its oldest when full.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable

from service.flags import FlagQueue
from service.metrics import Metrics

log = logging.getLogger(__name__)

Build = Callable[[], dict[str, str]]  # a flagged sample as its stream entry


class SampleWorker:
    def __init__(self, queue: FlagQueue, metrics: Metrics, backlog: int) -> None:
        self.queue = queue
        self.metrics = metrics
        self.backlog = backlog
        self._loop = asyncio.get_running_loop()
        self._todo: deque[tuple[Build, str]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._pending = 0  # submitted, not yet handed to the queue (event loop side)
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="misalign-samples", daemon=True)
        self._thread.start()

    def submit(self, build: Build, request_id: str) -> None:
        with self._cv:
            dropped = len(self._todo) >= self.backlog
            if dropped:
                self._todo.popleft()
            self._todo.append((build, request_id))
            self._cv.notify()
        if dropped:
            self.metrics.queue_dropped_build.inc()
        else:
            self._pending += 1
        self._idle.clear()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._todo and not self._closed:
                    self._cv.wait()
                if not self._todo:
                    return
                build, request_id = self._todo.popleft()
            sample: dict[str, str] | None = None
            failed: Exception | None = None
            try:
                # built and encoded here: a long request's token lists cost milliseconds to
                # encode, kept off the loop
                sample = build()
            except Exception as exc:
                failed = exc
            try:
                self._loop.call_soon_threadsafe(self._done, sample, request_id, failed)
            except RuntimeError:  # the loop is closed: the sidecar stopped without drain()
                return

    def _done(
        self, sample: dict[str, str] | None, request_id: str, failed: Exception | None
    ) -> None:
        self._pending -= 1
        if not self._pending:
            self._idle.set()
        if sample is None:
            # a bug, not an input; the request's text stays out of the log
            log.error("could not build the flagged sample of a request", exc_info=failed)
            self.metrics.sample_failures.inc()
            return
        self.queue.put(sample, request_id)

    @property
    def pending(self) -> int:
        return self._pending

    async def built(self) -> None:
        """Wait until every sample submitted so far is in the flag queue."""
        await self._idle.wait()

    async def drain(self) -> None:
        """Wait for every sample submitted to reach the queue, then stop the thread."""
        await self._idle.wait()
        with self._cv:
            self._closed = True
            self._cv.notify()
