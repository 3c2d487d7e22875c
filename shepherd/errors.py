"""Turning domain failures into gRPC statuses that mean what google.rpc says they mean.

INVALID_ARGUMENT carries a google.rpc.BadRequest detail naming the field, so clients in any
language can point at it without parsing the message. UNAVAILABLE (the service cannot do it now,
e.g. its store cannot write, and a retry may succeed) carries a google.rpc.RetryInfo saying when
to try again.
"""

from __future__ import annotations

from datetime import timedelta
from typing import NoReturn

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from shepherd.validation import InvalidField


async def abort_invalid(context: grpc.aio.ServicerContext[object, object], error: InvalidField) -> NoReturn:
    detail = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.problem)
        ]
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(error))
    status.details.add().Pack(detail)
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable: abort_with_status raises")


async def abort_unavailable(
    context: grpc.aio.ServicerContext[object, object], message: str, *, retry_after_s: float = 1.0
) -> NoReturn:
    detail = error_details_pb2.RetryInfo()
    detail.retry_delay.FromTimedelta(timedelta(seconds=retry_after_s))
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message)
    status.details.add().Pack(detail)
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable: abort_with_status raises")


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
