"""Bytes that are not a valid protobuf get INVALID_ARGUMENT, not grpc's generic UNKNOWN.

grpc decodes a request with the handler's deserializer before any servicer code runs, and a
``DecodeError`` there reaches the client as ``UNKNOWN: Unexpected <class ...DecodeError>``. This
interceptor takes decoding over: the handler receives the raw bytes, decodes them with the same
deserializer, and refuses what does not decode with INVALID_ARGUMENT naming the message type,
counted in ``misalign_ingest_errors_total{rpc, reason="malformed"}``.

It also refuses, with RESOURCE_EXHAUSTED, a message over ``max_message_bytes``, counted with
``reason="too_large"``: grpc's own limit is set to twice that (``receive_limit``) so that such a
message reaches this check instead of being refused by grpc unseen. One over twice the limit is
still refused by grpc itself, uncounted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from service.metrics import Metrics


def receive_limit(max_message_bytes: int) -> int:
    return min(2 * max_message_bytes, 2**31 - 1)


class MalformedMessageInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, service_prefix: str, max_message_bytes: int) -> None:
        self.metrics = metrics
        self.prefix = service_prefix  # only this service's methods: health and reflection as is
        self.max_bytes = max_message_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        decode = getattr(handler, "request_deserializer", None) if handler else None
        if decode is None or not method.startswith(self.prefix):
            return handler
        rpc = method.rsplit("/", 1)[-1]

        async def parse(data: bytes, context: grpc.aio.ServicerContext) -> Any:
            if len(data) > self.max_bytes:
                self.metrics.ingest_errors.labels(rpc, "too_large").inc()
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{rpc}: a message of {len(data)} bytes, over max_message_bytes "
                    f"({self.max_bytes})",
                )
            try:
                return decode(data)
            except DecodeError as exc:
                self.metrics.ingest_errors.labels(rpc, "malformed").inc()
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{rpc}: {len(data)} bytes that are not a valid protobuf message ({exc})",
                )

        ser = handler.response_serializer
        if handler.request_streaming:

            async def requests(
                it: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                async for data in it:
                    yield await parse(data, context)

            if handler.response_streaming:
                inner_ss = handler.stream_stream

                def stream_stream(it: AsyncIterator[bytes], context: Any) -> Any:
                    return inner_ss(requests(it, context), context)

                return grpc.stream_stream_rpc_method_handler(stream_stream, None, ser)
            inner_su = handler.stream_unary

            async def stream_unary(it: AsyncIterator[bytes], context: Any) -> Any:
                return await inner_su(requests(it, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, None, ser)
        if handler.response_streaming:
            inner_us = handler.unary_stream

            async def unary_stream(data: bytes, context: Any) -> AsyncIterator[Any]:
                async for out in inner_us(await parse(data, context), context):
                    yield out

            return grpc.unary_stream_rpc_method_handler(unary_stream, None, ser)
        inner_uu = handler.unary_unary

        async def unary_unary(data: bytes, context: Any) -> Any:
            return await inner_uu(await parse(data, context), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, None, ser)
