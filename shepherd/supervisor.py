"""Crash-only services: one supervisor for a service's root tasks.

A service is a few long-lived tasks (the pod creator, the engine, stream consumers, the store's
commit loop...). If one of them dies while the process lives on, the service goes on answering
with a part missing: launches accepted but never created, events read but never committed. So
when a root task fails (raises, or returns although it should run forever) the supervisor logs
the cause once, naming the task, and stops the service: health goes NOT_SERVING (liveness too, so
the kubelet restarts it even while it drains; nothing else drops liveness), RPCs drain, the
other root tasks are cancelled, and the process exits non-zero. Its restart recovers, because
the design survives any kill: the stores replay what was accepted and the streams resume from the
cursors that were committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from shepherd.logging import get_logger

if TYPE_CHECKING:
    from shepherd.grpcserver import GrpcServer


class ServiceFailed(Exception):
    """A root task failed: the service stopped and must exit non-zero (the cause is logged)."""


def describe(error: BaseException) -> str:
    """The causes inside `error`, one per leaf of any exception group, as `Type: message`."""
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(describe(inner) for inner in error.exceptions)
    return f"{type(error).__name__}: {error}"


class Supervisor:
    """Starts a service's root tasks and stops the service when any of them fails."""

    def __init__(self, server: GrpcServer) -> None:
        self._server = server
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.failed: str | None = None  # the name of the root task whose failure stopped the service
        self._log = get_logger(component="supervisor")

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str, finishes: bool = False) -> None:
        """Run `coro` as a root task. It must run until the service stops, unless `finishes` (a
        task with an end, such as waiting to become ready), which may return but not raise."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._ended(done, finishes))

    def _ended(self, task: asyncio.Task[None], finishes: bool) -> None:
        self._tasks.discard(task)
        if self._stopping or task.cancelled():
            return
        error = task.exception()
        if error is None and finishes:
            return
        if self.failed is not None:
            return  # the service is already stopping; the first failure is the cause
        self.failed = task.get_name()
        cause = describe(error) if error is not None else "it returned, but it should run until the end"
        self._log.error(
            "root task failed: stopping the service, which exits non-zero",
            task=self.failed,
            error=cause,
            exc_info=error,
        )
        self._server.request_stop()

    async def run_until_stopped(self, grace_s: float) -> None:
        """Serve until a stop signal or a root task's failure; then stop serving, let running RPCs
        finish (up to `grace_s`) and cancel the root tasks."""
        await self._server.wait_for_stop_signal()
        if self.failed is not None:
            await self._server.fail()
        await self._server.drain(grace_s)
        self._stopping = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def raise_if_failed(self) -> None:
        """At the very end of a service's shutdown: raise ServiceFailed if a root task failed."""
        if self.failed is not None:
            raise ServiceFailed(f"root task {self.failed!r} failed")
