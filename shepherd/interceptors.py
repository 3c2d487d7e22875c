"""Binds a request id and the RPC name into structlog's context for the whole call, so every
log line a request causes, in any module, can be found by that id.

Requests whose bytes do not decode as the method's message are answered INVALID_ARGUMENT here, for
every method of every service: left to grpc, the decoder's exception becomes UNKNOWN.

The id comes from the caller's `x-request-id` metadata when present (a mesh or scheduler can
propagate its own), otherwise a new one is made; it is echoed back in trailing metadata. The
wrapped handler is built once per method and reused: wrapping per call costs CPU on every RPC.
"""

from __future__ import annotations

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


class _Undecodable:
    """Stands in for a request whose bytes did not decode, so the handler can refuse it properly."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    decode = deserializer

    def tolerant(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception as err:  # DecodeError, or anything else a decoder raises on bad bytes
            return _Undecodable(str(err)[:200])

    return tolerant


async def _refuse_undecodable(context: Any, request: Any, rpc: str) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {rpc} message: {request.problem}"
        )


def _wrap(handler: grpc.RpcMethodHandler, rpc: str) -> grpc.RpcMethodHandler:
    decode = _tolerant(handler.request_deserializer)
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            _bind(context, rpc)
            await _refuse_undecodable(context, request, rpc)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, decode, handler.response_serializer)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> Any:
            _bind(context, rpc)
            await _refuse_undecodable(context, request, rpc)
            async for item in inner_us(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, decode, handler.response_serializer)
    if handler.stream_stream:  # server reflection
        inner_ss = handler.stream_stream

        async def stream_stream(requests: Any, context: Any) -> Any:
            _bind(context, rpc)

            async def checked() -> Any:
                async for request in requests:
                    await _refuse_undecodable(context, request, rpc)
                    yield request

            async for item in inner_ss(checked(), context):
                yield item

        return grpc.stream_stream_rpc_method_handler(stream_stream, decode, handler.response_serializer)
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
