"""A real gRPC server standing in for the sidecar that keeps every batch the tap sends."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from wire import monitor_pb2 as pb
from wire import monitor_pb2_grpc as pb_grpc


class Recorder(pb_grpc.MonitorServicer):
    """A real gRPC server that keeps every batch the tap sends."""

    def __init__(self) -> None:
        self.batches: list[pb.StepBatch] = []
        self.lock = threading.Lock()

    def Ingest(self, request_iterator, context):  # type: ignore[no-untyped-def]
        n = 0
        for msg in request_iterator:
            with self.lock:
                self.batches.append(msg)
            n += 1
        return pb.IngestSummary(steps=n)


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    rec = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_MonitorServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield rec, f"127.0.0.1:{port}"
    server.stop(0)
