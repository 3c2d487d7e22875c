"""Turning domain failures into gRPC statuses that mean what google.rpc says they mean.

INVALID_ARGUMENT carries a google.rpc.BadRequest detail naming the field, so clients in any
language can point at it without parsing the message. RESOURCE_EXHAUSTED from a rate limit and
UNAVAILABLE (the service cannot do it now, e.g. its store cannot write, and a retry may succeed)
carry a google.rpc.RetryInfo saying when to try again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from shepherd.validation import InvalidField

# Status messages and details travel in trailing metadata, which peers cap (8 KiB by default): a
# field path or problem quoting a huge input must not turn a precise refusal into a broken call.
MAX_FIELD_LEN = 512
MAX_PROBLEM_LEN = 1024
MAX_VIOLATIONS = 8


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def abort_invalid(context: grpc.aio.ServicerContext[object, object], error: InvalidField) -> NoReturn:
    await abort_fields(context, code_pb2.INVALID_ARGUMENT, [error])


async def abort_fields(
    context: grpc.aio.ServicerContext[object, object], code: int, errors: Sequence[InvalidField]
) -> NoReturn:
    """Abort with `code` (a google.rpc.Code) and a BadRequest naming each field; the message is the
    first error's."""
    violations = [
        error_details_pb2.BadRequest.FieldViolation(
            field=_short(e.field, MAX_FIELD_LEN), description=_short(e.problem, MAX_PROBLEM_LEN)
        )
        for e in errors[:MAX_VIOLATIONS]
    ]
    first = violations[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    status = status_pb2.Status(code=code, message=f"{first.field}: {first.description}{more}")
    status.details.add().Pack(error_details_pb2.BadRequest(field_violations=violations))
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable: abort_with_status raises")


async def abort_exhausted(context: Any, message: str, *, retry_after_s: float | None = None) -> NoReturn:
    await _abort_retryable(context, code_pb2.RESOURCE_EXHAUSTED, message, retry_after_s)


async def abort_unavailable(context: Any, message: str, *, retry_after_s: float = 1.0) -> NoReturn:
    await _abort_retryable(context, code_pb2.UNAVAILABLE, message, retry_after_s)


async def _abort_retryable(context: Any, code: int, message: str, retry_after_s: float | None) -> NoReturn:
    status = status_pb2.Status(code=code, message=message)
    if retry_after_s is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromNanoseconds(max(1, int(retry_after_s * 1e9)))
        status.details.add().Pack(info)
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable: abort_with_status raises")


def retry_delay_s(err: grpc.aio.AioRpcError) -> float | None:
    """The delay a RetryInfo detail of a failed call asks for, for clients and tests."""
    status = rpc_status.from_call(err)
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


def field_violation(err: grpc.aio.AioRpcError) -> str | None:
    """The field named by a BadRequest detail of a failed call, for clients and tests."""
    status = rpc_status.from_call(err)
    if status is None:
        return None
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad) and bad.field_violations:
            return str(bad.field_violations[0].field)
    return None
