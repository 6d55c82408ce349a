"""Streams step batches to the sidecar from a background thread; never blocks the engine.

A bounded queue sits between the engine step and the stream. When it is full, or the sidecar is
away, steps are dropped and counted by reason; the cumulative counts ride along in every batch, so
the sidecar reports them once it is reachable again.

The channel is plaintext to a Unix socket (its permissions guard it) and to a TCP address
without ``MISALIGN_TAP_TLS_CA``; with it, TLS verified against that CA, presenting the tap's own
certificate (``MISALIGN_TAP_TLS_CERT``/``_KEY``), which a sidecar with ``tls_client_ca`` requires for
``Ingest`` over TCP.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from detectors.bundle import Bundle
from tap.settings import TapSettings
from wire import monitor_pb2 as pb
from wire import monitor_pb2_grpc as pb_grpc
from wire import trace_context
from wire.codec import set_drops, step_batch

log = logging.getLogger(__name__)


def _client_id(request_id: str) -> str:
    """vLLM makes its internal id as ``f"{client_id}-{8 random hex}"``; undo that."""
    head, sep, tail = request_id.rpartition("-")
    if sep and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail):
        return head
    return request_id


@dataclass(frozen=True, slots=True)
class _Step:
    """One engine step's rows as the engine thread hands them over."""

    step: int
    req_ids: list[str]
    offsets: np.ndarray
    positions: np.ndarray
    token_ids: Any
    roles: np.ndarray
    proj: Any  # an array, or a host tensor (as are token_ids, applied) complete once ``ready`` is
    labels: list[str] | None
    applied: Any
    ready: Any = None  # a device event, None when the arrays are complete


def _rows(item: _Step | pb.StepBatch) -> int:
    return len(item.roles) if isinstance(item, _Step) else len(item.is_response)


class Publisher:
    def __init__(self, settings: TapSettings, bundle: Bundle, model_name: str) -> None:
        self.settings = settings
        self.bundle_id = bundle.bundle_id
        self.k = bundle.k
        self.model_name = model_name
        self.sender_id = f"tap-{uuid.uuid4().hex[:12]}"
        self.queue: queue.Queue[_Step | pb.StepBatch] = queue.Queue(maxsize=settings.queue_size)
        self.rows_dropped: Counter[str] = Counter()
        self.steps_dropped: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._step = 0
        self.connected = False
        self.traceparents_refused = 0
        self._in_flight: _Step | pb.StepBatch | None = None
        self._credentials = settings.channel_credentials()
        self._thread = threading.Thread(
            target=self._run, name="misalign-tap-publisher", daemon=True
        )
        self._thread.start()

    def count_drop(self, rows: int, reason: str) -> None:
        with self._lock:
            self.rows_dropped[reason] += rows
            self.steps_dropped[reason] += 1

    def submit(
        self,
        req_ids: list[str],
        offsets: np.ndarray,
        positions: np.ndarray,
        token_ids: Any,
        roles: np.ndarray,
        proj: Any,
        labels: list[str] | None = None,
        applied: Any = None,
        ready: Any = None,
    ) -> None:
        """Called on the engine's thread: hand the step's arrays over (the publisher thread
        builds the message), or drop them. The arrays must be the caller's own copies;
        ``token_ids``, ``proj`` and ``applied`` may be host tensors that a device copy fills
        until the event ``ready`` (the publisher thread waits for it).

        ``labels`` (per request) and ``applied`` (per row, nonzero where mitigated) describe
        mitigation, if any."""
        self._step += 1
        self._put(
            _Step(
                self._step,
                req_ids,
                offsets,
                positions,
                token_ids,
                roles,
                proj,
                labels,
                applied,
                ready,
            )
        )

    def _build(self, item: _Step | pb.StepBatch) -> pb.StepBatch:
        if not isinstance(item, _Step):
            return item  # a finish notice, built by the scheduler's thread
        if item.ready is not None:
            item.ready.synchronize()
        return step_batch(
            self.bundle_id,
            self.k,
            step=item.step,
            sender_id=self.sender_id,
            request_ids=item.req_ids,
            offsets=item.offsets,
            positions=item.positions,
            token_ids=item.token_ids,
            roles=item.roles,
            projections=item.proj,
            activated=True,
            mitigation=item.labels or (),
            mitigated=item.applied,
        )

    def finish(
        self, request_id: str, reason: str, adapter: str = "", traceparent: str | None = None
    ) -> None:
        """A request ended (called by the scheduler, after its last step was submitted).

        ``adapter``: the LoRA adapter that served it, "" the base model. ``traceparent``: the
        request's W3C header as it arrived; only its normalised form goes on
        (``wire.trace_context``), or ``refused`` in place of a value that is not one."""
        self._step += 1
        client_id = _client_id(request_id)
        trace = trace_context.normalise(traceparent)
        if trace == trace_context.REFUSED:
            self.traceparents_refused += 1
            if self.traceparents_refused == 1:
                log.warning(
                    "misalign tap: request %s arrived with a traceparent that is not W3C Trace "
                    "Context; sent on as 'refused' (counted by the sidecar), never as it came",
                    client_id[:64],
                )
        msg = step_batch(
            self.bundle_id,
            self.k,
            step=self._step,
            sender_id=self.sender_id,
            finished=[
                pb.FinishedRequest(
                    request_id=request_id,
                    client_request_id=client_id,
                    model=self.model_name,
                    model_version=self.settings.model_version,
                    finish_reason=reason,
                    adapter=adapter,
                    traceparent=trace,
                )
            ],
        )
        self._put(msg)

    def heartbeat(self) -> None:
        """An empty batch, so the drop counts reach the sidecar when no step carries them
        (the tap's self-check, when the engine serves steps the tap does not capture)."""
        self._step += 1
        self._put(step_batch(self.bundle_id, self.k, step=self._step, sender_id=self.sender_id))

    def _put(self, item: _Step | pb.StepBatch) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.count_drop(_rows(item), "queue_full")

    def _with_drops(self, msg: pb.StepBatch) -> pb.StepBatch:
        with self._lock:
            return set_drops(msg, self.rows_dropped, self.steps_dropped)

    def _messages(self, stop: threading.Event) -> Iterator[pb.StepBatch]:
        while not stop.is_set():
            try:
                msg = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            self._in_flight = msg
            yield self._with_drops(self._build(msg))
            self._in_flight = None

    def _drain_as_dropped(self, reason: str) -> None:
        while True:
            try:
                msg = self.queue.get_nowait()
            except queue.Empty:
                return
            self.count_drop(_rows(msg), reason)

    def _channel(self) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(self.settings.sidecar)
        name = self.settings.tls_server_name
        opts = [("grpc.ssl_target_name_override", name)] if name else []
        return grpc.secure_channel(self.settings.sidecar, self._credentials, options=opts)

    def _run(self) -> None:
        target = self.settings.sidecar
        delay = 0.05
        while True:
            channel = self._channel()
            try:
                grpc.channel_ready_future(channel).result(timeout=max(delay, 0.2))
            except grpc.FutureTimeoutError:
                if self.connected:
                    log.warning(
                        "misalign tap: sidecar %s unreachable; dropping and counting", target
                    )
                self.connected = False
                self._drain_as_dropped("sidecar_unavailable")
                channel.close()
                time.sleep(delay)
                delay = min(delay * 2, self.settings.backoff_max_s)
                continue
            self.connected = True
            delay = 0.05
            stop = threading.Event()
            try:
                pb_grpc.MonitorStub(channel).Ingest(self._messages(stop))
            except grpc.RpcError as exc:
                log.warning("misalign tap: stream to %s ended (%s)", target, exc.code())
                if self._in_flight is not None:
                    self.count_drop(_rows(self._in_flight), "sidecar_unavailable")
                    self._in_flight = None
            finally:
                stop.set()
                self.connected = False
                channel.close()
