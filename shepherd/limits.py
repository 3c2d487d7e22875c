"""Bounds on what callers may hold at once: open streams (per identity and in total), unary calls
in flight, and the launch rate per identity. Pure bookkeeping, no gRPC: the interceptor asks and
answers RESOURCE_EXHAUSTED.

Without these one client could open any number of event streams (each holds memory and a wake-up
per message), or launch faster than the API server can create pods.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Token buckets remembered at most; when full, the ones that have refilled are dropped (they
# hold no debt, so forgetting them changes nothing).
_MAX_BUCKETS = 10_000


@dataclass
class StreamSlots:
    """Open server streams, per identity and in total."""

    per_identity: int
    total: int
    _open: dict[str, int] = field(default_factory=dict)
    _total: int = 0

    def acquire(self, identity: str) -> str | None:
        """Take a slot, or say why not (the slot is then not taken)."""
        held = self._open.get(identity, 0)
        if held >= self.per_identity:
            return f"{identity} already holds {held} open streams (at most {self.per_identity} per caller)"
        if self._total >= self.total:
            return f"the server holds {self._total} open streams (at most {self.total})"
        self._open[identity] = held + 1
        self._total += 1
        return None

    def release(self, identity: str) -> None:
        held = self._open.get(identity, 0)
        if held <= 1:
            self._open.pop(identity, None)
        else:
            self._open[identity] = held - 1
        self._total -= 1

    def held(self, identity: str) -> int:
        return self._open.get(identity, 0)


@dataclass(slots=True)
class Bucket:
    tokens: float
    stamp: float


@dataclass
class LaunchRate:
    """A token bucket per identity. A call is let in while the caller's bucket holds at least one
    token, and takes as many as it launches: a batch may drive the bucket into debt, which later
    calls wait out, so the average rate holds for batches of any size."""

    rate: float  # tokens per second; 0 turns the limit off
    burst: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, Bucket] = field(default_factory=dict)

    def take(self, identity: str, launches: int) -> float:
        """0.0 when the call may go ahead (its launches are counted), else seconds until it may."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        bucket = self._buckets.get(identity)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._forget_full(now)
            bucket = self._buckets[identity] = Bucket(float(self.burst), now)
        tokens = bucket.tokens + (now - bucket.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket.stamp = now
        if tokens < 1.0:
            bucket.tokens = tokens
            return (1.0 - tokens) / self.rate
        bucket.tokens = tokens - (launches if launches > 1 else 1)
        return 0.0

    def _forget_full(self, now: float) -> None:
        for identity, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.stamp) * self.rate >= self.burst:
                del self._buckets[identity]
