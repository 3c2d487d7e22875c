"""Whether the Kubernetes API server answers, so a service can say so in its gRPC health.

A service that can do nothing useful without the API server (the launcher creates pods) reports
NOT_SERVING while it cannot reach it, so probes, load balancers and operators see the degraded
state, and SERVING again by itself once the API server answers. Two sources feed it: the calls the
service makes anyway (one refused at the connection level marks the API server unreachable at
once; any HTTP answer below 500 marks it reachable), and a cheap probe (GET /readyz) every few
seconds, which notices an outage while no calls are made and the recovery while calls are only
waiting for their next retry. Those waits are cut short when the API server comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from shepherd.kube.client import KubeClient
from shepherd.kube.errors import ApiError
from shepherd.logging import get_logger


def is_unreachable(error: BaseException) -> bool:
    """A failure that says the API server is not answering (rather than refusing a request)."""
    if isinstance(error, ApiError):
        return error.status >= 500  # 503 while starting or stopping; /readyz 500 while not ready
    return isinstance(error, aiohttp.ClientError | OSError | TimeoutError)


@dataclass
class ApiReachability:
    kube: KubeClient
    on_change: Callable[[bool], Awaitable[None]]  # told each change, in order, latest state last
    probe_interval_s: float = 2.0
    reachable: bool | None = None  # None until the first call or probe says
    _back: asyncio.Event = field(default_factory=asyncio.Event)  # set while reachable
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def observe(self, error: BaseException | None) -> None:
        """Feed the outcome of a call to the API server: None when it answered as asked."""
        self._set(error is None or not is_unreachable(error), error)

    async def pause(self, delay_s: float) -> None:
        """Sleep `delay_s` (a retry's backoff), or less if the API server answers again meanwhile:
        a retry waiting out an outage then goes at once instead of up to a backoff cap later."""
        if self.reachable is False:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._back.wait(), delay_s)
        else:
            await asyncio.sleep(delay_s)

    async def run(self) -> None:
        """Probe the API server and report changes, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._report(), name="api-reachability-report")
            while True:
                try:
                    await self.kube.ready(timeout_s=max(1.0, min(5.0, self.probe_interval_s * 2)))
                except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as err:
                    self.observe(err)
                else:
                    self.observe(None)
                await asyncio.sleep(self.probe_interval_s)

    def _set(self, reachable: bool, error: BaseException | None) -> None:
        if reachable == self.reachable:
            return
        self.reachable = reachable
        log = get_logger(component="api-reachability")
        if reachable:
            self._back.set()
            log.info("the Kubernetes API server answers: SERVING")
        else:
            self._back.clear()
            log.warning(
                "degraded: the Kubernetes API server is unreachable; NOT_SERVING until it answers",
                error=str(error),
            )
        self._changed.set()

    async def _report(self) -> None:
        reported: bool | None = None
        while True:
            await self._changed.wait()
            self._changed.clear()
            if self.reachable is not None and self.reachable != reported:
                reported = self.reachable
                await self.on_change(reported)
