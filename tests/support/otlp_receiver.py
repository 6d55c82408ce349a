"""An OTLP/gRPC trace receiver in the test process: opentelemetry.proto.collector.trace.v1's
TraceService served with grpc.aio on a thread of its own (the protocol a collector speaks, so
the sidecar's exporter talks to it as to a real OpenTelemetry Collector)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    name: str
    trace_id: str  # 32 hex
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    start_ns: int
    end_ns: int


class OtlpTraceReceiver(ts_grpc.TraceServiceServicer):
    def __init__(self, fail: bool = False) -> None:
        self.spans: list[ReceivedSpan] = []
        self.exports = 0
        self.fail = fail  # answer UNAVAILABLE, as a collector that is down or overloaded
        self.lock = threading.Lock()

    async def Export(
        self, request: ts_pb.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> ts_pb.ExportTraceServiceResponse:
        self.exports += 1
        if self.fail:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused by the test")
        got = []
        for rs in request.resource_spans:
            res = {a.key: value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        ReceivedSpan(
                            str(res.get("service.name", "")),
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            {a.key: value(a.value) for a in s.attributes},
                            [
                                (e.name, {a.key: value(a.value) for a in e.attributes})
                                for e in s.events
                            ],
                            s.start_time_unix_nano,
                            s.end_time_unix_nano,
                        )
                    )
        with self.lock:
            self.spans += got
        return ts_pb.ExportTraceServiceResponse()

    def named(self, name: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.name == name]


@contextmanager
def otlp_trace_receiver(fail: bool = False) -> Iterator[tuple[OtlpTraceReceiver, int]]:
    """The receiver and its port on 127.0.0.1 (``http://127.0.0.1:PORT`` to an exporter)."""
    receiver = OtlpTraceReceiver(fail)
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    ready = threading.Event()

    async def serve() -> None:
        server = grpc.aio.server()
        ts_grpc.add_TraceServiceServicer_to_server(receiver, server)
        started["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        started["server"] = server
        ready.set()
        await server.wait_for_termination()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    if not ready.wait(10):
        raise AssertionError("the OTLP receiver did not start")
    try:
        yield receiver, int(started["port"])
    finally:
        stopping = asyncio.run_coroutine_threadsafe(started["server"].stop(0), loop)
        try:
            stopping.result(30)
        except TimeoutError:
            # grpc.aio can be slow to close a channel a client still holds open (vLLM's
            # exporter, mid-retry); the receiver is the test's own, and its thread a daemon.
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
