"""Server errors as an operator should read them: the code, the message and each bad field.

The services answer bad input with INVALID_ARGUMENT and a google.rpc.BadRequest naming every
field at fault, and rate limits with a google.rpc.RetryInfo; a stack trace would hide both.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def describe_rpc_error(err: grpc.RpcError) -> list[str]:
    """`INVALID_ARGUMENT: ...` then one `  field: problem` line per violation."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    lines = [f"{code.name}: {details}"]
    status = None
    try:
        status = rpc_status.from_call(err)
    except ValueError:
        status = None  # a status whose message disagrees with the details; the plain text will do
    for detail in status.details if status is not None else ():
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(bad):
            lines += [f"  {v.field}: {v.description}" for v in bad.field_violations]
            if len(bad.field_violations) == 1 and details == f"{lines[-1].strip()}":
                del lines[-1]  # the message already is the one violation, field name first
        elif detail.Unpack(retry):
            delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
            lines.append(f"  retry after {delay:.1f}s")
    return lines
