"""Binds a request id and the RPC name into structlog's context for the whole call, so every
log line a request causes, in any module, can be found by that id.

The id comes from the caller's `x-request-id` metadata when present (a mesh or scheduler can
propagate its own), otherwise a new one is made; it is echoed back in trailing metadata. The
wrapped handler is built once per method and reused: wrapping per call costs CPU on every RPC.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog

REQUEST_ID_HEADER = "x-request-id"


def _bind(context: Any, rpc: str) -> None:
    request_id = ""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and value:
            request_id = str(value)[:128]
            break
    request_id = request_id or uuid.uuid4().hex
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id, rpc=rpc)
    context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))


def _wrap(handler: grpc.RpcMethodHandler, rpc: str) -> grpc.RpcMethodHandler:
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            _bind(context, rpc)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream and not inspect.isasyncgenfunction(handler.unary_stream):
        # A streaming handler that writes through context.write() instead of yielding, such as
        # grpc.health.v1's Watch: awaited, not iterated (iterating it broke every Watch call).
        inner_uw = handler.unary_stream

        async def unary_stream_writer(request: Any, context: Any) -> None:
            _bind(context, rpc)
            await inner_uw(request, context)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream_writer, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> Any:
            _bind(context, rpc)
            async for item in inner_us(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    return handler


class RequestContextInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        rpc = handler_call_details.method
        wrapped = self._wrapped.get(rpc)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return handler
            wrapped = self._wrapped[rpc] = _wrap(handler, rpc)
        return wrapped
