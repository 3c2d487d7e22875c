"""Every call passes here before its handler: a request id bound into the log context, then the
caller's identity, the policy's decision, and the resource bounds.

The request id comes from the caller's `x-request-id` metadata when present (a mesh or scheduler
can propagate its own), otherwise a new one is made; it is echoed back in trailing metadata and
bound, with the RPC name and the caller's identity, into every log line the call causes.

Order per call: authenticate (UNAUTHENTICATED), authorize (PERMISSION_DENIED naming the identity
and the RPC, logged), then the bounds (RESOURCE_EXHAUSTED): open streams per identity and in
total, unary calls in flight, and the launch rate per identity (with a google.rpc.RetryInfo).
Open RPCs (health, reflection) skip all of it. The wrapped handler is built once per method and
reused, and what it needs to know about its method (open? rate-limited? streaming?) is decided
then: per call, the checks are a few dict lookups.

Then the request itself: bytes that do not decode as the method's message are INVALID_ARGUMENT
(left to grpc, the decoder's exception becomes UNKNOWN), and so are enum fields holding numbers
their enums do not define (validation.check_enums). Done here, for every method of every service,
no handler can forget a field.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog

from shepherd import metrics
from shepherd.authn import Authenticator, Unauthenticated, Unavailable
from shepherd.authz import Policy
from shepherd.errors import abort_exhausted, abort_invalid
from shepherd.limits import LaunchRate, StreamSlots
from shepherd.logging import get_logger
from shepherd.validation import InvalidField, check_enums

REQUEST_ID_HEADER = "x-request-id"
ANONYMOUS = "anonymous"
# A denied caller that keeps trying is logged once per (identity, RPC) per this many seconds.
_DENIAL_LOG_EVERY_S = 10.0

# How many launches a call makes: the RPCs the launch rate applies to.
LAUNCH_COST: dict[str, Callable[[Any], int]] = {
    "/shepherd.v1.LauncherService/LaunchTask": lambda _request: 1,
    "/shepherd.v1.LauncherService/BatchLaunchTasks": lambda request: len(request.requests),
}


@dataclass
class Guard:
    """What the interceptor enforces; one per server. `authenticator` None: plaintext, where
    nobody can be identified, so every caller is `anonymous` and the policy is not consulted."""

    authenticator: Authenticator | None
    policy: Policy
    streams: StreamSlots
    max_inflight_unary: int
    launch_rate: LaunchRate
    inflight_unary: int = 0
    _denials_logged: dict[tuple[str, str], float] = field(default_factory=dict)

    async def admit(self, context: Any, rpc: str) -> str:
        """The caller's identity, if it may call `rpc`; otherwise the call is aborted."""
        if self.authenticator is None:
            return ANONYMOUS
        try:
            identity = await self.authenticator.identify(context)
        except Unauthenticated as err:
            metrics.refused[metrics.Refusal.UNAUTHENTICATED].inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{rpc}: {err}")
            raise AssertionError("unreachable: abort raises") from None
        except Unavailable as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
            raise AssertionError("unreachable: abort raises") from None
        if not self.policy.allows(identity, rpc):
            metrics.refused[metrics.Refusal.PERMISSION_DENIED].inc()
            self._log_denial(identity, rpc)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{identity} may not call {rpc}")
        return identity

    def _log_denial(self, identity: str, rpc: str) -> None:
        now = time.monotonic()
        key = (identity, rpc)
        if now - self._denials_logged.get(key, -_DENIAL_LOG_EVERY_S) < _DENIAL_LOG_EVERY_S:
            return
        if len(self._denials_logged) > 10_000:
            self._denials_logged.clear()
        self._denials_logged[key] = now
        get_logger(component="authz").warning("permission denied", caller=identity, rpc=rpc)


def _request_id(context: Any) -> str:
    """The caller's request id (or a new one), echoed in the trailing metadata."""
    request_id = ""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and value:
            request_id = str(value)[:128]
            break
    request_id = request_id or uuid.uuid4().hex
    context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
    return request_id


def _bind(request_id: str, rpc: str, caller: str | None = None) -> None:
    structlog.contextvars.clear_contextvars()
    if caller is None:
        structlog.contextvars.bind_contextvars(request_id=request_id, rpc=rpc)
    else:
        structlog.contextvars.bind_contextvars(request_id=request_id, rpc=rpc, caller=caller)


class _Undecodable:
    """Stands in for a request whose bytes did not decode, so the call is refused properly."""

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


async def _check_request(request: Any, context: Any, rpc: str) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {rpc} message: {request.problem}"
        )
    try:
        check_enums(request)
    except InvalidField as err:
        await abort_invalid(context, err)


async def _admit(guard: Guard, guarded: bool, request: Any, context: Any, rpc: str) -> str | None:
    """Bind the call's log context and check its caller and request; the identity of a guarded call."""
    request_id = _request_id(context)
    if not guarded:
        _bind(request_id, rpc)
        await _check_request(request, context, rpc)
        return None
    identity = await guard.admit(context, rpc)
    _bind(request_id, rpc, identity)
    await _check_request(request, context, rpc)
    return identity


@contextlib.asynccontextmanager
async def _stream_slot(guard: Guard, identity: str | None, context: Any) -> AsyncIterator[None]:
    """Hold one of the caller's stream slots for the life of a server stream (none when open)."""
    if identity is None:
        yield
        return
    refused = guard.streams.acquire(identity)
    if refused is not None:
        metrics.refused[metrics.Refusal.TOO_MANY_STREAMS].inc()
        await abort_exhausted(context, refused)
    try:
        yield
    finally:
        guard.streams.release(identity)


def _wrap(handler: grpc.RpcMethodHandler, rpc: str, guard: Guard) -> grpc.RpcMethodHandler:
    guarded = not guard.policy.is_open(rpc)
    cost = LAUNCH_COST.get(rpc)
    decode = _tolerant(handler.request_deserializer)
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            identity = await _admit(guard, guarded, request, context, rpc)
            if identity is None:
                return await inner_uu(request, context)
            if guard.inflight_unary >= guard.max_inflight_unary:
                metrics.refused[metrics.Refusal.TOO_MANY_INFLIGHT].inc()
                await abort_exhausted(
                    context, f"{guard.inflight_unary} calls in flight (at most {guard.max_inflight_unary})"
                )
            if cost is not None:
                wait_s = guard.launch_rate.take(identity, cost(request))
                if wait_s:
                    metrics.refused[metrics.Refusal.RATE_LIMITED].inc()
                    await abort_exhausted(
                        context,
                        f"{identity} launches faster than {guard.launch_rate.rate:g}/s; "
                        f"retry in {wait_s:.2f}s",
                        retry_after_s=wait_s,
                    )
            guard.inflight_unary += 1
            try:
                return await inner_uu(request, context)
            finally:
                guard.inflight_unary -= 1

        return grpc.unary_unary_rpc_method_handler(unary_unary, decode, handler.response_serializer)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            identity = await _admit(guard, guarded, request, context, rpc)
            async with _stream_slot(guard, identity, context):
                async for item in inner_us(request, context):
                    yield item

        async def unary_stream_writer(request: Any, context: Any) -> None:
            identity = await _admit(guard, guarded, request, context, rpc)
            async with _stream_slot(guard, identity, context):
                await inner_us(request, context)

        # A streaming handler either yields its messages (ours) or writes them with context.write()
        # and returns nothing (grpc_health's Watch): the wrapper must be of the same kind, since
        # grpc.aio tells them apart by the function it is given.
        wrapper = unary_stream if inspect.isasyncgenfunction(inner_us) else unary_stream_writer
        return grpc.unary_stream_rpc_method_handler(wrapper, decode, handler.response_serializer)
    return _client_streaming(handler, rpc, guard, guarded, decode)


def _client_streaming(
    handler: grpc.RpcMethodHandler,
    rpc: str,
    guard: Guard,
    guarded: bool,
    decode: Callable[[bytes], Any] | None,
) -> grpc.RpcMethodHandler:
    """Client-streaming methods (none of Shepherd's own; server reflection is one): authenticated
    and authorized unless open, every message checked, not bounded."""

    async def start(context: Any) -> None:
        request_id = _request_id(context)
        _bind(request_id, rpc, await guard.admit(context, rpc) if guarded else None)

    async def checked(requests: Any, context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            await _check_request(request, context, rpc)
            yield request

    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            await start(context)
            return await inner_su(checked(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, decode, handler.response_serializer)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        await start(context)
        async for item in inner_ss(checked(requests, context), context):
            yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, decode, handler.response_serializer)


class RequestContextInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, guard: Guard) -> None:
        self._guard = guard
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
            wrapped = self._wrapped[rpc] = _wrap(handler, rpc, self._guard)
        return wrapped
