"""Serving a cursor log as a gRPC server stream: the one place the three Watch* RPCs share.

Each Watch* request says where to start: after a cursor (0: the oldest entry still retained), or
at the head ("from now": only entries appended later). The stream's headers go out at once, so a
client knows it is subscribed even when there is nothing to send yet (grpc.aio otherwise sends
them with the first message). A cursor the log no longer serves (pruned by the retention, from an
earlier run, or ahead of the log) ends the stream with OUT_OF_RANGE, naming the field and the
oldest cursor still available, so a client can re-sync (snapshot, then follow from its cursor).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

import grpc

from shepherd.errors import abort_invalid
from shepherd.eventlog import CursorLog, CursorOutOfRange, follow
from shepherd.validation import InvalidField

T = TypeVar("T")

CURSOR_FIELD = "after_cursor"
HEAD_FIELD = "start_at_head"


async def start_cursor(log: CursorLog[Any], request: Any, context: Any) -> int:
    """Where a Watch* request starts: its after_cursor, or the log's head for start_at_head
    (the two together are INVALID_ARGUMENT: they contradict each other)."""
    after = int(getattr(request, CURSOR_FIELD))
    if not getattr(request, HEAD_FIELD):
        return after
    if after:
        await abort_invalid(
            context, InvalidField(HEAD_FIELD, f"cannot be combined with {CURSOR_FIELD} (got {after})")
        )
    return log.newest()


async def subscribed(context: Any) -> None:
    """Send the stream's headers now, before any message."""
    await context.send_initial_metadata(())


async def serve_log(
    log: CursorLog[T], after: int, context: Any, *, interval_s: float, headers_sent: bool = False
) -> AsyncIterator[Sequence[tuple[int, T]]]:
    """Batches of entries after `after`, forever (see eventlog.follow); the stream's headers are
    sent first (unless the caller has sent them or a message already). A cursor the log does not
    serve aborts the call with OUT_OF_RANGE."""
    if not headers_sent:
        await subscribed(context)
    try:
        async for entries in follow(log, after, interval_s=interval_s):
            yield entries
    except CursorOutOfRange as err:
        await context.abort(
            grpc.StatusCode.OUT_OF_RANGE,
            f"{CURSOR_FIELD}: {err}; resume after {err.oldest} or re-sync from a snapshot",
        )
