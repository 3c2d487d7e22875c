"""Wait for a condition with a generous bound: a liveness check, never a timing assertion."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(
    probe: Callable[[], T | None], *, what: str, timeout: float = 60.0, interval: float = 0.1
) -> T:
    """Return probe()'s first truthy result; fail with `what` if none comes within `timeout`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last value: {last!r})")


async def eventually_async(
    probe: Callable[[], Awaitable[T | None]], *, what: str, timeout: float = 60.0, interval: float = 0.2
) -> T:
    """eventually() for async tests: awaits `probe` and sleeps without blocking the event loop."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last value: {last!r})")


async def eventually_off_loop(
    probe: Callable[[], T | None], *, what: str, timeout: float = 60.0, interval: float = 0.1
) -> T:
    """eventually() for a blocking probe (a Kubernetes client call) in an async test: each probe
    runs in a thread, so the test's gRPC streams keep being read while it waits."""

    async def probe_in_thread() -> T | None:
        return await asyncio.to_thread(probe)

    return await eventually_async(probe_in_thread, what=what, timeout=timeout, interval=interval)
