"""Whether the reconciler still hears from its upstreams, so its health can say when it does not.

The reconciler turns the launcher's and the watcher's event streams into task states; without
them it still answers queries, but with states that no longer move. A stream that breaks is
reconnected at once, so a short loss (a restart of the upstream, a rolling update) changes
nothing; one lost for longer than `loss_timeout_s` makes the reconciler NOT_SERVING, and it is
SERVING again by itself as soon as every stream is subscribed. A stream counts as subscribed
once the upstream has sent its headers, which it does at once, even with nothing to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.reconciler import metrics
from services.reconciler.metrics import Upstream
from shepherd.logging import get_logger


@dataclass
class UpstreamHealth:
    on_change: Callable[[bool], Awaitable[None]]  # told True/False each time the verdict changes
    loss_timeout_s: float = 30.0
    check_interval_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    # Monotonic time each stream was lost (or the start, before its first subscription); absent: up.
    _down_since: dict[Upstream, float] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    healthy: bool | None = None  # None until the first verdict

    def __post_init__(self) -> None:
        now = self.clock()
        for upstream in Upstream:
            self._down_since[upstream] = now
            metrics.connected[upstream].set(0)
            metrics.down_seconds[upstream].set_function(self._seconds_down(upstream))

    def up(self, upstream: Upstream) -> None:
        if self._down_since.pop(upstream, None) is not None:
            metrics.connected[upstream].set(1)
            self._changed.set()

    def down(self, upstream: Upstream) -> None:
        if upstream not in self._down_since:
            self._down_since[upstream] = self.clock()
            metrics.connected[upstream].set(0)
            metrics.reconnects[upstream].inc()
            self._changed.set()

    def lost(self) -> list[Upstream]:
        """The upstreams lost for longer than the timeout."""
        now = self.clock()
        return [u for u, since in self._down_since.items() if now - since >= self.loss_timeout_s]

    def _seconds_down(self, upstream: Upstream) -> Callable[[], float]:
        def read() -> float:
            since = self._down_since.get(upstream)
            return 0.0 if since is None else self.clock() - since

        return read

    async def run(self) -> None:
        """Re-check on every change and every `check_interval_s` (a loss turns long by itself)."""
        log = get_logger(component="upstream-health")
        while True:
            lost = self.lost()
            healthy = not lost
            if healthy != self.healthy:
                self.healthy = healthy
                if healthy:
                    log.info("every upstream stream is subscribed: SERVING")
                else:
                    log.warning(
                        "degraded: lost upstream streams; NOT_SERVING until they are back",
                        lost=[u.value for u in lost],
                        loss_timeout_s=self.loss_timeout_s,
                    )
                await self.on_change(healthy)
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.check_interval_s)
