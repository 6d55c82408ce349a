"""What the fault tests share: a load feeder on its own thread and reporting figures.

Figures are printed (`pytest -s` shows them) and, when ``MISALIGN_FAULT_FIGURES`` names a file,
appended to it as JSON lines, the source of the table in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable

import grpc

from bench.steady_load import EngineLoad
from tests.support.polling import wait_until
from wire import monitor_pb2_grpc as pb_grpc


class Feeder:
    """An Ingest stream from a gRPC client, fed by an EngineLoad, on a thread of its own."""

    def __init__(self, address: str, load: EngineLoad, steps_per_s: float) -> None:
        self.load = load
        self.error: grpc.RpcError | None = None
        self._channel = grpc.insecure_channel(address)
        stub = pb_grpc.MonitorStub(self._channel)

        def run() -> None:
            try:
                stub.Ingest(load.steps(steps_per_s), timeout=600)
            except grpc.RpcError as exc:
                self.error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def finish(self, timeout: float = 60) -> None:
        """Start no new requests, let the running ones finish, end the stream."""
        self.load.stop()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load did not drain"
        self._channel.close()
        assert self.error is None, f"the Ingest stream failed: {self.error}"


def report(fault: str, **figures: object) -> None:
    line = json.dumps({"fault": fault, **figures})
    print(f"FIGURES {line}")
    path = os.environ.get("MISALIGN_FAULT_FIGURES")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")


def settled(metrics: Callable[[], dict[str, float]], load: EngineLoad) -> dict[str, float]:
    """Once the feeder has finished: wait until the sidecar scored every finished request and its
    flag buffer is empty, and return its metrics then."""
    wait_until(
        lambda: metrics()["misalign_requests_scored_total"] == len(load.finished),
        30,
        "every finished request scored",
    )
    wait_until(lambda: metrics()["misalign_queue_buffered"] == 0, 30, "the buffer empty")
    return metrics()
