"""Protobuf Timestamps on the hot paths.

Every pod event carries a creation time and an observe time, and every launch and transition is
stamped. protobuf's own helpers (GetCurrentTime, FromJsonString) go through datetime and
strptime at several microseconds each; these take the clock in nanoseconds and parse the API
server's RFC 3339 strings once per distinct value (pods created in the same second share one).
"""

from __future__ import annotations

import datetime as dt
import functools
import time

from google.protobuf.timestamp_pb2 import Timestamp

_NS = 1_000_000_000


def now() -> Timestamp:
    """The current wall-clock time."""
    ns = time.time_ns()
    return Timestamp(seconds=ns // _NS, nanos=ns % _NS)


def stamp_now(ts: Timestamp) -> None:
    """Set `ts` (e.g. a message's field) to the current wall-clock time, in place."""
    ns = time.time_ns()
    ts.seconds, ts.nanos = ns // _NS, ns % _NS


@functools.lru_cache(maxsize=4096)
def _parse(value: str) -> tuple[int, int]:
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no time zone")
    delta = parsed - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return delta.days * 86_400 + delta.seconds, delta.microseconds * 1000


def epoch_seconds(value: str) -> float:
    """An RFC 3339 string as seconds since the epoch (for arithmetic on clocks, not for messages)."""
    seconds, nanos = _parse(value)
    return seconds + nanos / _NS


def parse_rfc3339(value: str) -> Timestamp:
    """A Timestamp from an RFC 3339 string such as the API server's "2026-11-21T04:09:00Z".
    Raises ValueError on anything else."""
    seconds, nanos = _parse(value)
    return Timestamp(seconds=seconds, nanos=nanos)
